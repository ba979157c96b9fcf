/* The flower.Tensor userdata: creation, dtypes, views, indexing and queries.
 * Math lives in l_tensor_math.c, printing in l_tensor_print.c.
 *
 * Conventions on the Lua side (other bindings follow them):
 * - Dims and indices are 1-based, like Torch7 and Lua itself; a negative dim or index counts from
 *   the end (-1 is the last). C (core/) is 0-based; the binding translates.
 * - Ranges are inclusive: t:narrow(dim, start, len) and t[{{a, b}}] cover a..b; arange(a, b) is
 *   numpy's half-open [a, b) (it is numpy's function), randint(lo, hi) is inclusive like
 *   math.random(lo, hi).
 * - argmax/argmin and the indices from max(dim)/min(dim) are 1-based int64.
 * - Reductions over everything (t:sum(), t:max()) return a 0-dim tensor: t:sum():item() is the
 *   number. t[i] on a 1-d tensor, t:item() and totable() give Lua numbers (integers for integer
 *   dtypes).
 * - The default dtype is float32; numbers mixed with tensors take the tensor's dtype, except a
 *   non-integer number with an integer tensor, which gives float32.
 * - __eq is identity (Lua's default): compare values with t:eq(u) (a uint8 mask) or t:equal(u).
 * - Views (view, transpose, narrow, select, expand, t[i], slicing) share storage with their base;
 *   the storage is reference-counted in C, so a view keeps it alive after the base is collected.
 * - Random numbers: one global Philox4x32-10 generator (core/rng.h documents the streams);
 *   flower.manual_seed(s) restarts it, get_rng_state()/set_rng_state() save and restore it.
 * - Memory: storage is freed when the last tensor using it is collected, or at once with t:free()
 *   or `local t <close>`; a freed tensor raises "the tensor has been freed" when used. Because Lua
 *   cannot see storage bytes, fl_lua_newtensor runs a full collection when they have doubled.
 * - Devices: creation functions make CPU tensors; t:cuda() / t:cpu() (l_cuda.c) move them. Every op
 *   runs on its operands' device, and operands on different devices are an error naming both
 *   ("add: tensors are on different devices (cpu and cuda:0); ..."): nothing moves implicitly.
 *   Functions that hand elements to Lua read a temporary host copy of a device tensor, so they work
 *   anywhere (slowly: one transfer each): t:item(), t[i] giving a number, t:totable(), tostring(t),
 *   t:equal(u), t:tostring_raw(). Writes go through the device's own kernels: t[i] = v,
 *   t[{...}] = u, t:fill(v), t:copy(u) (u may be on another device: that is the explicit copy).
 *   Bindings that need host memory itself (image encoding, ...) refuse device tensors with
 *   fl_lua_checkhost ("fname: the tensor is on cuda:0; call t:cpu() first"). */
#include "l_tensor.h"
#include "rng.h"

#include <math.h>
#include <string.h>

/* ---------------------------------------------------------------- userdata basics */

/* Lua's collector sees a tensor as a 100-byte userdata, not the megabytes of its storage, so a
 * loop making temporaries would pile them up for a long time. Like Lua's own pacing (a collection
 * when the heap doubles), run a full collection when storage bytes have doubled since the last
 * one we ran and exceed GC_FLOOR. Storage of other states/threads counts too: that only makes
 * collections a little early. */
#define GC_FLOOR ((size_t)256 << 20)
static size_t gc_base;

static void gc_pace(lua_State *L) {
  size_t live = fl_storage_live_bytes();
  size_t base = __atomic_load_n(&gc_base, __ATOMIC_RELAXED);
  if (live > GC_FLOOR && live > 2 * base) {
    lua_gc(L, LUA_GCCOLLECT);
    __atomic_store_n(&gc_base, fl_storage_live_bytes(), __ATOMIC_RELAXED);
  }
}

fl_tensor *fl_lua_newtensor(lua_State *L) {
  gc_pace(L);
  fl_tensor *t = lua_newuserdatauv(L, sizeof *t, 0);
  memset(t, 0, sizeof *t);
  luaL_setmetatable(L, FL_TENSOR_MT);
  return t;
}

fl_tensor *fl_lua_totensor(lua_State *L, int idx) {
  fl_tensor *t = luaL_testudata(L, idx, FL_TENSOR_MT);
  return t && t->storage ? t : NULL;
}

fl_tensor *fl_lua_checktensor(lua_State *L, int idx) {
  fl_tensor *t = luaL_checkudata(L, idx, FL_TENSOR_MT);
  if (!t->storage) luaL_argerror(L, idx, "the tensor has been freed (closed)");
  return t;
}

int fl_lua_error(lua_State *L) { return luaL_error(L, "%s", fl_errmsg()); }

/* __gc and __close: tolerate repeated calls (storage NULL after the first) */
static int t_gc(lua_State *L) {
  fl_tensor *t = luaL_checkudata(L, 1, FL_TENSOR_MT);
  fl_tensor_free(t);
  return 0;
}

static fl_tensor *push_view(lua_State *L, const fl_tensor *src) {
  fl_tensor *v = fl_lua_newtensor(L);
  fl_tensor_init_view(v, src);
  return v;
}

/* ---------------------------------------------------------------- argument helpers */

int fl_lua_checkdim(lua_State *L, int arg, int ndim, int extra, const char *fname) {
  lua_Integer d = luaL_checkinteger(L, arg);
  int n = ndim + extra;
  if (d < 0) d += n + 1;
  if (d < 1 || d > n) {
    if (n == 0) return luaL_error(L, "%s: dim %d out of range for a 0-d tensor", fname, (int)luaL_checkinteger(L, arg));
    return luaL_error(L, "%s: dim %I out of range for a %d-d tensor (expected 1..%d or -%d..-1)", fname,
                      luaL_checkinteger(L, arg), ndim, n, n);
  }
  return (int)d - 1;
}

static int64_t check_size_elem(lua_State *L, int isnum, lua_Integer v, const char *fname, int i) {
  if (!isnum) luaL_error(L, "%s: size %d must be an integer", fname, i);
  if (v < -1 || v > ((lua_Integer)1 << 53)) luaL_error(L, "%s: invalid size %I at position %d", fname, v, i);
  return v;
}

int fl_lua_checksize(lua_State *L, int arg, int64_t *shape, int *next, const char *fname) {
  int n = 0;
  if (lua_istable(L, arg) && !fl_lua_totensor(L, arg)) {
    int len = (int)luaL_len(L, arg);
    if (len > FL_MAXDIM) luaL_error(L, "%s: at most %d dims, got %d", fname, FL_MAXDIM, len);
    for (int i = 1; i <= len; i++) {
      lua_rawgeti(L, arg, i);
      int isnum;
      lua_Integer v = lua_tointegerx(L, -1, &isnum);
      shape[n] = check_size_elem(L, isnum, v, fname, i);
      n++;
      lua_pop(L, 1);
    }
    *next = arg + 1;
    return n;
  }
  int a = arg;
  while (lua_type(L, a) == LUA_TNUMBER) {
    if (n >= FL_MAXDIM) luaL_error(L, "%s: at most %d dims", fname, FL_MAXDIM);
    int isnum;
    lua_Integer v = lua_tointegerx(L, a, &isnum);
    shape[n] = check_size_elem(L, isnum, v, fname, n + 1);
    n++;
    a++;
  }
  *next = a;
  return n;
}

