/* Embeds flowerlua in a tiny C program, using only the public header (flowerlua.h) and Lua's:
 * opens a state, runs flower code from a string and a file, reads results back through the
 * Lua API, checks error reporting (message + traceback, syntax errors, clearing) and
 * interrupting from a signal handler. Prints `ok - ...` / `not ok - ...` lines.
 * Usage: embed [label]   (the label tells the static and shared builds apart in the output) */
#define _GNU_SOURCE
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/time.h>
#include <unistd.h>

#include <lua.h>
#include <lauxlib.h>

#include "flowerlua.h"

static const char *label = "embed";
static int failures;

static void check(int cond, const char *what, const char *detail) {
  printf("%s - %s: %s\n", cond ? "ok" : "not ok", label, what);
  if (!cond && detail) printf("    %s\n", detail);
  if (!cond) failures++;
}

static int contains(const char *s, const char *part) { return s && strstr(s, part) != NULL; }

static lua_State *alarm_L;
static void on_alarm(int sig) { (void)sig; flowerlua_interrupt(alarm_L); }

int main(int argc, char **argv) {
  if (argc > 1) label = argv[1];

  lua_State *L = flowerlua_open();
  check(L != NULL, "flowerlua_open gives a state", NULL);
  if (!L) return 1;
  check(flowerlua_scriptdir() != NULL, "the Lua library directory is found", getenv("FLOWERLUA_PATH"));
  check(strcmp(flowerlua_version(), "") != 0, "flowerlua_version is set", NULL);

  /* flower code from a string; results read back through the Lua API */
  int st = flowerlua_dostring(L,
      "local flower = require 'flower'\n"
      "version = flower.version\n"
      "local t = flower.ones(2, 3) * 2\n"
      "total = t:sum():item()\n"
      "shape = table.concat(t:size(), 'x')\n", "=embedded");
  check(st == LUA_OK, "a string using flower runs", flowerlua_error(L));
  check(flowerlua_error(L) == NULL, "no error is reported after success", flowerlua_error(L));
  lua_getglobal(L, "version");
  check(lua_isstring(L, -1) && strcmp(lua_tostring(L, -1), flowerlua_version()) == 0,
        "flower.version matches flowerlua_version()", lua_tostring(L, -1));
  lua_getglobal(L, "total");
  check(lua_tonumber(L, -1) == 12.0, "tensor result read back (ones(2,3)*2 sums to 12)", lua_tostring(L, -1));
  lua_getglobal(L, "shape");
  check(contains(lua_tostring(L, -1), "2x3"), "tensor size read back (2x3)", lua_tostring(L, -1));
  lua_pop(L, 3);

  /* a runtime error: message and traceback */
  st = flowerlua_dostring(L,
      "local function inner() error('boom from inner') end\n"
      "local function outer() inner() end\n"
      "outer()\n", "=failing");
  const char *err = flowerlua_error(L);
  check(st == LUA_ERRRUN, "a runtime error returns LUA_ERRRUN", err);
  check(contains(err, "failing:1: boom from inner"), "the error message names chunk, line and text", err);
  check(contains(err, "stack traceback:") && contains(err, "inner") && contains(err, "outer"),
        "the error carries a traceback through both functions", err);
  check(lua_gettop(L) == 0, "the stack is balanced after an error", NULL);

  /* an error raised by flower's C code (argument checking) */
  st = flowerlua_dostring(L, "local flower = require 'flower'\n"
                             "flower.ones(2, 3):matmul(flower.ones(4, 5))\n", "=shapes");
  err = flowerlua_error(L);
  check(st == LUA_ERRRUN && contains(err, "matmul:") && contains(err, "shapes:2:"), "a C-side error names the function", err);

  /* a syntax error */
  st = flowerlua_dostring(L, "x = = 1", "=syntax");
  err = flowerlua_error(L);
  check(st == LUA_ERRSYNTAX && contains(err, "syntax:1:"), "a syntax error returns LUA_ERRSYNTAX with its place", err);

  /* success clears the previous error */
  st = flowerlua_dostring(L, "y = 1", NULL);
  check(st == LUA_OK && flowerlua_error(L) == NULL, "success clears the last error", flowerlua_error(L));

  /* a file with arguments: arg table and ... */
  char path[] = "/tmp/flowerlua-embed-XXXXXX";
  int fd = mkstemp(path);
  const char *script = "got = select('#', ...) .. ':' .. arg[0]:match('[^/]*$') .. ':' .. arg[1] .. ',' .. arg[2]\n";
  int wrote = fd >= 0 && write(fd, script, strlen(script)) == (ssize_t)strlen(script);
  if (fd >= 0) close(fd);
  char *args[] = {"one", "two"};
  st = wrote ? flowerlua_dofile(L, path, 2, args) : -1;
  lua_getglobal(L, "got");
  char expect[128];
  snprintf(expect, sizeof expect, "2:%s:one,two", strrchr(path, '/') + 1);
  check(st == LUA_OK && lua_isstring(L, -1) && strcmp(lua_tostring(L, -1), expect) == 0,
        "flowerlua_dofile sets arg and passes ...", st == LUA_OK ? lua_tostring(L, -1) : flowerlua_error(L));
  lua_pop(L, 1);
  unlink(path);
  st = flowerlua_dofile(L, "/nonexistent/flowerlua.lua", 0, NULL);
  check(st == LUA_ERRFILE && contains(flowerlua_error(L), "cannot open"),
        "a missing file returns LUA_ERRFILE", flowerlua_error(L));

  /* flowerlua_pcall: a Lua function called from C with arguments and results */
  flowerlua_dostring(L, "function add(a, b) return a + b, 'sum' end", "=def");
  lua_getglobal(L, "add");
  lua_pushinteger(L, 40);
  lua_pushinteger(L, 2);
  st = flowerlua_pcall(L, 2, 2);
  check(st == LUA_OK && lua_tointeger(L, -2) == 42 && contains(lua_tostring(L, -1), "sum"),
        "flowerlua_pcall returns results", flowerlua_error(L));
  lua_settop(L, 0);

  /* interrupting a busy loop from a signal handler, as a host does for Ctrl-C */
  alarm_L = L;
  signal(SIGALRM, on_alarm);
  struct itimerval it = {{0, 0}, {0, 100000}};  /* 0.1 s */
  setitimer(ITIMER_REAL, &it, NULL);
  st = flowerlua_dostring(L, "local n = 0 while true do n = n + 1 end", "=loop");
  check(st == LUA_ERRRUN && contains(flowerlua_error(L), "interrupted!"),
        "flowerlua_interrupt stops a running loop", flowerlua_error(L));
  st = flowerlua_dostring(L, "z = 5", "=after");
  check(st == LUA_OK, "the state runs code again after an interrupt", flowerlua_error(L));

  flowerlua_close(L);
  flowerlua_close(NULL);
  check(1, "flowerlua_close (also of NULL)", NULL);
  return failures ? 1 : 0;
}
