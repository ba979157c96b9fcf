/* The public embedding API (flowerlua.h): open a state with every flower module, run files and
 * strings with tracebacks, report errors, interrupt. The host program (bindings/host/) is built
 * on this API alone, so an embedder gets exactly what `flowerlua` gets. */
#include <dlfcn.h>
#include <limits.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <lua.h>
#include <lauxlib.h>
#include <lualib.h>

#include "flowerlua.h"

int luaopen_flower_core(lua_State *L);  /* bindings/l_core.c */

#define ERRKEY "flowerlua.error"        /* registry field: message of the last failure */

const char *flowerlua_version(void) { return FLOWER_VERSION; }

/* ---- finding the Lua library ---- */

static char scriptdir[PATH_MAX];        /* "" until found; set once by find_scriptdir */
static pthread_once_t scriptdir_once = PTHREAD_ONCE_INIT;

/* 1 if dir/flower/init.lua is readable. */
static int has_flower(const char *dir) {
  char p[PATH_MAX];
  if (snprintf(p, sizeof p, "%s/flower/init.lua", dir) >= (int)sizeof p) return 0;
  return access(p, R_OK) == 0;
}

/* Tries base + each suffix; on a hit stores the canonical path in scriptdir. */
static int try_dirs(const char *base, const char *const *suffixes) {
  char p[PATH_MAX], real[PATH_MAX];
  for (; *suffixes; suffixes++) {
    if (snprintf(p, sizeof p, "%s%s", base, *suffixes) >= (int)sizeof p) continue;
    if (has_flower(p) && realpath(p, real)) {
      snprintf(scriptdir, sizeof scriptdir, "%s", real);
      return 1;
    }
  }
  return 0;
}

/* Directory part of a file path, canonicalised; 0 if it cannot be resolved. */
static int dir_of(const char *file, char *out) {
  char real[PATH_MAX];
  if (!file || !*file || !realpath(file, real)) return 0;
  char *slash = strrchr(real, '/');
  if (!slash) return 0;
  *slash = '\0';
  snprintf(out, PATH_MAX, "%s", real[0] ? real : "/");
  return 1;
}

static void find_scriptdir(void) {
  static const char *const exe_rel[] = {"/scripts", "/../scripts", "/../share/flowerlua/scripts", NULL};
  static const char *const lib_rel[] = {"/../scripts", "/../share/flowerlua/scripts", "/scripts", NULL};
  char dir[PATH_MAX];
  const char *env = getenv("FLOWERLUA_PATH");
  if (env && *env) {                    /* the first entry names the library's directory */
    size_t n = strcspn(env, ":");
    if (n < sizeof scriptdir) { memcpy(scriptdir, env, n); scriptdir[n] = '\0'; }
    return;
  }
  if (dir_of("/proc/self/exe", dir) && try_dirs(dir, exe_rel)) return;
  Dl_info info;                         /* libflower.so (or the executable it is linked into) */
  if (dladdr((void *)flowerlua_open, &info) && dir_of(info.dli_fname, dir) && try_dirs(dir, lib_rel))
    return;
#ifdef FLOWER_SCRIPTS_DEFAULT
  /* last resort, for programs linking libflower.a from elsewhere: a directory fixed at build time
   * (e.g. $(PREFIX)/share/flowerlua/scripts) */
  static const char *const as_is[] = {"", NULL};
  try_dirs(FLOWER_SCRIPTS_DEFAULT, as_is);
#endif
}

const char *flowerlua_scriptdir(void) {
  pthread_once(&scriptdir_once, find_scriptdir);
  return scriptdir[0] ? scriptdir : NULL;
}

/* package.path = "D/?.lua;D/?/init.lua;" .. package.path for each D of $FLOWERLUA_PATH (in order),
 * or for the directory found next to the executable / library. */
static void set_path(lua_State *L) {
  const char *env = getenv("FLOWERLUA_PATH");
  const char *dir = flowerlua_scriptdir();
  luaL_Buffer b;
  lua_getglobal(L, "package");
  if (!lua_istable(L, -1)) { lua_pop(L, 1); return; }
  luaL_buffinit(L, &b);
  if (env && *env) {
    for (const char *s = env; *s;) {
      size_t n = strcspn(s, ":");
      if (n > 0) {
        luaL_addlstring(&b, s, n); luaL_addstring(&b, "/?.lua;");
        luaL_addlstring(&b, s, n); luaL_addstring(&b, "/?/init.lua;");
      }
      s += n; if (*s == ':') s++;
    }
  } else if (dir) {
    luaL_addstring(&b, dir); luaL_addstring(&b, "/?.lua;");
    luaL_addstring(&b, dir); luaL_addstring(&b, "/?/init.lua;");
  }
  lua_getfield(L, -2, "path");
  luaL_addvalue(&b);                    /* the old path (a string, or nothing if nil) */
  luaL_pushresult(&b);
  lua_setfield(L, -2, "path");
  lua_pop(L, 1);
}