fl_dtype fl_lua_optdtype(lua_State *L, int arg, fl_dtype def, const char *fname) {
  if (lua_isnoneornil(L, arg)) return def;
  if (lua_type(L, arg) != LUA_TSTRING)
    luaL_error(L, "%s: expected a dtype name (float32, float64, bfloat16, int32, int64, uint8), got %s", fname,
               luaL_typename(L, arg));
  fl_dtype dt;
  if (fl_dtype_from_name(lua_tostring(L, arg), &dt)) luaL_error(L, "%s: %s", fname, fl_errmsg());
  return dt;
}

const fl_tensor *fl_lua_tensorarg(lua_State *L, int arg, const fl_tensor *like, fl_tensor *tmp, const char *fname) {
  memset(tmp, 0, sizeof *tmp);
  if (lua_type(L, arg) == LUA_TNUMBER) {
    double v = lua_tonumber(L, arg);
    fl_dtype dt = like ? like->dtype : FL_F32;
    if (!fl_dtype_is_float(dt) && !lua_isinteger(L, arg)) dt = FL_F32;
    /* tmp is freed by the caller; a failure here has nothing to free yet */
    if (fl_tensor_init_scalar(tmp, like ? like->storage->backend : &fl_cpu_backend,
                              like ? like->storage->device : 0, dt, v))
      luaL_error(L, "%s: %s", fname, fl_errmsg());
    return tmp;
  }
  fl_tensor *t = luaL_testudata(L, arg, FL_TENSOR_MT);
  if (!t) luaL_error(L, "%s: expected a tensor or a number at argument %d, got %s", fname, arg, luaL_typename(L, arg));
  if (!t->storage) luaL_error(L, "%s: argument %d is a freed (closed) tensor", fname, arg);
  return t;
}

void fl_lua_checkhost(lua_State *L, const fl_tensor *t, const char *fname) {
  if (fl_tensor_is_host(t)) return;
  if (!t->storage) luaL_error(L, "%s: the tensor has been freed (closed)", fname);
  char d[80];
  fl_device_str(d, sizeof d, t);
  luaL_error(L, "%s: the tensor is on %s; call t:cpu() first", fname, d);
}

const fl_tensor *fl_lua_tohost(lua_State *L, const fl_tensor *t, const char *fname) {
  if (fl_tensor_is_host(t)) { lua_pushnil(L); return t; }
  if (!t->storage) luaL_error(L, "%s: the tensor has been freed (closed)", fname);
  /* t may be a view held only in a C struct: its storage is kept alive by the caller's tensor on
   * the Lua stack, so the collection fl_lua_newtensor may run cannot free it */
  fl_tensor src = *t;
  fl_tensor *h = fl_lua_newtensor(L);
  int rc = fl_tensor_init(h, &fl_cpu_backend, 0, src.dtype, src.ndim, src.shape);
  if (rc && fl_last_failure_was_oom()) {
    lua_gc(L, LUA_GCCOLLECT);
    rc = fl_tensor_init(h, &fl_cpu_backend, 0, src.dtype, src.ndim, src.shape);
  }
  if (!rc) rc = fl_copy_into(h, &src);
  if (rc) {
    char d[80];
    fl_device_str(d, sizeof d, &src);
    luaL_error(L, "%s: copying the tensor from %s to the cpu failed: %s", fname, d, fl_errmsg());
  }
  return h;
}

/* element `index` of a host tensor */
static void push_host_elem(lua_State *L, const fl_tensor *t, const int64_t *index) {
  const char *p = (const char *)t->storage->data;
  int64_t off = t->offset;
  for (int i = 0; i < t->ndim; i++) off += index[i] * t->stride[i];
  switch (t->dtype) {
  case FL_F32: lua_pushnumber(L, ((const float *)p)[off]); break;
  case FL_F64: lua_pushnumber(L, ((const double *)p)[off]); break;
  case FL_I32: lua_pushinteger(L, ((const int32_t *)p)[off]); break;
  case FL_I64: lua_pushinteger(L, ((const int64_t *)p)[off]); break;
  case FL_BF16: lua_pushnumber(L, fl_bf16_to_float(((const uint16_t *)p)[off])); break;
  default: lua_pushinteger(L, ((const uint8_t *)p)[off]); break;
  }
}

void fl_lua_pushelem(lua_State *L, const fl_tensor *t, const int64_t *index) {
  if (fl_tensor_is_host(t)) { push_host_elem(L, t, index); return; }
  /* device memory: copy the one element (a 0-d view of it) to the host */
  fl_tensor v = *t;
  for (int i = 0; i < v.ndim; i++) v.offset += index[i] * v.stride[i];
  v.ndim = 0;
  const fl_tensor *h = fl_lua_tohost(L, &v, "element read");
  push_host_elem(L, h, NULL);
  lua_remove(L, -2);
}

/* ---------------------------------------------------------------- creation */

/* Makes a tensor of the size at stack index `arg` (varargs or a table), then an optional fill value
 * (`has_value`), then an optional dtype, on `like`'s backend and device (the host when NULL) and of
 * its dtype by default. Shared by flower.zeros/ones/empty/full and t:new_zeros/new_empty/new_full,
 * so that device-side buffers (gradients, masks, optimizer slots) are made where they are used. */
static int create(lua_State *L, const char *fname, const fl_tensor *like, int arg, int has_value,
                  int fill, double value) {
  int64_t shape[FL_MAXDIM];
  int next;
  /* an explicit nil is a mistake (an unset variable), not the empty size of a 0-d tensor */
  if (lua_isnil(L, arg) && !lua_isnone(L, arg))
    return luaL_error(L, "%s: expected a size (integers or a table of them), got nil", fname);
  int n = fl_lua_checksize(L, arg, shape, &next, fname);
  if (has_value) {
    if (lua_type(L, next) != LUA_TNUMBER)
      return luaL_error(L, "%s: expected a fill value after the size, got %s", fname, luaL_typename(L, next));
    value = lua_tonumber(L, next++);
  }
  fl_dtype dt = fl_lua_optdtype(L, next, like ? like->dtype : FL_F32, fname);
  const fl_backend *be = like ? like->storage->backend : &fl_cpu_backend;
  int device = like ? like->storage->device : 0;
  fl_tensor *t = fl_lua_newtensor(L);
  FL_TRY(L, fl_tensor_init(t, be, device, dt, n, shape) ? fl_fail_prefix(fname) : 0);
  if (fill && fl_fill(t, value)) return fl_lua_error(L);
  return 1;
}

/* zeros/ones/empty(size... [, dtype]); full(size, value [, dtype]) */
static int l_zeros(lua_State *L) { return create(L, "zeros", NULL, 1, 0, 1, 0); }
static int l_ones(lua_State *L) { return create(L, "ones", NULL, 1, 0, 1, 1); }
static int l_empty(lua_State *L) { return create(L, "empty", NULL, 1, 0, 0, 0); }
static int l_full(lua_State *L) { return create(L, "full", NULL, 1, 1, 1, 0); }

/* t:new_zeros/new_empty(size... [, dtype]), t:new_full(size, value [, dtype]): on t's device,
 * of t's dtype unless another is given */
static int t_new_zeros(lua_State *L) { return create(L, "new_zeros", fl_lua_checktensor(L, 1), 2, 0, 1, 0); }
static int t_new_empty(lua_State *L) { return create(L, "new_empty", fl_lua_checktensor(L, 1), 2, 0, 0, 0); }
static int t_new_full(lua_State *L) { return create(L, "new_full", fl_lua_checktensor(L, 1), 2, 1, 1, 0); }

