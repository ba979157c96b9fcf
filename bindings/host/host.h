/* Shared by the flowerlua program's files (main.c, repl.c); built on the public API only. */
#ifndef FLOWER_HOST_H
#define FLOWER_HOST_H

#include <lua.h>

extern const char *host_progname;

/* flowerlua_pcall with Ctrl-C turned into a Lua error ("interrupted!") while the call runs;
 * a second Ctrl-C kills the process (a C kernel that never returns to Lua). */
int host_docall(lua_State *L, int nargs, int nresults);

/* Prints the message of a failed flowerlua_* call to stderr (prefixed by the program name
 * when `prefix`); returns status. */
int host_report(lua_State *L, int status, int prefix);

/* The interactive loop: reads statements or expressions until end of input. */
void host_repl(lua_State *L);

/* Lua source of the REPL's helpers (repl_lua.c): returns {format = f, complete = f}. */
extern const char host_repl_lua[];

/* "flowerlua 0.1.0 (Lua 5.4.x)" */
void host_print_version(void);

#endif
