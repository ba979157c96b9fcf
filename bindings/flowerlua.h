/* flowerlua.h: the public embedding API of flowerlua.
 *
 * flowerlua is an embeddable host, like Lua itself. Link a program with libflower (static
 * `libflower.a` or shared `libflower.so`) and Lua 5.4, include this header, and:
 *
 *   lua_State *L = flowerlua_open();           // std libs + every flower module
 *   if (flowerlua_dostring(L, "local flower = require 'flower' ...", "=init") != 0)
 *     fprintf(stderr, "%s\n", flowerlua_error(L));
 *   flowerlua_close(L);
 *
 * The state is an ordinary lua_State: use the Lua C API on it freely. Only this header and
 * Lua's own headers are public; nothing here exposes flowerlua's internal types.
 *
 * Where the Lua library (scripts/flower/NAME.lua) is found: $FLOWERLUA_PATH (one directory or a
 * ':'-separated list) if set; else next to the running executable (<exe>/scripts, <exe>/../scripts,
 * <exe>/../share/flowerlua/scripts); else next to the libflower that holds this code
 * (<lib>/../scripts, <lib>/../share/flowerlua/scripts); else the directory the build fixed
 * with -DFLOWER_SCRIPTS_DEFAULT, if any. The first directory holding flower/init.lua is
 * prepended to package.path as DIR/?.lua;DIR/?/init.lua. A program linked with libflower.a
 * and installed elsewhere sets FLOWERLUA_PATH.
 *
 * Return codes are Lua's: 0 (LUA_OK) on success, else LUA_ERRRUN, LUA_ERRSYNTAX, LUA_ERRMEM,
 * LUA_ERRERR or LUA_ERRFILE. */
#ifndef FLOWERLUA_H
#define FLOWERLUA_H

#include <lua.h>

#ifdef __cplusplus
extern "C" {
#endif

#define FLOWERLUA_VERSION_MAJOR 0
#define FLOWERLUA_VERSION_MINOR 1

/* Version string of the library, e.g. "0.1.0". */
const char *flowerlua_version(void);

/* A new state with Lua's standard libraries, `flower.core` in package.preload and package.path
 * set so that require 'flower' finds the Lua library. NULL if memory runs out or setup fails. */
lua_State *flowerlua_open(void);

/* Registers flower's C modules in package.preload of an existing state (one you made yourself,
 * or stock lua5.4's) and prepends the script directory to package.path. Raises on error. */
void flowerlua_openlibs(lua_State *L);

/* Directory of the Lua library found as described above, or NULL if none was found.
 * The string is static: valid for the life of the process. */
const char *flowerlua_scriptdir(void);

/* Runs the file at `path` (NULL or "-" reads stdin) with global `arg` set like lua.c does:
 * arg[0] = path, arg[1..argc] = argv[0..argc-1]; the chunk also receives argv as `...`.
 * Returns 0 or a Lua error code; on error flowerlua_error(L) gives the message and traceback. */
int flowerlua_dofile(lua_State *L, const char *path, int argc, char **argv);

/* Compiles and runs `code`; `chunkname` names it in messages (e.g. "=init"; NULL: the code). */
int flowerlua_dostring(lua_State *L, const char *code, const char *chunkname);

/* Calls the function below `nargs` arguments on the stack like lua_pcall, with a message handler
 * that appends a traceback and records the message for flowerlua_error. On error nothing is left
 * on the stack; on success `nresults` results (LUA_MULTRET: all) are. */
int flowerlua_pcall(lua_State *L, int nargs, int nresults);

/* The message (with traceback) of the last failed flowerlua_* call on this state, or NULL if the
 * last call succeeded. Valid until the next flowerlua_* call on the state. */
const char *flowerlua_error(lua_State *L);

/* Asks the running Lua code to stop: the next Lua instruction raises "interrupted!".
 * Async-signal-safe; call it from a SIGINT handler (C kernels finish first). */
void flowerlua_interrupt(lua_State *L);

/* Closes the state (runs finalizers: tensors are freed). Accepts NULL. */
void flowerlua_close(lua_State *L);

#ifdef __cplusplus
}
#endif

#endif