void flowerlua_openlibs(lua_State *L) {
  luaL_getsubtable(L, LUA_REGISTRYINDEX, LUA_PRELOAD_TABLE);
  lua_pushcfunction(L, luaopen_flower_core);
  lua_setfield(L, -2, "flower.core");
  lua_pop(L, 1);
  set_path(L);
}

/* ---- running code ---- */

/* Message handler: turns the error object into a string and appends a traceback (as lua.c does). */
static int msghandler(lua_State *L) {
  const char *msg = lua_tostring(L, 1);
  if (msg == NULL) {
    if (luaL_callmeta(L, 1, "__tostring") && lua_type(L, -1) == LUA_TSTRING) return 1;
    msg = lua_pushfstring(L, "(error object is a %s value)", luaL_typename(L, 1));
  }
  luaL_traceback(L, L, msg, 1);
  return 1;
}

/* Records the outcome of a call: clears the message on success, stores the error (popped) on failure. */
static int record(lua_State *L, int status) {
  if (status == LUA_OK) {
    lua_pushnil(L);
  } else if (!lua_isstring(L, -1)) {    /* e.g. errors inside the message handler */
    lua_pop(L, 1);
    lua_pushfstring(L, "(error object is not a string; status %d)", status);
  }
  lua_setfield(L, LUA_REGISTRYINDEX, ERRKEY);
  return status;
}

int flowerlua_pcall(lua_State *L, int nargs, int nresults) {
  int base = lua_gettop(L) - nargs;     /* the function's index */
  lua_pushcfunction(L, msghandler);
  lua_insert(L, base);
  int status = lua_pcall(L, nargs, nresults, base);
  lua_remove(L, base);
  return record(L, status);
}

const char *flowerlua_error(lua_State *L) {
  lua_getfield(L, LUA_REGISTRYINDEX, ERRKEY);
  const char *msg = lua_tostring(L, -1);  /* stays alive: the registry holds the string */
  lua_pop(L, 1);
  return msg;
}

int flowerlua_dostring(lua_State *L, const char *code, const char *chunkname) {
  int status = luaL_loadbuffer(L, code, strlen(code), chunkname ? chunkname : code);
  if (status != LUA_OK) return record(L, status);
  return flowerlua_pcall(L, 0, 0);
}

int flowerlua_dofile(lua_State *L, const char *path, int argc, char **argv) {
  if (path && strcmp(path, "-") == 0) path = NULL;
  lua_createtable(L, argc, 1);          /* arg = {[0] = path, argv...} */
  lua_pushstring(L, path ? path : "-");
  lua_rawseti(L, -2, 0);
  for (int i = 0; i < argc; i++) {
    lua_pushstring(L, argv[i]);
    lua_rawseti(L, -2, i + 1);
  }
  lua_setglobal(L, "arg");
  int status = luaL_loadfile(L, path);
  if (status != LUA_OK) return record(L, status);
  if (!lua_checkstack(L, argc + LUA_MINSTACK)) {
    lua_pop(L, 1);
    lua_pushliteral(L, "flowerlua_dofile: too many arguments to script");
    return record(L, LUA_ERRRUN);
  }
  for (int i = 0; i < argc; i++) lua_pushstring(L, argv[i]);
  return flowerlua_pcall(L, argc, 0);
}

/* ---- interrupting ---- */

static void interrupted(lua_State *L, lua_Debug *ar) {
  (void)ar;
  lua_sethook(L, NULL, 0, 0);
  luaL_error(L, "interrupted!");
}

void flowerlua_interrupt(lua_State *L) {
  /* lua_sethook is the one Lua API call that is safe from a signal handler (see lua.c). */
  lua_sethook(L, interrupted, LUA_MASKCALL | LUA_MASKRET | LUA_MASKCOUNT, 1);
}

/* ---- opening and closing ---- */

static int open_protected(lua_State *L) {
  luaL_openlibs(L);
  flowerlua_openlibs(L);
  return 0;
}

lua_State *flowerlua_open(void) {
  lua_State *L = luaL_newstate();
  if (L == NULL) return NULL;
  lua_pushcfunction(L, open_protected);
  if (lua_pcall(L, 0, 0, 0) != LUA_OK) {
    lua_close(L);
    return NULL;
  }
  return L;
}

void flowerlua_close(lua_State *L) {
  if (L) lua_close(L);
}
