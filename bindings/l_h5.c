/* Lua bindings for HDF5 files: flower.core._h5.open(path, mode) -> flower.H5File.
 * The Lua module flower.h5 (scripts/flower/h5.lua) wraps these and adds write_atomic.
 * Indices seen from Lua are 1-based (read_slice's start row). */
#include "lflower.h"
#include "io/h5.h"

#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define H5FILE_MT "flower.H5File"

typedef struct { fl_h5 *f; char mode; } lh5;

static lh5 *checkfile(lua_State *L, const char *op) {
  lh5 *u = luaL_checkudata(L, 1, H5FILE_MT);
  if (!u->f) luaL_error(L, "h5.%s: the file is closed", op);
  return u;
}

/* Raises the core's message; a failure for lack of memory gets one full collection and a retry
 * by the caller (see with_retry). */
static int raise(lua_State *L) { return fl_lua_error(L); }

static double opt_number(lua_State *L, int idx, const char *key) {
  double v = 0;
  if (lua_getfield(L, idx, key) != LUA_TNIL) {
    if (!lua_isnumber(L, -1) || lua_tonumber(L, -1) <= 0)
      luaL_error(L, "h5.open: option '%s' must be a number > 0, got %s", key, luaL_tolstring(L, -1, NULL));
    v = lua_tonumber(L, -1);
  }
  lua_pop(L, 1);
  return v;
}

/* open(path [, mode [, {untrusted=true, timeout=s, memory=bytes, cpu=s}]]) */
static int l_open(lua_State *L) {
  const char *path = luaL_checkstring(L, 1);
  const char *mode = luaL_optstring(L, 2, "r");
  if (strlen(mode) != 1 || !strchr("rwa", mode[0]))
    return luaL_error(L, "h5.open: mode must be 'r', 'w' or 'a', got '%s'", mode);
  int untrusted = 0;
  fl_h5_limits lim = {0};
  if (!lua_isnoneornil(L, 3)) {
    luaL_checktype(L, 3, LUA_TTABLE);
    lua_getfield(L, 3, "untrusted");
    untrusted = lua_toboolean(L, -1);
    lua_pop(L, 1);
    lim.timeout_s = opt_number(L, 3, "timeout");
    lim.memory = (int64_t)opt_number(L, 3, "memory");
    lim.cpu_s = opt_number(L, 3, "cpu");
    if (untrusted && mode[0] != 'r')
      return luaL_error(L, "h5.open: %s: untrusted files open read-only ('r'), got mode '%s'", path, mode);
  }
  lh5 *u = lua_newuserdatauv(L, sizeof *u, 0);
  u->f = NULL;
  u->mode = mode[0];
  luaL_setmetatable(L, H5FILE_MT);
  int r = untrusted ? fl_h5_open_untrusted(&u->f, path, &lim) : fl_h5_open(&u->f, path, mode[0]);
  if (r < 0) return raise(L);
  return 1;
}

static int l_close(lua_State *L) {
  lh5 *u = luaL_checkudata(L, 1, H5FILE_MT);
  fl_h5 *f = u->f;
  u->f = NULL;
  if (f && fl_h5_close(f) < 0) return raise(L);
  return 0;
}

/* __gc and __close: never raise; a failed close is reported as a warning. */
static int l_gc(lua_State *L) {
  lh5 *u = luaL_checkudata(L, 1, H5FILE_MT);
  fl_h5 *f = u->f;
  u->f = NULL;
  if (f && fl_h5_close(f) < 0) lua_warning(L, fl_errmsg(), 0);
  return 0;
}

static int l_tostring(lua_State *L) {
  lh5 *u = luaL_checkudata(L, 1, H5FILE_MT);
  if (u->f) lua_pushfstring(L, "flower.H5File('%s', '%c'%s)", fl_h5_filename(u->f), u->mode,
                            fl_h5_untrusted(u->f) ? ", untrusted" : "");
  else lua_pushliteral(L, "flower.H5File(closed)");
  return 1;
}

static int l_filename(lua_State *L) {
  lh5 *u = checkfile(L, "filename");
  lua_pushstring(L, fl_h5_filename(u->f));
  return 1;
}

static int l_flush(lua_State *L) {
  lh5 *u = checkfile(L, "flush");
  if (fl_h5_flush(u->f) < 0) return raise(L);
  return 0;
}