/* tensor(nested table | number | tensor [, dtype]) */
typedef struct {
  int ndim;
  int64_t shape[FL_MAXDIM];
} nest_shape;

/* shape from the first elements; raggedness is found while filling */
static void nest_infer(lua_State *L, int idx, nest_shape *ns) {
  ns->ndim = 0;
  lua_pushvalue(L, idx);
  for (;;) {
    if (lua_type(L, -1) != LUA_TTABLE || fl_lua_totensor(L, -1)) break;
    if (ns->ndim >= FL_MAXDIM) luaL_error(L, "tensor: nested table is deeper than %d", FL_MAXDIM);
    int64_t len = (int64_t)lua_rawlen(L, -1);
    ns->shape[ns->ndim++] = len;
    if (len == 0) break;
    lua_rawgeti(L, -1, 1);
    lua_remove(L, -2);
  }
  lua_pop(L, 1);
}

static void nest_fill(lua_State *L, const nest_shape *ns, int depth, fl_tensor *t, int64_t *index) {
  /* the table being read is at the top of the stack */
  int64_t len = (int64_t)lua_rawlen(L, -1);
  if (len != ns->shape[depth])
    luaL_error(L, "tensor: nested table is ragged at depth %d (expected %I elements, got %I)", depth + 1,
               (lua_Integer)ns->shape[depth], (lua_Integer)len);
  for (int64_t i = 0; i < len; i++) {
    index[depth] = i;
    int ty = lua_rawgeti(L, -1, (lua_Integer)i + 1);
    if (depth + 1 < ns->ndim) {
      if (ty != LUA_TTABLE) luaL_error(L, "tensor: nested table is ragged at depth %d (found a %s where a table was expected)",
                                       depth + 2, lua_typename(L, ty));
      luaL_checkstack(L, 4, "tensor: nesting too deep");
      nest_fill(L, ns, depth + 1, t, index);
    } else {
      if (ty == LUA_TNUMBER) {
        /* t is the new CPU tensor being filled: its elements are host memory */
        if (lua_isinteger(L, -1) && !fl_dtype_is_float(t->dtype) && t->dtype == FL_I64) {
          char *p = (char *)t->storage->data;
          int64_t off = t->offset;
          for (int k = 0; k < t->ndim; k++) off += index[k] * t->stride[k];
          ((int64_t *)p)[off] = lua_tointeger(L, -1);   /* exact beyond 2^53 */
        } else {
          fl_tensor_set(t, index, lua_tonumber(L, -1));
        }
      } else if (ty == LUA_TBOOLEAN) {
        fl_tensor_set(t, index, lua_toboolean(L, -1));
      } else if (ty == LUA_TTABLE) {
        luaL_error(L, "tensor: nested table is ragged at depth %d (found a table where a number was expected)", depth + 2);
      } else {
        luaL_error(L, "tensor: expected numbers in the nested table, found a %s", lua_typename(L, ty));
      }
    }
    lua_pop(L, 1);
  }
}

static int l_tensor(lua_State *L) {
  fl_dtype dt = fl_lua_optdtype(L, 2, FL_F32, "tensor");
  int ty = lua_type(L, 1);
  if (ty == LUA_TNUMBER) {
    fl_tensor *t = fl_lua_newtensor(L);
    FL_TRY(L, fl_tensor_init_scalar(t, &fl_cpu_backend, 0, dt, lua_tonumber(L, 1)));
    if (dt == FL_I64 && lua_isinteger(L, 1)) *(int64_t *)fl_tensor_data(t) = lua_tointeger(L, 1);
    return 1;
  }
  fl_tensor *src = fl_lua_totensor(L, 1);
  if (src) {   /* a copy, possibly converted */
    fl_tensor *t = fl_lua_newtensor(L);
    if (src->dtype == dt || lua_isnoneornil(L, 2)) FL_TRY(L, fl_clone(t, src));
    else FL_TRY(L, fl_cast(t, src, dt));
    return 1;
  }
  if (ty != LUA_TTABLE)
    return luaL_error(L, "tensor: expected a nested table of numbers, a number or a tensor, got %s", luaL_typename(L, 1));
  nest_shape ns;
  nest_infer(L, 1, &ns);
  fl_tensor *t = fl_lua_newtensor(L);
  FL_TRY(L, fl_tensor_init(t, &fl_cpu_backend, 0, dt, ns.ndim, ns.shape) ? fl_fail_prefix("tensor") : 0);
  int64_t index[FL_MAXDIM];
  lua_pushvalue(L, 1);
  nest_fill(L, &ns, 0, t, index);
  lua_pop(L, 1);
  return 1;
}

/* arange(n) | arange(start, stop [, step]) [, dtype] */
static int l_arange(lua_State *L) {
  int nnum = 0;
  while (nnum < 3 && lua_type(L, nnum + 1) == LUA_TNUMBER) nnum++;
  if (nnum == 0) return luaL_error(L, "arange: expected arange(n) or arange(start, stop [, step]), got %s",
                                   luaL_typename(L, 1));
  double start = 0, stop, step = 1;
  if (nnum == 1) stop = lua_tonumber(L, 1);
  else { start = lua_tonumber(L, 1); stop = lua_tonumber(L, 2); }
  if (nnum == 3) step = lua_tonumber(L, 3);
  fl_dtype dt = fl_lua_optdtype(L, nnum + 1, FL_F32, "arange");
  fl_tensor *t = fl_lua_newtensor(L);
  FL_TRY(L, fl_arange(t, start, stop, step, dt));
  return 1;
}

static int l_linspace(lua_State *L) {
  double a = luaL_checknumber(L, 1), b = luaL_checknumber(L, 2);
  lua_Integer n = luaL_checkinteger(L, 3);
  fl_dtype dt = fl_lua_optdtype(L, 4, FL_F32, "linspace");
  fl_tensor *t = fl_lua_newtensor(L);
  FL_TRY(L, fl_linspace(t, a, b, n, dt));
  return 1;
}

/* rand/randn(size... [, dtype]) */
static int create_random(lua_State *L, const char *fname, fl_rngkind kind, double p0, double p1, int arg,
                         fl_dtype def) {
  int64_t shape[FL_MAXDIM];
  int next;
  int n = fl_lua_checksize(L, arg, shape, &next, fname);
  fl_dtype dt = fl_lua_optdtype(L, next, def, fname);
  if (kind != FL_RNG_INT && !fl_dtype_is_float(dt))
    return luaL_error(L, "%s: expected a float dtype, got %s", fname, fl_dtype_name(dt));
  if (kind == FL_RNG_INT) {
    /* the range must fit the dtype */
    double lo = dt == FL_U8 ? 0 : dt == FL_I32 ? -2147483648.0 : -9.3e18;
    double hi = dt == FL_U8 ? 255 : dt == FL_I32 ? 2147483647.0 : 9.3e18;
    if (p0 < lo || p1 - 1 > hi)
      return luaL_error(L, "%s: range [%f, %f] does not fit %s", fname, p0, p1 - 1, fl_dtype_name(dt));
  }
  fl_tensor *t = fl_lua_newtensor(L);
  FL_TRY(L, fl_tensor_init(t, &fl_cpu_backend, 0, dt, n, shape) ? fl_fail_prefix(fname) : 0);
  if (fl_random_(t, kind, p0, p1)) return fl_lua_error(L);
  return 1;
}

