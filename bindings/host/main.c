/* flowerlua: the host program. Runs scripts like the stock `lua` interpreter does (same options,
 * same `arg` table) in a state opened by flowerlua_open, and opens the REPL (repl.c) when run
 * alone on a terminal or with -i. */
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <lua.h>
#include <lauxlib.h>

#include "flowerlua.h"
#include "host.h"

const char *host_progname = "flowerlua";

static void print_usage(FILE *f) {
  fprintf(f,
    "usage: %s [options] [script [args]]\n"
    "Runs a Lua 5.4 script with the flower library available (local flower = require 'flower');\n"
    "with no script and a terminal on stdin, opens the interactive prompt (REPL).\n"
    "Options:\n"
    "  -e stat    execute string 'stat'\n"
    "  -i         enter interactive mode after running 'script'\n"
    "  -l mod     require library 'mod' into global 'mod'\n"
    "  -l g=mod   require library 'mod' into global 'g'\n"
    "  -v         show version information\n"
    "  -W         turn warnings on\n"
    "  --         stop handling options\n"
    "  -          stop handling options and run stdin\n"
    "  --version  show version information and exit\n"
    "  --help     show this help and exit\n"
    "Environment:\n"
    "  FLOWERLUA_PATH     directory (or ':'-separated list) holding flower/init.lua\n"
    "  FLOWERLUA_HISTORY  REPL history file (default ~/.flowerlua_history)\n",
    host_progname);
}

void host_print_version(void) {
  printf("flowerlua %s (%s)\n", flowerlua_version(), LUA_RELEASE);
  fflush(stdout);
}

int host_report(lua_State *L, int status, int prefix) {
  if (status != LUA_OK) {
    const char *msg = flowerlua_error(L);
    if (prefix) fprintf(stderr, "%s: ", host_progname);
    fprintf(stderr, "%s\n", msg ? msg : "(no error message)");
    fflush(stderr);
  }
  return status;
}

/* Prints and pops the error message on top of the stack (a load error). */
static int report_top(lua_State *L, int status) {
  const char *msg = lua_tostring(L, -1);
  fprintf(stderr, "%s: %s\n", host_progname, msg ? msg : "(error object is not a string)");
  fflush(stderr);
  lua_pop(L, 1);
  return status;
}

/* ---- Ctrl-C while Lua runs ---- */

static lua_State *volatile running_L;
static volatile sig_atomic_t interrupt_requested;

static void on_sigint(int sig) {
  (void)sig;                            /* SA_RESETHAND: a second Ctrl-C kills as usual */
  interrupt_requested = 1;
  flowerlua_interrupt(running_L);
}

int host_docall(lua_State *L, int nargs, int nresults) {
  struct sigaction sa, old;
  memset(&sa, 0, sizeof sa);
  sa.sa_handler = on_sigint;
  sa.sa_flags = SA_RESETHAND;
  sigemptyset(&sa.sa_mask);
  running_L = L;
  interrupt_requested = 0;
  sigaction(SIGINT, &sa, &old);
  int status = flowerlua_pcall(L, nargs, nresults);
  sigaction(SIGINT, &old, NULL);
  /* A Ctrl-C that came after the last Lua instruction left its hook set: drop it, or the next
   * statement would stop at once. (Only then: the user's own debug.sethook stays.) */
  if (interrupt_requested) {
    lua_sethook(L, NULL, 0, 0);
    if (status != LUA_OK && isatty(STDERR_FILENO)) fputc('\n', stderr);  /* after the echoed ^C */
  }
  interrupt_requested = 0;
  return status;
}

/* ---- command line (the same grammar as lua.c) ---- */

enum { HAS_E = 1, HAS_I = 2, HAS_V = 4, HAS_W = 8 };

/* Scans options; returns the flags, sets *script to the index of the script (0 if none),
 * or returns -1 on a bad option (with *script = its index). */
static int collect_args(int argc, char **argv, int *script) {
  int flags = 0;
  *script = 0;
  for (int i = 1; i < argc; i++) {
    const char *a = argv[i];
    if (a[0] != '-') { *script = i; return flags; }
    if (strcmp(a, "-") == 0) { *script = i; return flags; }
    if (strcmp(a, "--") == 0) { if (i + 1 < argc) *script = i + 1; return flags; }
    switch (a[1]) {
      case 'e': case 'l':
        if (a[1] == 'e') flags |= HAS_E;
        if (a[2] == '\0') {             /* the argument is the next word */
          if (++i >= argc || argv[i][0] == '-') { *script = i - 1; return -1; }
        }
        break;
      case 'i': if (a[2]) goto bad; flags |= HAS_I | HAS_V; break;
      case 'v': if (a[2]) goto bad; flags |= HAS_V; break;
      case 'W': if (a[2]) goto bad; flags |= HAS_W; break;
      default: goto bad;
    }
    continue;
  bad:
    *script = i;
    return -1;
  }
  return flags;
}

/* arg = {[-n..-1] = interpreter and options, [0] = script, [1..] = script arguments} */
static void create_arg_table(lua_State *L, int argc, char **argv, int script) {
  /* no script (0): arg[0] is the program and the options are positive */
  lua_createtable(L, argc - script - 1 > 0 ? argc - script - 1 : 0, script + 1);
  for (int i = 0; i < argc; i++) {
    lua_pushstring(L, argv[i]);
    lua_rawseti(L, -2, i - script);
  }
  lua_setglobal(L, "arg");
}