static void push_strings(lua_State *L, char **s, int64_t n) {
  lua_createtable(L, n > 0 && n < (1 << 24) ? (int)n : 0, 0);
  for (int64_t i = 0; i < n; i++) {
    lua_pushstring(L, s[i]);
    lua_rawseti(L, -2, (lua_Integer)i + 1);
  }
}

/* f:read(path) -> tensor (numbers) or a list of strings (string datasets) */
static int l_read(lua_State *L) {
  lh5 *u = checkfile(L, "read");
  const char *path = luaL_checkstring(L, 2);
  int ndim, is_string;
  int64_t shape[FL_MAXDIM];
  fl_dtype dt;
  if (fl_h5_info(u->f, "read", path, &ndim, shape, &dt, &is_string) < 0) return raise(L);
  if (is_string) {
    char **s;
    int64_t n;
    if (fl_h5_read_strings(u->f, path, &s, &n) < 0) return raise(L);
    push_strings(L, s, n);
    fl_h5_free_strings(s, n);
    return 1;
  }
  fl_tensor *t = fl_lua_newtensor(L);
  if (fl_h5_read(u->f, path, t) < 0) {
    if (!fl_last_failure_was_oom()) return raise(L);
    lua_gc(L, LUA_GCCOLLECT);                    /* big tensors may be garbage: collect once, retry */
    if (fl_h5_read(u->f, path, t) < 0) return raise(L);
  }
  return 1;
}

/* f:read_slice(path, start, count): rows start..start+count-1 (1-based) along dim 1 */
static int l_read_slice(lua_State *L) {
  lh5 *u = checkfile(L, "read_slice");
  const char *path = luaL_checkstring(L, 2);
  lua_Integer start = luaL_checkinteger(L, 3), count = luaL_checkinteger(L, 4);
  luaL_argcheck(L, start >= 1, 3, "start row must be >= 1");
  luaL_argcheck(L, count >= 0, 4, "row count must be >= 0");
  fl_tensor *t = fl_lua_newtensor(L);
  if (fl_h5_read_slice(u->f, path, start - 1, count, t) < 0) {
    if (!fl_last_failure_was_oom()) return raise(L);
    lua_gc(L, LUA_GCCOLLECT);
    if (fl_h5_read_slice(u->f, path, start - 1, count, t) < 0) return raise(L);
  }
  return 1;
}

/* f:prefetch(path, start, count): starts reading rows start..start+count-1 in the background */
static int l_prefetch(lua_State *L) {
  lh5 *u = checkfile(L, "prefetch");
  const char *path = luaL_checkstring(L, 2);
  lua_Integer start = luaL_checkinteger(L, 3), count = luaL_checkinteger(L, 4);
  luaL_argcheck(L, start >= 1, 3, "start row must be >= 1");
  if (fl_h5_prefetch(u->f, path, start - 1, count) < 0) return raise(L);
  return 0;
}

/* A Lua list of strings at `idx` as a C array borrowing Lua's strings (valid while they stay on
 * the stack: they are referenced by the table at idx). */
static const char **check_string_list(lua_State *L, int idx, const char *op, int64_t *n) {
  lua_Integer len = luaL_len(L, idx);
  const char **s = lua_newuserdatauv(L, (size_t)(len > 0 ? len : 1) * sizeof *s, 0);  /* freed by GC */
  for (lua_Integer i = 1; i <= len; i++) {
    if (lua_rawgeti(L, idx, i) != LUA_TSTRING)
      luaL_error(L, "h5.%s: element %d of the list is a %s, expected a string", op, (int)i,
                 luaL_typename(L, -1));
    s[i - 1] = lua_tostring(L, -1);
    lua_pop(L, 1);
  }
  *n = len;
  return s;
}