static int l_rand(lua_State *L) { return create_random(L, "rand", FL_RNG_UNIFORM, 0, 1, 1, FL_F32); }
static int l_randn(lua_State *L) { return create_random(L, "randn", FL_RNG_NORMAL, 0, 1, 1, FL_F32); }

/* randint(lo, hi, size... [, dtype]): integers in [lo, hi] (inclusive, like math.random) */
static int l_randint(lua_State *L) {
  lua_Integer lo = luaL_checkinteger(L, 1), hi = luaL_checkinteger(L, 2);
  if (hi < lo) return luaL_error(L, "randint: empty range [%I, %I]", lo, hi);
  if ((double)hi - (double)lo >= 9.2e18) return luaL_error(L, "randint: range [%I, %I] is too wide", lo, hi);
  return create_random(L, "randint", FL_RNG_INT, (double)lo, (double)hi + 1, 3, FL_I64);
}

static int l_manual_seed(lua_State *L) {
  lua_Integer s = luaL_checkinteger(L, 1);
  fl_rng_manual_seed((uint64_t)s);
  return 0;
}

static int l_get_rng_state(lua_State *L) {
  uint64_t seed, offset;
  fl_rng_get_state(&seed, &offset);
  lua_createtable(L, 0, 2);
  lua_pushinteger(L, (lua_Integer)seed);
  lua_setfield(L, -2, "seed");
  lua_pushinteger(L, (lua_Integer)offset);
  lua_setfield(L, -2, "offset");
  return 1;
}

static int l_set_rng_state(lua_State *L) {
  luaL_checktype(L, 1, LUA_TTABLE);
  lua_getfield(L, 1, "seed");
  lua_getfield(L, 1, "offset");
  if (!lua_isinteger(L, -2) || !lua_isinteger(L, -1))
    return luaL_error(L, "set_rng_state: expected {seed = integer, offset = integer}, got seed %s and offset %s",
                      luaL_typename(L, -2), luaL_typename(L, -1));
  fl_rng_set_state((uint64_t)lua_tointeger(L, -2), (uint64_t)lua_tointeger(L, -1));
  return 0;
}

/* t:uniform_([a = 0, b = 1]), t:normal_([mean = 0, std = 1]) */
static int t_uniform_(lua_State *L) {
  fl_tensor *t = fl_lua_checktensor(L, 1);
  double a = luaL_optnumber(L, 2, 0), b = luaL_optnumber(L, 3, 1);
  if (!fl_dtype_is_float(t->dtype)) return luaL_error(L, "uniform_: expected a float tensor, got %s", fl_dtype_name(t->dtype));
  if (!(a <= b)) return luaL_error(L, "uniform_: expected a <= b, got %f and %f", a, b);
  if (fl_random_(t, FL_RNG_UNIFORM, a, b)) return fl_lua_error(L);
  lua_settop(L, 1);
  return 1;
}

static int t_normal_(lua_State *L) {
  fl_tensor *t = fl_lua_checktensor(L, 1);
  double m = luaL_optnumber(L, 2, 0), s = luaL_optnumber(L, 3, 1);
  if (!fl_dtype_is_float(t->dtype)) return luaL_error(L, "normal_: expected a float tensor, got %s", fl_dtype_name(t->dtype));
  if (fl_random_(t, FL_RNG_NORMAL, m, s)) return fl_lua_error(L);
  lua_settop(L, 1);
  return 1;
}

/* fromstring(bytes, dtype, size...): a tensor holding a copy of raw native-endian bytes */
static int l_fromstring(lua_State *L) {
  size_t len;
  const char *s = luaL_checklstring(L, 1, &len);
  if (lua_type(L, 2) != LUA_TSTRING) return luaL_error(L, "fromstring: expected a dtype name at argument 2, got %s", luaL_typename(L, 2));
  fl_dtype dt = fl_lua_optdtype(L, 2, FL_F32, "fromstring");
  int64_t shape[FL_MAXDIM];
  int next;
  int n = fl_lua_checksize(L, 3, shape, &next, "fromstring");
  size_t esz = fl_dtype_size(dt);
  if (n == 0 && lua_isnone(L, 3)) {   /* no size: 1-d over the whole string */
    if (len % esz) return luaL_error(L, "fromstring: %d bytes is not a whole number of %s elements", (int)len, fl_dtype_name(dt));
    n = 1;
    shape[0] = (int64_t)(len / esz);
  }
  uint64_t numel = 1;
  for (int i = 0; i < n; i++) {
    if (shape[i] < 0) return luaL_error(L, "fromstring: invalid size %I", (lua_Integer)shape[i]);
    numel *= (uint64_t)shape[i];
    if (numel > len) break;
  }
  char sh[200];
  fl_shape_str(sh, sizeof sh, n, shape);
  if (numel > len || numel * esz != len)
    return luaL_error(L, "fromstring: %I bytes do not hold a %s tensor of size %s", (lua_Integer)len, fl_dtype_name(dt), sh);
  fl_tensor *t = fl_lua_newtensor(L);
  FL_TRY(L, fl_tensor_init(t, &fl_cpu_backend, 0, dt, n, shape) ? fl_fail_prefix("fromstring") : 0);
  memcpy(fl_tensor_data(t), s, len);
  return 1;
}

/* t:tostring_raw(): the elements' bytes in row-major order (native endianness) */
static int t_tostring_raw(lua_State *L) {
  fl_tensor *t = fl_lua_checktensor(L, 1);
  if (!fl_tensor_is_host(t)) {   /* a device tensor: its contiguous host copy */
    const fl_tensor *h = fl_lua_tohost(L, t, "tostring_raw");
    lua_pushlstring(L, fl_tensor_data(h), (size_t)fl_tensor_numel(h) * fl_dtype_size(h->dtype));
    return 1;
  }
  fl_tensor c;
  FL_TRY(L, fl_contiguous(&c, t));
  lua_pushlstring(L, fl_tensor_data(&c), (size_t)fl_tensor_numel(&c) * fl_dtype_size(c.dtype));
  fl_tensor_free(&c);
  return 1;
}

/* ---------------------------------------------------------------- dtypes */

const char *fl_lua_torch_name(fl_dtype dt) {
  static const char *const names[FL_NDTYPES] = {
    "torch.FloatTensor", "torch.DoubleTensor", "torch.IntTensor", "torch.LongTensor", "torch.ByteTensor",
    "torch.BFloat16Tensor",
  };
  return (unsigned)dt < FL_NDTYPES ? names[dt] : "torch.Tensor";
}

static int t_dtype(lua_State *L) {
  lua_pushstring(L, fl_dtype_name(fl_lua_checktensor(L, 1)->dtype));
  return 1;
}

static int to_dtype(lua_State *L, fl_dtype dt) {
  fl_tensor *t = fl_lua_checktensor(L, 1);
  if (t->dtype == dt) { lua_settop(L, 1); return 1; }   /* Torch7: already that type returns self */
  fl_tensor *r = fl_lua_newtensor(L);
  FL_TRY(L, fl_cast(r, t, dt));
  return 1;
}

