/* Lua binding of core/dist.h: flower.core._dist = { init, rank, size, local_rank, local_size,
 * has_mpi, has_nccl, launched_size, barrier, allreduce, broadcast, all_gather, allreduce_grads,
 * allreduce_numbers, timeout, set_timeout, broken, stats }. scripts/flower/dist.lua is the face
 * users see (flower.dist); this file only converts arguments and raises the core's messages. */
#include "lflower.h"
#include "l_tensor.h"
#include "dist.h"

#include <stdlib.h>
#include <string.h>

static void check_init(lua_State *L) {
  if (fl_dist_init() < 0) fl_lua_error(L);
}

static int l_init(lua_State *L) { check_init(L); return 0; }
static int l_rank(lua_State *L) { check_init(L); lua_pushinteger(L, fl_dist_rank()); return 1; }
static int l_size(lua_State *L) { check_init(L); lua_pushinteger(L, fl_dist_size()); return 1; }
static int l_local_rank(lua_State *L) { check_init(L); lua_pushinteger(L, fl_dist_local_rank()); return 1; }
static int l_local_size(lua_State *L) { check_init(L); lua_pushinteger(L, fl_dist_local_size()); return 1; }
static int l_has_mpi(lua_State *L) { lua_pushboolean(L, fl_dist_has_mpi()); return 1; }
static int l_has_nccl(lua_State *L) { lua_pushboolean(L, fl_dist_has_nccl()); return 1; }
static int l_broken(lua_State *L) { lua_pushboolean(L, fl_dist_broken()); return 1; }
static int l_timeout(lua_State *L) { lua_pushnumber(L, fl_dist_timeout()); return 1; }

/* launched_size() -> n, variable: what the launcher's environment announces, without starting MPI */
static int l_launched_size(lua_State *L) {
  const char *var;
  lua_pushinteger(L, fl_dist_env_size(&var));
  lua_pushstring(L, var);
  return 2;
}

static int l_set_timeout(lua_State *L) {
  if (fl_dist_set_timeout(luaL_checknumber(L, 1)) < 0) return fl_lua_error(L);
  return 0;
}

static fl_dist_op check_op(lua_State *L, int arg, const char *fname) {
  static const char *const names[] = {"sum", "mean", "max", "min", NULL};
  const char *s = luaL_optstring(L, arg, "sum");
  for (int i = 0; names[i]; i++) if (strcmp(s, names[i]) == 0) return (fl_dist_op)i;
  luaL_error(L, "%s: op must be 'sum', 'mean', 'max' or 'min', got '%s'", fname, s);
  return FL_DIST_SUM;
}

static int l_barrier(lua_State *L) {
  if (fl_dist_barrier() < 0) return fl_lua_error(L);
  return 0;
}

/* allreduce(t, op = 'sum') -> t (in place) */
static int l_allreduce(lua_State *L) {
  fl_tensor *t = fl_lua_checktensor(L, 1);
  fl_dist_op op = check_op(L, 2, "dist.allreduce");
  if (fl_dist_allreduce(t, op) < 0) return fl_lua_error(L);
  lua_settop(L, 1);
  return 1;
}

/* broadcast(t, root = 0) -> t (in place); root is a 0-based rank, as rank() gives */
static int l_broadcast(lua_State *L) {
  fl_tensor *t = fl_lua_checktensor(L, 1);
  lua_Integer root = luaL_optinteger(L, 2, 0);
  if (root < 0 || root > 1 << 30) return luaL_error(L, "dist.broadcast: root must be a rank >= 0, got %d", (int)root);
  if (fl_dist_broadcast(t, (int)root) < 0) return fl_lua_error(L);
  lua_settop(L, 1);
  return 1;
}

/* all_gather(t) -> a new tensor: every rank's t along dim 1, in rank order */
static int l_all_gather(lua_State *L) {
  fl_tensor *t = fl_lua_checktensor(L, 1);
  fl_tensor *out = fl_lua_newtensor(L);
  if (fl_dist_all_gather(out, t) < 0) return fl_lua_error(L);
  return 1;
}

/* allreduce_grads({tensors}, scale = 1, bucket_bytes = 25 MB): sum of scale * t across ranks, in place */
static int l_allreduce_grads(lua_State *L) {
  luaL_checktype(L, 1, LUA_TTABLE);
  double scale = luaL_optnumber(L, 2, 1.0);
  lua_Integer bucket = luaL_optinteger(L, 3, 25 << 20);
  if (bucket < 1) return luaL_error(L, "dist.allreduce_grads: bucket_bytes must be positive, got %d", (int)bucket);
  int n = (int)luaL_len(L, 1);
  fl_tensor **ts = lua_newuserdatauv(L, sizeof(fl_tensor *) * (size_t)(n > 0 ? n : 1), 0);  /* freed by the GC */
  for (int i = 0; i < n; i++) {
    lua_geti(L, 1, i + 1);
    ts[i] = fl_lua_totensor(L, -1);
    if (!ts[i]) return luaL_error(L, "dist.allreduce_grads: entry %d is not a tensor", i + 1);
    lua_pop(L, 1);          /* the table keeps it alive */
  }
  if (fl_dist_allreduce_many(n, ts, scale, (size_t)bucket) < 0) return fl_lua_error(L);
  return 0;
}

/* allreduce_numbers({numbers}, op = 'sum') -> a new list with the reduced values */
static int l_allreduce_numbers(lua_State *L) {
  luaL_checktype(L, 1, LUA_TTABLE);
  fl_dist_op op = check_op(L, 2, "dist.allreduce_numbers");
  int n = (int)luaL_len(L, 1);
  double *v = lua_newuserdatauv(L, sizeof(double) * (size_t)(n > 0 ? n : 1), 0);
  for (int i = 0; i < n; i++) {
    lua_geti(L, 1, i + 1);
    int ok;
    v[i] = lua_tonumberx(L, -1, &ok);
    if (!ok) return luaL_error(L, "dist.allreduce_numbers: entry %d is not a number", i + 1);
    lua_pop(L, 1);
  }
  if (fl_dist_allreduce_doubles(v, n, op) < 0) return fl_lua_error(L);
  lua_createtable(L, n, 0);
  for (int i = 0; i < n; i++) {
    lua_pushnumber(L, v[i]);
    lua_seti(L, -2, i + 1);
  }
  return 1;
}

/* stats() -> seconds in collectives, bytes reduced, calls */
static int l_stats(lua_State *L) {
  double s, b;
  long c;
  fl_dist_stats(&s, &b, &c);
  lua_pushnumber(L, s);
  lua_pushnumber(L, b);
  lua_pushinteger(L, c);
  return 3;
}

static const luaL_Reg dist_funcs[] = {
  {"init", l_init}, {"rank", l_rank}, {"size", l_size}, {"local_rank", l_local_rank},
  {"local_size", l_local_size}, {"has_mpi", l_has_mpi}, {"has_nccl", l_has_nccl},
  {"launched_size", l_launched_size}, {"barrier", l_barrier}, {"allreduce", l_allreduce},
  {"broadcast", l_broadcast}, {"all_gather", l_all_gather}, {"allreduce_grads", l_allreduce_grads},
  {"allreduce_numbers", l_allreduce_numbers}, {"timeout", l_timeout}, {"set_timeout", l_set_timeout},
  {"broken", l_broken}, {"stats", l_stats},
  {NULL, NULL},
};

void fl_lua_open_dist(lua_State *L) {
  lua_newtable(L);
  luaL_setfuncs(L, dist_funcs, 0);
  lua_setfield(L, -2, "_dist");
}