static void check_opts(lua_State *L, int idx, fl_h5_write_opts *o) {
  memset(o, 0, sizeof *o);
  if (lua_isnoneornil(L, idx)) return;
  luaL_checktype(L, idx, LUA_TTABLE);
  if (lua_getfield(L, idx, "compress") != LUA_TNIL) {
    if (lua_isboolean(L, -1)) o->compress = lua_toboolean(L, -1) ? 4 : 0;
    else o->compress = (int)luaL_checkinteger(L, -1);
  }
  lua_pop(L, 1);
  if (lua_getfield(L, idx, "chunk") != LUA_TNIL) {
    luaL_checktype(L, -1, LUA_TTABLE);
    lua_Integer n = luaL_len(L, -1);
    if (n < 1 || n > FL_MAXDIM) luaL_error(L, "h5.write: chunk must list 1..%d sizes", FL_MAXDIM);
    o->nchunk = (int)n;
    for (int i = 0; i < n; i++) {
      lua_rawgeti(L, -1, i + 1);
      o->chunk[i] = (int64_t)luaL_checkinteger(L, -1);
      lua_pop(L, 1);
    }
  }
  lua_pop(L, 1);
}

/* f:write(path, tensor | {strings}, [{chunk={...}, compress=0..9}]) */
static int l_write(lua_State *L) {
  lh5 *u = checkfile(L, "write");
  const char *path = luaL_checkstring(L, 2);
  if (lua_istable(L, 3) && !fl_lua_totensor(L, 3)) {
    int64_t n;
    const char **s = check_string_list(L, 3, "write", &n);
    if (fl_h5_write_strings(u->f, path, s, n) < 0) return raise(L);
    return 0;
  }
  fl_tensor *t = fl_lua_checktensor(L, 3);
  fl_h5_write_opts o;
  check_opts(L, 4, &o);
  if (fl_h5_write(u->f, path, t, &o) < 0) return raise(L);
  return 0;
}

/* f:append_rows(path, tensor) -> total rows now in the dataset */
static int l_append_rows(lua_State *L) {
  lh5 *u = checkfile(L, "append_rows");
  const char *path = luaL_checkstring(L, 2);
  fl_tensor *t = fl_lua_checktensor(L, 3);
  int64_t total = 0;
  if (fl_h5_append_rows(u->f, path, t, &total) < 0) return raise(L);
  lua_pushinteger(L, (lua_Integer)total);
  return 1;
}

/* f:truncate_rows(path, rows): keeps the first `rows` rows of an extendible dataset */
static int l_truncate_rows(lua_State *L) {
  lh5 *u = checkfile(L, "truncate_rows");
  const char *path = luaL_checkstring(L, 2);
  lua_Integer rows = luaL_checkinteger(L, 3);
  if (fl_h5_truncate_rows(u->f, path, (int64_t)rows) < 0) return raise(L);
  return 0;
}

static int l_exists(lua_State *L) {
  lh5 *u = checkfile(L, "exists");
  int k = fl_h5_kind(u->f, luaL_checkstring(L, 2));
  if (k < 0) return raise(L);
  lua_pushboolean(L, k != FL_H5_NONE);
  return 1;
}

static int l_kind(lua_State *L) {
  lh5 *u = checkfile(L, "kind");
  int k = fl_h5_kind(u->f, luaL_checkstring(L, 2));
  if (k < 0) return raise(L);
  if (k == FL_H5_NONE) lua_pushnil(L);
  else lua_pushstring(L, k == FL_H5_GROUP ? "group" : k == FL_H5_DATASET ? "dataset" : "other");
  return 1;
}

static int l_list(lua_State *L) {
  lh5 *u = checkfile(L, "list");
  char **s;
  int64_t n;
  if (fl_h5_list(u->f, luaL_optstring(L, 2, "/"), &s, &n) < 0) return raise(L);
  push_strings(L, s, n);
  fl_h5_free_strings(s, n);
  return 1;
}

static int l_remove(lua_State *L) {
  lh5 *u = checkfile(L, "remove");
  if (fl_h5_remove(u->f, luaL_checkstring(L, 2)) < 0) return raise(L);
  return 0;
}

static int l_create_group(lua_State *L) {
  lh5 *u = checkfile(L, "create_group");
  if (fl_h5_create_group(u->f, luaL_checkstring(L, 2)) < 0) return raise(L);
  return 0;
}

static int l_shape(lua_State *L) {
  lh5 *u = checkfile(L, "shape");
  int ndim, is_string;
  int64_t shape[FL_MAXDIM];
  fl_dtype dt;
  if (fl_h5_info(u->f, "shape", luaL_checkstring(L, 2), &ndim, shape, &dt, &is_string) < 0) return raise(L);
  lua_createtable(L, ndim, 0);
  for (int i = 0; i < ndim; i++) {
    lua_pushinteger(L, (lua_Integer)shape[i]);
    lua_rawseti(L, -2, i + 1);
  }
  return 1;
}