/* t:type() -> 'torch.FloatTensor'; t:type(dtype) -> converted tensor (t itself if same) */
static int t_type(lua_State *L) {
  fl_tensor *t = fl_lua_checktensor(L, 1);
  if (lua_isnoneornil(L, 2)) { lua_pushstring(L, fl_lua_torch_name(t->dtype)); return 1; }
  return to_dtype(L, fl_lua_optdtype(L, 2, FL_F32, "type"));
}
static int t_float(lua_State *L) { return to_dtype(L, FL_F32); }
static int t_double(lua_State *L) { return to_dtype(L, FL_F64); }
static int t_int(lua_State *L) { return to_dtype(L, FL_I32); }
static int t_long(lua_State *L) { return to_dtype(L, FL_I64); }
static int t_byte(lua_State *L) { return to_dtype(L, FL_U8); }
static int t_bfloat16(lua_State *L) { return to_dtype(L, FL_BF16); }

static int t_device(lua_State *L) {
  fl_tensor *t = fl_lua_checktensor(L, 1);
  lua_pushstring(L, t->storage->backend->name);
  return 1;
}

/* ---------------------------------------------------------------- queries */

static int t_size(lua_State *L) {
  fl_tensor *t = fl_lua_checktensor(L, 1);
  if (!lua_isnoneornil(L, 2)) {
    int d = fl_lua_checkdim(L, 2, t->ndim, 0, "size");
    lua_pushinteger(L, t->shape[d]);
    return 1;
  }
  lua_createtable(L, t->ndim, 0);
  for (int i = 0; i < t->ndim; i++) {
    lua_pushinteger(L, t->shape[i]);
    lua_rawseti(L, -2, i + 1);
  }
  return 1;
}

static int t_stride(lua_State *L) {
  fl_tensor *t = fl_lua_checktensor(L, 1);
  if (!lua_isnoneornil(L, 2)) {
    int d = fl_lua_checkdim(L, 2, t->ndim, 0, "stride");
    lua_pushinteger(L, t->stride[d]);
    return 1;
  }
  lua_createtable(L, t->ndim, 0);
  for (int i = 0; i < t->ndim; i++) {
    lua_pushinteger(L, t->stride[i]);
    lua_rawseti(L, -2, i + 1);
  }
  return 1;
}

static int t_dim(lua_State *L) { lua_pushinteger(L, fl_lua_checktensor(L, 1)->ndim); return 1; }
static int t_numel(lua_State *L) { lua_pushinteger(L, fl_tensor_numel(fl_lua_checktensor(L, 1))); return 1; }
static int t_is_contiguous(lua_State *L) { lua_pushboolean(L, fl_tensor_is_contiguous(fl_lua_checktensor(L, 1))); return 1; }
/* t:is_shared(): another tensor (a view of t, or the base or a sibling of this view) still holds
 * t's storage, so writing into t in place would change it too. Views left to the collector count
 * until they are collected: the answer errs on the side of "shared". */
static int t_is_shared(lua_State *L) {
  fl_tensor *t = fl_lua_checktensor(L, 1);
  lua_pushboolean(L, __atomic_load_n(&t->storage->refcount, __ATOMIC_ACQUIRE) > 1);
  return 1;
}
/* 1-based, like Torch7's storageOffset */
static int t_storage_offset(lua_State *L) { lua_pushinteger(L, fl_lua_checktensor(L, 1)->offset + 1); return 1; }

static int t_len(lua_State *L) {
  fl_tensor *t = fl_lua_checktensor(L, 1);
  if (t->ndim == 0) return luaL_error(L, "#: a 0-d tensor has no length (use t:item())");
  lua_pushinteger(L, t->shape[0]);
  return 1;
}

static int t_item(lua_State *L) {
  fl_tensor *t = fl_lua_checktensor(L, 1);
  if (fl_tensor_numel(t) != 1) {
    char s[200];
    fl_shape_str(s, sizeof s, t->ndim, t->shape);
    return luaL_error(L, "item: expected a tensor with one element, got size %s", s);
  }
  int64_t zero[FL_MAXDIM] = {0};
  fl_lua_pushelem(L, t, zero);
  return 1;
}

static void totable_rec(lua_State *L, const fl_tensor *t, int d, int64_t *index) {
  luaL_checkstack(L, 3, "totable");
  lua_createtable(L, (int)(t->shape[d] < 1 << 24 ? t->shape[d] : 0), 0);
  for (int64_t i = 0; i < t->shape[d]; i++) {
    index[d] = i;
    if (d + 1 == t->ndim) fl_lua_pushelem(L, t, index);
    else totable_rec(L, t, d + 1, index);
    lua_rawseti(L, -2, (lua_Integer)i + 1);
  }
}

static int t_totable(lua_State *L) {
  fl_tensor *t = fl_lua_checktensor(L, 1);
  const fl_tensor *h = fl_lua_tohost(L, t, "totable");   /* one transfer for a device tensor */
  int64_t index[FL_MAXDIM] = {0};
  if (h->ndim == 0) fl_lua_pushelem(L, h, index);
  else totable_rec(L, h, 0, index);
  return 1;
}

/* t:equal(u): same shape and every element equal (values compared after promotion) */
static int t_equal(lua_State *L) {
  fl_tensor *a = fl_lua_checktensor(L, 1), *b = fl_lua_checktensor(L, 2);
  if (a->storage->backend != b->storage->backend || a->storage->device != b->storage->device) {
    char da[80], db[80];
    fl_device_str(da, sizeof da, a);
    fl_device_str(db, sizeof db, b);
    return luaL_error(L, "equal: tensors are on different devices (%s and %s)", da, db);
  }
  if (!fl_tensor_same_shape(a, b)) { lua_pushboolean(L, 0); return 1; }
  /* count the differing elements on the tensors' device; only that count comes to the host */
  fl_tensor *m = fl_lua_newtensor(L);
  FL_TRY(L, fl_binary(FL_NE, m, a, b));
  fl_tensor *s = fl_lua_newtensor(L);
  FL_TRY(L, fl_reduce(FL_SUM, s, m, -1, 0, 0));
  fl_lua_pushelem(L, s, NULL);
  lua_Integer n = lua_tointeger(L, -1);
  fl_tensor_free(m);
  fl_tensor_free(s);
  lua_pushboolean(L, n == 0);
  return 1;
}

/* ---------------------------------------------------------------- views */

static int view_impl(lua_State *L, const char *fname, int allow_copy) {
  fl_tensor *t = fl_lua_checktensor(L, 1);
  int64_t shape[FL_MAXDIM];
  int next;
  int n = fl_lua_checksize(L, 2, shape, &next, fname);
  if (!lua_isnone(L, next))
    return luaL_error(L, "%s: expected sizes (integers or one table), got %s", fname, luaL_typename(L, next));
  fl_tensor v;
  fl_tensor_init_view(&v, t);
  if (fl_view_reshape(&v, n, shape) == 0) {
    fl_tensor *r = fl_lua_newtensor(L);
    *r = v;
    return 1;
  }
  fl_tensor_free(&v);
  /* view failed: a size mismatch is always an error; a layout problem copies for reshape */
  int64_t numel = fl_tensor_numel(t), known = 1;
  int infer = 0;
  for (int i = 0; i < n; i++) { if (shape[i] == -1) infer = 1; else known *= shape[i]; }
  int size_ok = infer ? known > 0 && numel % known == 0 : known == numel;
  if (!allow_copy || !size_ok) {
    const char *m = fl_errmsg();   /* core messages start with "view: " */
    if (strncmp(m, "view: ", 6) == 0) return luaL_error(L, "%s: %s", fname, m + 6);
    return fl_lua_error(L);
  }
  fl_tensor *r = fl_lua_newtensor(L);
  FL_TRY(L, fl_clone(r, t));
  if (fl_view_reshape(r, n, shape)) return fl_lua_error(L);
  return 1;
}