/* require(mod) into global g, for "-l mod" and "-l g=mod". */
static int do_library(lua_State *L, const char *spec) {
  const char *eq = strchr(spec, '=');
  const char *mod = eq ? eq + 1 : spec;
  lua_getglobal(L, "require");
  lua_pushstring(L, mod);
  int status = host_docall(L, 1, 1);
  if (status != LUA_OK) return status;
  if (eq) lua_pushlstring(L, spec, (size_t)(eq - spec)); else lua_pushstring(L, mod);
  lua_insert(L, -2);
  lua_setglobal(L, lua_tostring(L, -2));
  lua_pop(L, 1);
  return LUA_OK;
}

/* Runs -e and -l in command-line order, up to the script; stops at the first failure. */
static int run_options(lua_State *L, char **argv, int upto) {
  for (int i = 1; i < upto; i++) {
    const char *a = argv[i];
    if (a[1] != 'e' && a[1] != 'l') continue;
    const char *extra = a[2] ? a + 2 : argv[++i];
    int status;
    if (a[1] == 'e') {
      status = luaL_loadbuffer(L, extra, strlen(extra), "=(command line)");
      if (status != LUA_OK) return report_top(L, status);
      status = host_docall(L, 0, 0);
    } else {
      status = do_library(L, extra);
    }
    if (status != LUA_OK) return host_report(L, status, 1);
  }
  return LUA_OK;
}

/* Runs argv[script] ("-": stdin) with the following words as `...`. */
static int run_script(lua_State *L, int argc, char **argv, int script) {
  const char *fname = argv[script];
  if (strcmp(fname, "-") == 0 && (script == 0 || strcmp(argv[script - 1], "--") != 0)) fname = NULL;
  int status = luaL_loadfile(L, fname);
  if (status != LUA_OK) return report_top(L, status);
  int n = argc - script - 1;
  if (!lua_checkstack(L, n + LUA_MINSTACK)) {
    fprintf(stderr, "%s: too many arguments to script\n", host_progname);
    return LUA_ERRRUN;
  }
  for (int i = script + 1; i < argc; i++) lua_pushstring(L, argv[i]);
  return host_report(L, host_docall(L, n, 0), 1);
}

/* `flowerlua < file`: runs stdin as a script, leaving `arg` as it is (as lua.c does). */
static int run_stdin(lua_State *L) {
  int status = luaL_loadfile(L, NULL);
  if (status != LUA_OK) return report_top(L, status);
  return host_report(L, host_docall(L, 0, 0), 1);
}

/* libgomp reads OMP_WAIT_POLICY and OpenBLAS OPENBLAS_THREAD_TIMEOUT when they load, before main.
 * Their defaults let idle threads spin (libgomp's for a while, OpenBLAS's for about 2^28 cycles
 * after each call), and the two pools then take turns stealing each other's cores: libgomp's cost
 * 7% of a ResNet50 training step on a quiet 2-core machine (up to 2x under load); OpenBLAS's, a
 * fifth of the ensemble's training time (1,223 -> 1,521 rows/s, Dense 8192 -> 997 with Adam and
 * dropout, three runs each), while ResNet50 and a small CNN stayed within their run-to-run noise.
 * So unless the user chose them, we run ourselves again once with the passive policy and a short
 * OpenBLAS spin (2^4 rounds). If exec fails we simply go on. */
static void prefer_passive_threads(char **argv) {
  int changed = 0;
  if (getenv("OMP_WAIT_POLICY") == NULL && setenv("OMP_WAIT_POLICY", "passive", 1) == 0) changed = 1;
  if (getenv("OPENBLAS_THREAD_TIMEOUT") == NULL && setenv("OPENBLAS_THREAD_TIMEOUT", "4", 1) == 0) changed = 1;
  if (changed) execv("/proc/self/exe", argv);
}

int main(int argc, char **argv) {
  prefer_passive_threads(argv);
  if (argv[0] && argv[0][0]) {
    const char *slash = strrchr(argv[0], '/');
    host_progname = slash ? slash + 1 : argv[0];
  }
  for (int i = 1; i < argc && argv[i][0] == '-' && strcmp(argv[i], "--") != 0; i++) {
    if (strcmp(argv[i], "--help") == 0) { print_usage(stdout); return 0; }
    if (strcmp(argv[i], "--version") == 0) { host_print_version(); return 0; }
    if ((argv[i][1] == 'e' || argv[i][1] == 'l') && argv[i][2] == '\0') i++;  /* skip the value */
  }
  int script;
  int flags = collect_args(argc, argv, &script);
  if (flags < 0) {
    const char *bad = argv[script];
    if ((bad[1] == 'e' || bad[1] == 'l') && bad[2] == '\0')
      fprintf(stderr, "%s: '%s' needs an argument\n", host_progname, bad);
    else
      fprintf(stderr, "%s: unrecognized option '%s'\n", host_progname, bad);
    print_usage(stderr);
    return 1;
  }
  lua_State *L = flowerlua_open();
  if (L == NULL) {
    fprintf(stderr, "%s: cannot create state: not enough memory\n", host_progname);
    return 1;
  }
  int ok = 1;
  create_arg_table(L, argc, argv, script);
  if (flags & HAS_V) host_print_version();
  if (flags & HAS_W) lua_warning(L, "@on", 0);
  if (run_options(L, argv, script ? script : argc) != LUA_OK) ok = 0;
  if (ok && script && run_script(L, argc, argv, script) != LUA_OK) ok = 0;
  if (ok && (flags & HAS_I)) {
    host_repl(L);
  } else if (ok && !script && !(flags & (HAS_E | HAS_V))) {
    if (isatty(STDIN_FILENO)) {
      host_print_version();
      host_repl(L);
    } else if (run_stdin(L) != LUA_OK) {
      ok = 0;
    }
  }
  flowerlua_close(L);
  return ok ? 0 : 1;
}