/* f:dtype(path) -> 'float32' | 'float64' | 'int32' | 'int64' | 'uint8' | 'string' */
static int l_dtype(lua_State *L) {
  lh5 *u = checkfile(L, "dtype");
  int ndim, is_string;
  int64_t shape[FL_MAXDIM];
  fl_dtype dt;
  if (fl_h5_info(u->f, "dtype", luaL_checkstring(L, 2), &ndim, shape, &dt, &is_string) < 0) return raise(L);
  lua_pushstring(L, is_string ? "string" : fl_dtype_name(dt));
  return 1;
}

/* f:attr(path, name) -> string | number | list, or nil when the object has no such attribute */
static int l_attr(lua_State *L) {
  lh5 *u = checkfile(L, "attr");
  const char *path = luaL_checkstring(L, 2), *name = luaL_checkstring(L, 3);
  fl_h5_attr a;
  int r = fl_h5_attr_get(u->f, path, name, &a);
  if (r < 0) return raise(L);
  if (r == 0) { lua_pushnil(L); return 1; }
  int64_t n = a.n;
  if (!a.scalar) lua_createtable(L, n > 0 && n < (1 << 24) ? (int)n : 0, 0);
  for (int64_t i = 0; i < n; i++) {
    if (a.kind == FL_H5A_STRING) lua_pushstring(L, a.s[i]);
    else if (a.kind == FL_H5A_INT) lua_pushinteger(L, (lua_Integer)a.i[i]);
    else lua_pushnumber(L, a.d[i]);
    if (a.scalar) break;
    lua_rawseti(L, -2, (lua_Integer)i + 1);
  }
  if (a.scalar && n == 0) lua_pushnil(L);
  fl_h5_attr_free(&a);
  return 1;
}

/* f:set_attr(path, name, value): value a string, a number, a boolean or a list of one of those.
 * An empty list is written as Keras 1 writes `[]` (0-length float64). */
static int l_set_attr(lua_State *L) {
  lh5 *u = checkfile(L, "set_attr");
  const char *path = luaL_checkstring(L, 2), *name = luaL_checkstring(L, 3);
  fl_h5_attr a;
  memset(&a, 0, sizeof a);
  int t = lua_type(L, 4);
  if (t == LUA_TSTRING || t == LUA_TNUMBER || t == LUA_TBOOLEAN) {
    a.scalar = 1;
    a.n = 1;
    lua_pushvalue(L, 4);
    lua_newtable(L);
    lua_insert(L, -2);
    lua_rawseti(L, -2, 1);         /* wrap the value as a one-element list at the top */
  } else if (t == LUA_TTABLE) {
    lua_pushvalue(L, 4);
    a.n = luaL_len(L, -1);
  } else {
    return luaL_error(L, "h5.set_attr: %s@%s: expected a string, number, boolean or list, got %s",
                      path, name, luaL_typename(L, 4));
  }
  int list = lua_gettop(L);
  /* The kind of the first element decides; every element must agree. */
  int kind = -1, all_int = 1;
  for (lua_Integer i = 1; i <= a.n; i++) {
    int et = lua_rawgeti(L, list, i);
    int k = et == LUA_TSTRING ? FL_H5A_STRING : (et == LUA_TNUMBER || et == LUA_TBOOLEAN) ? FL_H5A_INT : -2;
    if (k == -2 || (kind >= 0 && k != kind))
      return luaL_error(L, "h5.set_attr: %s@%s: element %d is a %s; a list holds all strings or all numbers",
                        path, name, (int)i, luaL_typename(L, -1));
    if (et == LUA_TNUMBER && !lua_isinteger(L, -1)) all_int = 0;
    kind = k;
    lua_pop(L, 1);
  }
  size_t cnt = (size_t)(a.n > 0 ? a.n : 1);
  /* Scratch arrays live in userdata so that a Lua error below cannot leak them. */
  if (kind == FL_H5A_STRING) {
    a.kind = FL_H5A_STRING;
    a.s = lua_newuserdatauv(L, cnt * sizeof *a.s, 0);
    for (lua_Integer i = 1; i <= a.n; i++) {
      lua_rawgeti(L, list, i);
      a.s[i - 1] = (char *)lua_tostring(L, -1);   /* kept alive by the list */
      lua_pop(L, 1);
    }
  } else if (all_int) {
    a.kind = FL_H5A_INT;
    a.i = lua_newuserdatauv(L, cnt * sizeof *a.i, 0);
    for (lua_Integer i = 1; i <= a.n; i++) {
      int et = lua_rawgeti(L, list, i);
      a.i[i - 1] = et == LUA_TBOOLEAN ? lua_toboolean(L, -1) : (int64_t)lua_tointeger(L, -1);
      lua_pop(L, 1);
    }
  } else {
    a.kind = FL_H5A_FLOAT;
    a.d = lua_newuserdatauv(L, cnt * sizeof *a.d, 0);
    for (lua_Integer i = 1; i <= a.n; i++) {
      int et = lua_rawgeti(L, list, i);
      a.d[i - 1] = et == LUA_TBOOLEAN ? lua_toboolean(L, -1) : lua_tonumber(L, -1);
      lua_pop(L, 1);
    }
  }
  if (fl_h5_attr_set(u->f, path, name, &a) < 0) return raise(L);
  return 0;
}