static int t_view(lua_State *L) { return view_impl(L, "view", 0); }
static int t_reshape(lua_State *L) { return view_impl(L, "reshape", 1); }

static int t_transpose(lua_State *L) {
  fl_tensor *t = fl_lua_checktensor(L, 1);
  int d0, d1;
  if (lua_isnone(L, 2) && t->ndim == 2) { d0 = 0; d1 = 1; }
  else {
    d0 = fl_lua_checkdim(L, 2, t->ndim, 0, "transpose");
    d1 = fl_lua_checkdim(L, 3, t->ndim, 0, "transpose");
  }
  fl_tensor *r = push_view(L, t);
  fl_view_transpose(r, d0, d1);
  return 1;
}

/* t:t(): transpose of a 2-d tensor */
static int t_t(lua_State *L) {
  fl_tensor *t = fl_lua_checktensor(L, 1);
  if (t->ndim != 2) return luaL_error(L, "t: expected a 2-d tensor, got %d-d", t->ndim);
  fl_tensor *r = push_view(L, t);
  fl_view_transpose(r, 0, 1);
  return 1;
}

static int t_permute(lua_State *L) {
  fl_tensor *t = fl_lua_checktensor(L, 1);
  int perm[FL_MAXDIM];
  int tab = lua_istable(L, 2);
  int n = tab ? (int)luaL_len(L, 2) : lua_gettop(L) - 1;
  if (n != t->ndim) return luaL_error(L, "permute: expected %d dims for a %d-d tensor, got %d", t->ndim, t->ndim, n);
  for (int i = 0; i < n; i++) {
    if (tab) lua_rawgeti(L, 2, i + 1); else lua_pushvalue(L, i + 2);
    perm[i] = fl_lua_checkdim(L, -1, t->ndim, 0, "permute");
    lua_pop(L, 1);
  }
  fl_tensor v = *t;
  if (fl_view_permute(&v, perm)) return fl_lua_error(L);
  push_view(L, &v);
  return 1;
}

/* narrow(dim, start, len): elements start .. start+len-1 of dim (start 1-based, negative from end) */
static int t_narrow(lua_State *L) {
  fl_tensor *t = fl_lua_checktensor(L, 1);
  int d = fl_lua_checkdim(L, 2, t->ndim, 0, "narrow");
  lua_Integer start = luaL_checkinteger(L, 3), len = luaL_checkinteger(L, 4);
  if (start < 0) start += t->shape[d] + 1;
  fl_tensor v = *t;
  if (fl_view_narrow(&v, d, start - 1, len)) return fl_lua_error(L);
  push_view(L, &v);
  return 1;
}

static int t_select(lua_State *L) {
  fl_tensor *t = fl_lua_checktensor(L, 1);
  int d = fl_lua_checkdim(L, 2, t->ndim, 0, "select");
  lua_Integer i = luaL_checkinteger(L, 3);
  if (i < 0) i += t->shape[d] + 1;
  fl_tensor v = *t;
  if (fl_view_select(&v, d, i - 1)) return fl_lua_error(L);
  push_view(L, &v);
  return 1;
}

static int t_expand(lua_State *L) {
  fl_tensor *t = fl_lua_checktensor(L, 1);
  int64_t shape[FL_MAXDIM];
  int next;
  int n;
  fl_tensor *like = fl_lua_totensor(L, 2);
  if (like) { n = like->ndim; memcpy(shape, like->shape, sizeof shape); }   /* expand(t, other): expand_as */
  else n = fl_lua_checksize(L, 2, shape, &next, "expand");
  fl_tensor v = *t;
  if (fl_view_expand(&v, n, shape)) return fl_lua_error(L);
  push_view(L, &v);
  return 1;
}

static int t_unsqueeze(lua_State *L) {
  fl_tensor *t = fl_lua_checktensor(L, 1);
  int d = fl_lua_checkdim(L, 2, t->ndim, 1, "unsqueeze");
  fl_tensor v = *t;
  if (fl_view_unsqueeze(&v, d)) return fl_lua_error(L);
  push_view(L, &v);
  return 1;
}

static int t_squeeze(lua_State *L) {
  fl_tensor *t = fl_lua_checktensor(L, 1);
  int d = lua_isnoneornil(L, 2) ? -1 : fl_lua_checkdim(L, 2, t->ndim, 0, "squeeze");
  fl_tensor v = *t;
  if (fl_view_squeeze(&v, d)) return fl_lua_error(L);
  push_view(L, &v);
  return 1;
}

static int t_contiguous(lua_State *L) {
  fl_tensor *t = fl_lua_checktensor(L, 1);
  if (fl_tensor_is_contiguous(t)) { lua_settop(L, 1); return 1; }
  fl_tensor *r = fl_lua_newtensor(L);
  FL_TRY(L, fl_clone(r, t));
  return 1;
}

static int t_clone(lua_State *L) {
  fl_tensor *t = fl_lua_checktensor(L, 1);
  fl_tensor *r = fl_lua_newtensor(L);
  FL_TRY(L, fl_clone(r, t));
  return 1;
}

/* t:copy(src): src (tensor, broadcastable, any dtype) copied into t; returns t */
static int t_copy(lua_State *L) {
  fl_tensor *t = fl_lua_checktensor(L, 1);
  fl_tensor tmp;
  const fl_tensor *s = fl_lua_tensorarg(L, 2, t, &tmp, "copy");
  int rc = fl_copy_into(t, s);
  fl_tensor_free(&tmp);
  if (rc) return fl_lua_error(L);
  lua_settop(L, 1);
  return 1;
}

static int t_fill(lua_State *L) {
  fl_tensor *t = fl_lua_checktensor(L, 1);
  double v = luaL_checknumber(L, 2);
  if (t->dtype == FL_I64 && lua_isinteger(L, 2)) {
    /* exact beyond 2^53: the integer is written into a host scalar; a device tensor gets it as a
     * one-element device scalar (one small transfer), broadcast there by the device's copy */
    fl_tensor tmp, dev;
    memset(&dev, 0, sizeof dev);
    FL_TRY(L, fl_tensor_init(&tmp, &fl_cpu_backend, 0, FL_I64, 0, NULL));
    *(int64_t *)fl_tensor_data(&tmp) = lua_tointeger(L, 2);
    const fl_tensor *src = &tmp;
    int rc = 0;
    if (!fl_tensor_is_host(t)) {
      rc = fl_tensor_init(&dev, t->storage->backend, t->storage->device, FL_I64, 0, NULL);
      if (!rc) rc = fl_copy_into(&dev, &tmp);
      src = &dev;
    }
    if (!rc) rc = fl_copy_into(t, src);
    fl_tensor_free(&tmp);
    fl_tensor_free(&dev);
    if (rc) return fl_lua_error(L);
  } else if (fl_fill(t, v)) {
    return fl_lua_error(L);
  }
  lua_settop(L, 1);
  return 1;
}

static int t_zero(lua_State *L) {
  fl_tensor *t = fl_lua_checktensor(L, 1);
  if (fl_fill(t, 0)) return fl_lua_error(L);
  lua_settop(L, 1);
  return 1;
}

/* ---------------------------------------------------------------- indexing */

/* Applies one Torch-style index spec per dim to the view v:
 *   number i   selects (the dim disappears),
 *   {a, b}     keeps a..b inclusive ({a} keeps a alone), negatives count from the end,
 *   {}         keeps the whole dim.
 * Dims without a spec are kept whole. */
