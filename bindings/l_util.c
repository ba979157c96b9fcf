/* Lua bindings for the few operating-system services the experiment modules need and pure Lua
 * lacks: flower.core._util = { now, isatty, catch_signals, interrupted, clear_interrupt, fsync }.
 *
 * Signals: a training loop must finish its current step before it stops (a half-applied optimizer
 * step cannot be checkpointed), so while catch_signals(true) is in effect SIGINT and SIGTERM only
 * set a flag that the loop polls with interrupted(). A second signal of the same kind while one is
 * pending restores the default action and re-raises it: a second Ctrl-C kills a process stuck in a
 * long C kernel, as users expect. catch_signals(false) puts the previous handlers back (the host's
 * own Ctrl-C handling), so this nests inside the host without touching it. */
#include "lflower.h"

#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <string.h>
#include <time.h>
#include <unistd.h>


/* now() -> seconds from a monotonic clock, as a float (durations, ETAs, images/s, profiles); also
 * registered as flower.core._nn.now and _data.now. */
int fl_lua_now(lua_State *L) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  lua_pushnumber(L, (lua_Number)ts.tv_sec + (lua_Number)ts.tv_nsec * 1e-9);
  return 1;
}

/* isatty(fd = 1) -> boolean */
static int l_isatty(lua_State *L) {
  lua_Integer fd = luaL_optinteger(L, 1, 1);
  luaL_argcheck(L, fd >= 0 && fd <= 1 << 20, 1, "util.isatty: expected a file descriptor >= 0");
  lua_pushboolean(L, isatty((int)fd) == 1);
  return 1;
}

/* ---- signals ---- */

static volatile sig_atomic_t pending_signal;   /* 0, SIGINT or SIGTERM */
static int catching;
static struct sigaction old_int, old_term;

static void on_signal(int sig) {
  if (pending_signal == sig) {       /* the second one: act as if we had never caught it */
    signal(sig, SIG_DFL);
    raise(sig);
    return;
  }
  pending_signal = sig;
}

/* catch_signals(on) -> previous state (boolean) */
static int l_catch_signals(lua_State *L) {
  luaL_checktype(L, 1, LUA_TBOOLEAN);
  int on = lua_toboolean(L, 1);
  int was = catching;
  if (on && !catching) {
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_signal;
    sa.sa_flags = SA_RESTART;       /* blocking reads in loaders resume instead of failing EINTR */
    sigemptyset(&sa.sa_mask);
    pending_signal = 0;
    if (sigaction(SIGINT, &sa, &old_int) != 0 || sigaction(SIGTERM, &sa, &old_term) != 0)
      return luaL_error(L, "util.catch_signals: sigaction failed: %s", strerror(errno));
    catching = 1;
  } else if (!on && catching) {
    sigaction(SIGINT, &old_int, NULL);
    sigaction(SIGTERM, &old_term, NULL);
    catching = 0;
  }
  lua_pushboolean(L, was);
  return 1;
}

/* interrupted() -> 'SIGINT' | 'SIGTERM' | nil (the flag stays set until clear_interrupt) */
static int l_interrupted(lua_State *L) {
  int sig = pending_signal;
  if (sig == SIGINT) lua_pushliteral(L, "SIGINT");
  else if (sig == SIGTERM) lua_pushliteral(L, "SIGTERM");
  else lua_pushnil(L);
  return 1;
}

static int l_clear_interrupt(lua_State *L) {
  (void)L;
  pending_signal = 0;
  return 0;
}

/* fsync(path): flushes a written file to disk before it is renamed into place. */
static int l_fsync(lua_State *L) {
  const char *path = luaL_checkstring(L, 1);
  int fd = open(path, O_RDONLY);
  if (fd < 0) return luaL_error(L, "util.fsync: cannot open '%s': %s", path, strerror(errno));
  int rc = fsync(fd);
  int err = errno;
  close(fd);
  if (rc != 0) return luaL_error(L, "util.fsync: '%s': %s", path, strerror(err));
  return 0;
}

static int l_getpid(lua_State *L) {
  lua_pushinteger(L, (lua_Integer)getpid());
  return 1;
}

static const luaL_Reg util_funcs[] = {
  {"now", fl_lua_now},
  {"isatty", l_isatty},
  {"catch_signals", l_catch_signals},
  {"interrupted", l_interrupted},
  {"clear_interrupt", l_clear_interrupt},
  {"fsync", l_fsync},
  {"getpid", l_getpid},
  {NULL, NULL}
};

void fl_lua_open_util(lua_State *L) {
  luaL_newlib(L, util_funcs);
  lua_setfield(L, -2, "_util");
}