static int l_attrs(lua_State *L) {
  lh5 *u = checkfile(L, "attrs");
  char **s;
  int64_t n;
  if (fl_h5_attr_names(u->f, luaL_optstring(L, 2, "/"), &s, &n) < 0) return raise(L);
  push_strings(L, s, n);
  fl_h5_free_strings(s, n);
  return 1;
}

static int l_isopen(lua_State *L) {
  lh5 *u = luaL_checkudata(L, 1, H5FILE_MT);
  lua_pushboolean(L, u->f != NULL);
  return 1;
}

static int l_untrusted(lua_State *L) {
  lh5 *u = checkfile(L, "untrusted");
  lua_pushboolean(L, fl_h5_untrusted(u->f));
  return 1;
}

static int l_mode(lua_State *L) {
  lh5 *u = checkfile(L, "mode");
  lua_pushlstring(L, &u->mode, 1);
  return 1;
}

static int l_fsync(lua_State *L) {
  if (fl_h5_fsync_path(luaL_checkstring(L, 1)) < 0) return raise(L);
  return 0;
}

static int l_getpid(lua_State *L) {
  lua_pushinteger(L, (lua_Integer)getpid());
  return 1;
}

static const luaL_Reg file_methods[] = {
  {"read", l_read}, {"read_slice", l_read_slice}, {"prefetch", l_prefetch}, {"write", l_write},
  {"append_rows", l_append_rows}, {"truncate_rows", l_truncate_rows}, {"exists", l_exists}, {"kind", l_kind}, {"list", l_list},
  {"remove", l_remove}, {"create_group", l_create_group}, {"shape", l_shape}, {"dtype", l_dtype}, {"attr", l_attr},
  {"set_attr", l_set_attr}, {"attrs", l_attrs}, {"flush", l_flush}, {"close", l_close},
  {"filename", l_filename}, {"isopen", l_isopen}, {"mode", l_mode}, {"untrusted", l_untrusted},
  {NULL, NULL},
};

static const luaL_Reg file_meta[] = {
  {"__gc", l_gc}, {"__close", l_gc}, {"__tostring", l_tostring}, {NULL, NULL},
};

static const luaL_Reg h5_funcs[] = {
  {"open", l_open}, {"fsync", l_fsync}, {"getpid", l_getpid}, {NULL, NULL},
};

/* Registers `_h5` (open, fsync, getpid) into the module table at the top of the stack. The Lua
 * module flower.h5 builds on it; the underscore keeps `require 'flower'`'s copy of flower.core's
 * fields from shadowing the lazily loaded flower.h5. */
void fl_lua_open_h5(lua_State *L) {
  if (luaL_newmetatable(L, H5FILE_MT)) {
    luaL_setfuncs(L, file_meta, 0);
    luaL_newlib(L, file_methods);
    lua_setfield(L, -2, "__index");
  }
  lua_pop(L, 1);
  luaL_newlib(L, h5_funcs);
  lua_setfield(L, -2, "_h5");
}