static void apply_specs(lua_State *L, int spec, fl_tensor *v, const char *fname) {
  int n = (int)luaL_len(L, spec);
  if (n > v->ndim) luaL_error(L, "%s: %d indices for a %d-d tensor", fname, n, v->ndim);
  int d = 0;   /* current dim in v (selections remove dims) */
  for (int k = 1; k <= n; k++) {
    int ty = lua_rawgeti(L, spec, k);
    if (ty == LUA_TNUMBER) {
      int isint;
      lua_Integer i = lua_tointegerx(L, -1, &isint);
      if (!isint) luaL_error(L, "%s: index %d must be an integer", fname, k);
      if (i < 0) i += v->shape[d] + 1;
      if (i < 1 || i > v->shape[d])
        luaL_error(L, "%s: index %I out of range for dim %d of size %I", fname, lua_tointeger(L, -1), k,
                   (lua_Integer)v->shape[d]);
      fl_view_select(v, d, i - 1);
    } else if (ty == LUA_TTABLE) {
      int m = (int)luaL_len(L, -1);
      lua_Integer a = 1, b = v->shape[d];
      if (m >= 1) {
        lua_rawgeti(L, -1, 1);
        int isint;
        a = lua_tointegerx(L, -1, &isint);
        if (!isint) luaL_error(L, "%s: range start for dim %d must be an integer", fname, k);
        lua_pop(L, 1);
        b = a;
      }
      if (m >= 2) {
        lua_rawgeti(L, -1, 2);
        int isint;
        b = lua_tointegerx(L, -1, &isint);
        if (!isint) luaL_error(L, "%s: range end for dim %d must be an integer", fname, k);
        lua_pop(L, 1);
      }
      if (m > 2) luaL_error(L, "%s: range for dim %d has %d numbers (expected {}, {a} or {a, b})", fname, k, m);
      lua_Integer a0 = a, b0 = b;
      if (a < 0) a += v->shape[d] + 1;
      if (b < 0) b += v->shape[d] + 1;
      if (a < 1 || b > v->shape[d] || b < a - 1)
        luaL_error(L, "%s: range {%I, %I} out of bounds for dim %d of size %I", fname, a0, b0, k,
                   (lua_Integer)v->shape[d]);
      fl_view_narrow(v, d, a - 1, b - a + 1);
      d++;
    } else {
      luaL_error(L, "%s: index %d must be a number or a table, got %s", fname, k, lua_typename(L, ty));
    }
    lua_pop(L, 1);
  }
}

/* __index: methods by name, t[i] selects along dim 1 (a number for 1-d tensors), t[{...}] slices */
static int t_index(lua_State *L) {
  int ty = lua_type(L, 2);
  if (ty == LUA_TSTRING) {
    lua_pushvalue(L, 2);
    lua_rawget(L, lua_upvalueindex(1));
    return 1;
  }
  fl_tensor *t = fl_lua_checktensor(L, 1);
  if (ty == LUA_TNUMBER) {
    int isint;
    lua_Integer i = lua_tointegerx(L, 2, &isint);
    if (!isint) return luaL_error(L, "index: expected an integer index, got %f", lua_tonumber(L, 2));
    if (t->ndim == 0) return luaL_error(L, "index: cannot index a 0-d tensor (use t:item())");
    if (i < 0) i += t->shape[0] + 1;
    if (i < 1 || i > t->shape[0])
      return luaL_error(L, "index: index %I out of range for dim 1 of size %I", lua_tointeger(L, 2),
                        (lua_Integer)t->shape[0]);
    fl_tensor v = *t;
    fl_view_select(&v, 0, i - 1);
    if (v.ndim == 0) { fl_lua_pushelem(L, &v, NULL); return 1; }
    push_view(L, &v);
    return 1;
  }
  if (ty == LUA_TTABLE) {
    fl_tensor v = *t;
    apply_specs(L, 2, &v, "index");
    if (v.ndim == 0) { fl_lua_pushelem(L, &v, NULL); return 1; }
    push_view(L, &v);
    return 1;
  }
  lua_pushnil(L);
  return 1;
}

/* assigns a number (fill) or a tensor (copy with broadcast) into the view v */
static int assign(lua_State *L, fl_tensor *v, int val) {
  fl_tensor tmp;
  const fl_tensor *s = fl_lua_tensorarg(L, val, v, &tmp, "index assignment");
  int rc = fl_copy_into(v, s);
  fl_tensor_free(&tmp);
  if (rc) return fl_lua_error(L);
  return 0;
}

static int t_newindex(lua_State *L) {
  fl_tensor *t = fl_lua_checktensor(L, 1);
  int ty = lua_type(L, 2);
  fl_tensor v = *t;
  if (ty == LUA_TNUMBER) {
    int isint;
    lua_Integer i = lua_tointegerx(L, 2, &isint);
    if (!isint) return luaL_error(L, "index assignment: expected an integer index, got %f", lua_tonumber(L, 2));
    if (t->ndim == 0) return luaL_error(L, "index assignment: cannot index a 0-d tensor (use t:fill(v))");
    if (i < 0) i += t->shape[0] + 1;
    if (i < 1 || i > t->shape[0])
      return luaL_error(L, "index assignment: index %I out of range for dim 1 of size %I", lua_tointeger(L, 2),
                        (lua_Integer)t->shape[0]);
    fl_view_select(&v, 0, i - 1);
  } else if (ty == LUA_TTABLE) {
    apply_specs(L, 2, &v, "index assignment");
  } else {
    return luaL_error(L, "index assignment: cannot set field '%s' of a tensor", lua_tostring(L, 2) ? lua_tostring(L, 2) : luaL_typename(L, 2));
  }
  return assign(L, &v, 3);
}

/* ---------------------------------------------------------------- cat / stack */

/* cat({t1, t2, ...} [, dim = 1]): joined along an existing dim; dtypes promoted */
static int cat_impl(lua_State *L, int stack) {
  const char *fname = stack ? "stack" : "cat";
  luaL_checktype(L, 1, LUA_TTABLE);
  int n = (int)luaL_len(L, 1);
  if (n == 0) return luaL_error(L, "%s: expected a non-empty list of tensors", fname);
  fl_tensor first;
  lua_rawgeti(L, 1, 1);
  fl_tensor *f = fl_lua_totensor(L, -1);
  if (!f) return luaL_error(L, "%s: element 1 is not a tensor (%s)", fname, luaL_typename(L, -1));
  first = *f;
  lua_pop(L, 1);
  int ndim = first.ndim + (stack ? 1 : 0);
  int d = lua_isnoneornil(L, 2) ? 0 : fl_lua_checkdim(L, 2, first.ndim, stack, fname);
  if (!stack && first.ndim == 0) return luaL_error(L, "cat: cannot concatenate 0-d tensors (use stack)");
  int64_t shape[FL_MAXDIM];
  if (ndim > FL_MAXDIM) return luaL_error(L, "stack: result would have more than %d dims", FL_MAXDIM);
  fl_dtype dt = first.dtype;
  int64_t total = 0;
  for (int i = 1; i <= n; i++) {
    lua_rawgeti(L, 1, i);
    fl_tensor *t = fl_lua_totensor(L, -1);
    if (!t) return luaL_error(L, "%s: element %d is not a tensor (%s)", fname, i, luaL_typename(L, -1));
    int ok = t->ndim == first.ndim;
    for (int k = 0; ok && k < t->ndim; k++)
      if ((stack || k != d) && t->shape[k] != first.shape[k]) ok = 0;
    if (!ok) {
      char s1[200], s2[200];
      fl_shape_str(s1, sizeof s1, first.ndim, first.shape);
      fl_shape_str(s2, sizeof s2, t->ndim, t->shape);
      return luaL_error(L, "%s: element %d has size %s, incompatible with element 1's %s (dim %d)", fname, i, s2, s1, d + 1);
    }
    if (t->storage->backend != first.storage->backend || t->storage->device != first.storage->device) {
      char d1[80], d2[80];
      fl_device_str(d1, sizeof d1, &first);
      fl_device_str(d2, sizeof d2, t);
      return luaL_error(L, "%s: element %d is on %s, element 1 on %s", fname, i, d2, d1);
    }
    dt = fl_promote(dt, t->dtype);
    total += stack ? 1 : t->shape[d];
    lua_pop(L, 1);
  }
  for (int k = 0, j = 0; k < ndim; k++) {
    if (k == d) shape[k] = total;
    else shape[k] = first.shape[j];
    if (!stack || k != d) j++;
  }
  if (!stack) shape[d] = total;
  fl_tensor *r = fl_lua_newtensor(L);
  FL_TRY(L, fl_tensor_init(r, first.storage->backend, first.storage->device, dt, ndim, shape) ? fl_fail_prefix(fname) : 0);
  int64_t pos = 0;
  for (int i = 1; i <= n; i++) {
    lua_rawgeti(L, 1, i);
    fl_tensor *t = fl_lua_totensor(L, -1);
    fl_tensor part = *r;
    int64_t len = stack ? 1 : t->shape[d];
    fl_view_narrow(&part, d, pos, len);
    fl_tensor src = *t;
    if (stack) fl_view_unsqueeze(&src, d);
    if (fl_copy_into(&part, &src)) return fl_lua_error(L);
    pos += len;
    lua_pop(L, 1);
  }
  return 1;
}

static int l_cat(lua_State *L) { return cat_impl(L, 0); }
static int l_stack(lua_State *L) { return cat_impl(L, 1); }

static int l_is_tensor(lua_State *L) {
  lua_pushboolean(L, luaL_testudata(L, 1, FL_TENSOR_MT) != NULL);
  return 1;
}

static int l_setnumthreads(lua_State *L) {
  lua_Integer n = luaL_checkinteger(L, 1);
  if (n < 1 || n > 1024) return luaL_error(L, "setnumthreads: expected 1..1024 threads, got %I", n);
  fl_set_num_threads((int)n);
  return 0;
}

static int l_getnumthreads(lua_State *L) {
  lua_pushinteger(L, fl_get_num_threads());
  return 1;
}

/* ---------------------------------------------------------------- registration */

static const luaL_Reg tensor_methods[] = {
  {"dtype", t_dtype}, {"type", t_type}, {"float", t_float}, {"double", t_double}, {"bfloat16", t_bfloat16}, {"int", t_int},
  {"long", t_long}, {"byte", t_byte}, {"device", t_device},
  {"size", t_size}, {"stride", t_stride}, {"dim", t_dim}, {"nDimension", t_dim}, {"numel", t_numel},
  {"nElement", t_numel}, {"is_contiguous", t_is_contiguous}, {"isContiguous", t_is_contiguous},
  {"is_shared", t_is_shared},
  {"storage_offset", t_storage_offset}, {"item", t_item}, {"totable", t_totable}, {"equal", t_equal},
  {"view", t_view}, {"reshape", t_reshape}, {"transpose", t_transpose}, {"t", t_t}, {"permute", t_permute},
  {"narrow", t_narrow}, {"select", t_select}, {"expand", t_expand}, {"unsqueeze", t_unsqueeze},
  {"squeeze", t_squeeze}, {"contiguous", t_contiguous}, {"clone", t_clone}, {"copy", t_copy},
  {"new_zeros", t_new_zeros}, {"new_empty", t_new_empty}, {"new_full", t_new_full},
  {"fill", t_fill}, {"fill_", t_fill}, {"zero", t_zero}, {"zero_", t_zero},
  {"uniform_", t_uniform_}, {"normal_", t_normal_}, {"tostring_raw", t_tostring_raw},
  {"free", t_gc},
  {NULL, NULL},
};

/* flower.memory([what]) -> {live = bytes of all live storages (every device), host = bytes of host
 * blocks in use (rounded to the allocator's size classes), cached = freed host blocks the CPU
 * allocator keeps for reuse, peak = the most host + cached bytes since the start or the last
 * 'reset_peak'}. what: 'release' gives the cached blocks back first; 'reset_peak' starts the peak
 * again from now. */
static int l_memory(lua_State *L) {
  static const char *const whats[] = {"stats", "release", "reset_peak", NULL};
  int what = luaL_checkoption(L, 1, "stats", whats);
  if (what == 1) fl_cpu_release_cache();
  size_t used, cached, peak;
  fl_cpu_memory_stats(&used, &cached, &peak, what == 2);
  lua_createtable(L, 0, 4);
  lua_pushinteger(L, (lua_Integer)fl_storage_live_bytes());
  lua_setfield(L, -2, "live");
  lua_pushinteger(L, (lua_Integer)used);
  lua_setfield(L, -2, "host");
  lua_pushinteger(L, (lua_Integer)cached);
  lua_setfield(L, -2, "cached");
  lua_pushinteger(L, (lua_Integer)peak);
  lua_setfield(L, -2, "peak");
  return 1;
}

static const luaL_Reg module_funcs[] = {
  {"tensor", l_tensor}, {"zeros", l_zeros}, {"ones", l_ones}, {"empty", l_empty}, {"full", l_full},
  {"arange", l_arange}, {"linspace", l_linspace}, {"rand", l_rand}, {"randn", l_randn},
  {"randint", l_randint}, {"manual_seed", l_manual_seed}, {"get_rng_state", l_get_rng_state},
  {"set_rng_state", l_set_rng_state}, {"fromstring", l_fromstring}, {"cat", l_cat}, {"stack", l_stack},
  {"is_tensor", l_is_tensor}, {"setnumthreads", l_setnumthreads}, {"getnumthreads", l_getnumthreads},
  {"memory", l_memory},
  {NULL, NULL},
};

void fl_lua_open_tensor(lua_State *L) {
  /* the module table is at the top */
  if (luaL_newmetatable(L, FL_TENSOR_MT)) {
    int mt = lua_gettop(L);
    luaL_setfuncs(L, tensor_methods, 0);
    lua_pushcfunction(L, t_gc);
    lua_setfield(L, mt, "__gc");
    lua_pushcfunction(L, t_gc);
    lua_setfield(L, mt, "__close");
    lua_pushcfunction(L, t_len);
    lua_setfield(L, mt, "__len");
    lua_pushcfunction(L, fl_lua_tensor_tostring);
    lua_setfield(L, mt, "__tostring");
    lua_pushvalue(L, mt);
    lua_pushcclosure(L, t_index, 1);   /* upvalue: the metatable, which holds the methods */
    lua_setfield(L, mt, "__index");
    lua_pushcfunction(L, t_newindex);
    lua_setfield(L, mt, "__newindex");
    fl_lua_open_tensor_math(L, mt);
  }
  /* flower.Tensor is the metatable: functions added to it become methods */
  lua_setfield(L, -2, "Tensor");
  luaL_setfuncs(L, module_funcs, 0);
}
