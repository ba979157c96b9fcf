/* flower.cuda: what is particular to the CUDA backend from Lua (memory statistics, cuDNN settings,
 * fused optimizer steps, asynchronous uploads), and the tensor methods t:cuda() / t:is_cuda().
 * Moving tensors between devices in general is l_device.c's t:to() / t:cpu(); the registry
 * (core/backend.c) is where the CUDA backend joins the build. In a CPU-only build the functions
 * here exist and say so (available() is false, t:cuda() raises an error naming the fix).
 *
 *   flower.cuda.built()                  true when flowerlua was built with `make CUDA=1`
 *   flower.cuda.available()              built and at least one device present
 *   flower.cuda.unavailable_reason()     why not (nil when available)
 *   flower.cuda.device_count()           0 without devices
 *   flower.cuda.device_name([dev])       "NVIDIA H100 ... (sm_90, 79.1 GiB)"
 *   flower.cuda.memory_stats([dev])      {allocated=, reserved=, cached=, peak_allocated=, ...} (bytes)
 *   flower.cuda.reset_peak_memory_stats([dev])
 *   flower.cuda.empty_cache()            returns cached device memory to the driver
 *   flower.cuda.synchronize([dev])       waits for queued kernels (timing, error checks)
 *   flower.cuda.allow_tf32([bool])       returns the setting, sets it when given (default true)
 *   flower.cuda.benchmark([bool])        cuDNN engine timing per convolution shape (default false)
 *   flower.cuda.deterministic([bool])    skip non-deterministic cuDNN engines (default false)
 *   flower.cuda.conv_stats()             cached cuDNN plans, direct-kernel fallback calls, the
 *                                        largest workspace of a cached plan (bytes)
 *   flower.cuda.adam_step(ws, gs, ms, vs, alpha, beta1, beta2, eps)   core/nn.h's adam_step over
 *   flower.cuda.sgd_step(ws, gs, ms|nil, lr, momentum, nesterov)       whole lists in few launches
 *   flower.cuda.to_device_async(t [, dev])   t on the device without waiting for the copy (below)
 *   t:cuda([dev])  t:cuda{device = 0, non_blocking = false}  t:cpu()  t:is_cuda()  t:get_device()
 *   t:pin_memory()  t:is_pinned()
 * Devices are numbered from 0, as CUDA itself and "cuda:0" number them.
 *
 * The data path. t:pin_memory() copies a host tensor into page-locked memory (plain memory where
 * there is no device: the same values, is_pinned() false); data.Loader{pin_memory = true} decodes
 * batches straight into such memory (fl_lua_pinned_provider below). to_device_async(t) (or
 * t:cuda{non_blocking = true}) returns the device tensor at once: the upload runs on a copy stream
 * and the device's compute stream waits for it on the GPU, so kernels queued on the result see the
 * data while the host goes on decoding. A pinned t must not be written until the copy has read it:
 * the loader waits for that before refilling a buffer (backend.h: host_wait); other code writing
 * into a pinned tensor it has just uploaded calls flower.cuda.synchronize() first. */
#include "lflower.h"
#include "backend.h"

#include <string.h>

#ifdef FLOWER_CUDA
#include "cuda/cuda_backend.h"
#endif

#define NO_CUDA "flowerlua was built without CUDA (rebuild with `make CUDA=1`)"

/* ---------------------------------------------------------------- tensor methods */

/* the CUDA backend's table from the registry; NULL in a CPU-only build */
static const fl_backend *cuda_backend(void) { return fl_backend_find("cuda"); }
static int cuda_devices(void) { return cuda_backend() ? fl_backend_devices(cuda_backend()) : 0; }

static int is_cuda_tensor(const fl_tensor *t) { return t->storage->backend == cuda_backend(); }

static int opt_device(lua_State *L, int arg, const char *fname) {
  lua_Integer d = luaL_optinteger(L, arg, 0);
  if (d < 0 || d > 1 << 20) return luaL_error(L, "%s: device must be >= 0, got %I", fname, d);
  return (int)d;
}

/* The backend whose page-locked host memory the loader's batches use (l_data.c, pin_memory): the
 * first registered one that gives such memory and has a device present, else NULL (plain memory). */
const fl_backend *fl_lua_pinned_provider(void) {
  for (int i = 0, n = fl_backend_count(); i < n; i++) {
    const fl_backend *be = fl_backend_at(i);
    if (be->host_alloc && fl_backend_devices(be) > 0) return be;
  }
  return NULL;
}

/* to the device without waiting: src (a host tensor) -> new device tensor on dev */
static int push_async_to(lua_State *L, int src_idx, int dev, const char *fname) {
#ifdef FLOWER_CUDA
  fl_tensor *src = fl_lua_checktensor(L, src_idx);
  if (fl_cuda_check_device(fname, dev)) return fl_lua_error(L);
  if (is_cuda_tensor(src)) {
    if (src->storage->device == dev) { lua_pushvalue(L, src_idx); return 1; }
    return fl_lua_push_copy_to(L, src, fl_cuda_backend(), dev, fname);
  }
  fl_tensor *t = fl_lua_newtensor(L);
  src = fl_lua_checktensor(L, src_idx);   /* newtensor may have run a collection: reread */
  if (fl_tensor_init(t, fl_cuda_backend(), dev, src->dtype, src->ndim, src->shape)) {
    if (!fl_last_failure_was_oom()) return luaL_error(L, "%s: %s", fname, fl_errmsg());
    lua_gc(L, LUA_GCCOLLECT);
    if (fl_tensor_init(t, fl_cuda_backend(), dev, src->dtype, src->ndim, src->shape))
      return luaL_error(L, "%s: %s", fname, fl_errmsg());
  }
  if (fl_cuda_backend()->copy_async(t, src)) return luaL_error(L, "%s: %s", fname, fl_errmsg());
  return 1;
#else
  (void)src_idx; (void)dev;
  return luaL_error(L, "%s: %s", fname, NO_CUDA);
#endif
}

/* t:cuda([device = 0]) or t:cuda{device = 0, non_blocking = false}: t itself when it is already there */
static int t_cuda(lua_State *L) {
  fl_tensor *t = fl_lua_checktensor(L, 1);
  int dev = 0, non_blocking = 0;
  if (lua_istable(L, 2)) {
    lua_getfield(L, 2, "device");
    dev = opt_device(L, -1, "cuda");
    lua_getfield(L, 2, "non_blocking");
    non_blocking = lua_toboolean(L, -1);
    lua_pop(L, 2);
  } else {
    dev = opt_device(L, 2, "cuda");
  }
#ifdef FLOWER_CUDA
  if (fl_cuda_check_device("cuda", dev)) return fl_lua_error(L);
  if (is_cuda_tensor(t) && t->storage->device == dev) {
    lua_settop(L, 1);
    return 1;
  }
  if (non_blocking) return push_async_to(L, 1, dev, "cuda");
  return fl_lua_push_copy_to(L, t, fl_cuda_backend(), dev, "cuda");
#else
  (void)t; (void)dev; (void)non_blocking;
  return luaL_error(L, "cuda: %s", NO_CUDA);
#endif
}

/* flower.cuda.to_device_async(t [, device = 0]) */
static int l_to_device_async(lua_State *L) {
  fl_lua_checktensor(L, 1);
  int dev = opt_device(L, 2, "cuda.to_device_async");
  return push_async_to(L, 1, dev, "cuda.to_device_async");
}

/* t:pin_memory(): a contiguous host copy of t in page-locked memory (plain memory without a
 * device); t itself when it already is pinned */
static int t_pin_memory(lua_State *L) {
  const char *fname = "pin_memory";
  fl_tensor *t = fl_lua_checktensor(L, 1);
  if (t->storage->pinned) { lua_settop(L, 1); return 1; }
  if (!fl_tensor_is_host(t)) return luaL_error(L, "%s: the tensor is on a device; pin host tensors", fname);
  int64_t n = fl_tensor_numel(t);
  size_t nb = (size_t)n * fl_dtype_size(t->dtype);
  fl_tensor *p = fl_lua_newtensor(L);
  t = fl_lua_checktensor(L, 1);
  fl_storage *s = fl_storage_new_pinned(fl_lua_pinned_provider(), nb);
  if (!s) return luaL_error(L, "%s: %s", fname, fl_errmsg());
  p->storage = s;
  p->offset = 0;
  p->ndim = t->ndim;
  p->dtype = t->dtype;
  for (int i = 0; i < t->ndim; i++) p->shape[i] = t->shape[i];
  fl_contiguous_strides(p->ndim, p->shape, p->stride);
  if (fl_cpu_backend.copy(p, t)) return luaL_error(L, "%s: %s", fname, fl_errmsg());
  return 1;
}

static int t_is_pinned(lua_State *L) {
  fl_tensor *t = fl_lua_checktensor(L, 1);
  lua_pushboolean(L, t->storage->pinned != NULL);
  return 1;
}

static int t_is_cuda(lua_State *L) {
  fl_tensor *t = fl_lua_checktensor(L, 1);
  lua_pushboolean(L, is_cuda_tensor(t));
  return 1;
}

/* device index of a CUDA tensor, -1 for a CPU tensor (PyTorch's convention) */
static int t_get_device(lua_State *L) {
  fl_tensor *t = fl_lua_checktensor(L, 1);
  lua_pushinteger(L, is_cuda_tensor(t) ? t->storage->device : -1);
  return 1;
}

/* ---------------------------------------------------------------- module functions */

static int l_built(lua_State *L) {
  lua_pushboolean(L, cuda_backend() != NULL);
  return 1;
}

static int l_device_count(lua_State *L) {
  lua_pushinteger(L, cuda_devices());
  return 1;
}

static int l_available(lua_State *L) {
  lua_pushboolean(L, cuda_devices() > 0);
  return 1;
}

static int l_unavailable_reason(lua_State *L) {
  if (cuda_devices() > 0) lua_pushnil(L);
  else lua_pushstring(L, cuda_backend() ? cuda_backend()->unavailable_reason() : NO_CUDA);
  return 1;
}

#ifdef FLOWER_CUDA

static int l_device_name(lua_State *L) {
  int dev = opt_device(L, 1, "cuda.device_name");
  char buf[256];
  if (fl_cuda_device_name(dev, buf, sizeof buf)) return fl_lua_error(L);
  lua_pushstring(L, buf);
  return 1;
}

static void set_int(lua_State *L, const char *k, uint64_t v) {
  lua_pushinteger(L, (lua_Integer)v);
  lua_setfield(L, -2, k);
}

static int l_memory_stats(lua_State *L) {
  int dev = opt_device(L, 1, "cuda.memory_stats");
  fl_cuda_memstats st;
  if (fl_cuda_memory_stats(dev, &st)) return fl_lua_error(L);
  lua_createtable(L, 0, 18);
  set_int(L, "allocated", st.allocated);
  set_int(L, "requested", st.requested);
  set_int(L, "reserved", st.reserved);
  set_int(L, "cached", st.cached);
  set_int(L, "peak_allocated", st.peak_allocated);
  set_int(L, "peak_reserved", st.peak_reserved);
  set_int(L, "device_free", st.device_free);
  set_int(L, "device_total", st.device_total);
  set_int(L, "num_alloc", st.num_alloc);
  set_int(L, "num_free", st.num_free);
  set_int(L, "num_cache_hits", st.num_cache_hits);
  set_int(L, "num_cuda_malloc", st.num_cuda_malloc);
  set_int(L, "num_cuda_free", st.num_cuda_free);
  set_int(L, "num_oom", st.num_oom);
  set_int(L, "live_blocks", st.live_blocks);
  set_int(L, "segments", st.segments);
  set_int(L, "free_blocks", st.free_blocks);
  set_int(L, "largest_free", st.largest_free);
  return 1;
}

static int l_reset_peak(lua_State *L) {
  int dev = opt_device(L, 1, "cuda.reset_peak_memory_stats");
  if (fl_cuda_check_device("cuda.reset_peak_memory_stats", dev)) return fl_lua_error(L);
  fl_cuda_reset_peak(dev);
  return 0;
}

static int l_empty_cache(lua_State *L) {
  if (fl_cuda_device_count() == 0) return 0;   /* nothing cached without a device */
  if (fl_cuda_empty_cache()) return fl_lua_error(L);
  return 0;
}

static int l_synchronize(lua_State *L) {
  int dev = opt_device(L, 1, "cuda.synchronize");
  if (fl_cuda_synchronize(dev)) return fl_lua_error(L);
  return 0;
}

/* getter/setter for a boolean setting */
static int flag(lua_State *L, int (*get)(void), void (*set)(int)) {
  int old = get();
  if (!lua_isnoneornil(L, 1)) {
    luaL_checktype(L, 1, LUA_TBOOLEAN);
    set(lua_toboolean(L, 1));
  }
  lua_pushboolean(L, old);
  return 1;
}
static int l_allow_tf32(lua_State *L) { return flag(L, fl_cuda_get_tf32, fl_cuda_set_tf32); }
static int l_benchmark(lua_State *L) { return flag(L, fl_cuda_get_benchmark, fl_cuda_set_benchmark); }
static int l_deterministic(lua_State *L) { return flag(L, fl_cuda_get_deterministic, fl_cuda_set_deterministic); }

static int l_conv_stats(lua_State *L) {
  lua_createtable(L, 0, 2);
  lua_pushinteger(L, fl_cuda_conv_plan_count());
  lua_setfield(L, -2, "plans");
  lua_pushinteger(L, fl_cuda_conv_fallback_count());
  lua_setfield(L, -2, "fallback_calls");
  lua_pushinteger(L, (lua_Integer)fl_cuda_conv_max_workspace());
  lua_setfield(L, -2, "max_workspace");
  return 1;
}

/* ---- fused optimizer steps: lists of tensors from Lua tables ---- */

#define OPT_MAX 65536

/* t[1..n] of the list at `arg` into out; a list of another length is an error */
static void tensor_list(lua_State *L, int arg, fl_tensor **out, int n, const char *fname, const char *what) {
  luaL_checktype(L, arg, LUA_TTABLE);
  int len = (int)luaL_len(L, arg);
  if (len != n) luaL_error(L, "%s: %s has %d tensors, the parameters %d", fname, what, len, n);
  for (int i = 1; i <= len; i++) {
    lua_rawgeti(L, arg, i);
    fl_tensor *t = fl_lua_totensor(L, -1);
    if (!t) luaL_error(L, "%s: %s[%d] is not a live tensor (%s)", fname, what, i, luaL_typename(L, -1));
    out[i - 1] = t;
    lua_pop(L, 1);   /* the table keeps it alive */
  }
}

/* scratch for 4 lists of n tensor pointers (a userdata: freed by the collector even after an error) */
static fl_tensor **lists(lua_State *L, int n, const char *fname) {
  if (n < 1 || n > OPT_MAX) luaL_error(L, "%s: expected 1..%d parameters, got %d", fname, OPT_MAX, n);
  return lua_newuserdatauv(L, sizeof(fl_tensor *) * 4 * (size_t)n, 0);
}

/* adam_step(ws, gs, ms, vs, alpha, beta1, beta2, eps): fl_nn_ops.adam_step over every tensor */
static int l_adam_step(lua_State *L) {
  const char *fname = "cuda.adam_step";
  luaL_checktype(L, 1, LUA_TTABLE);
  int n = (int)luaL_len(L, 1);
  double alpha = luaL_checknumber(L, 5), b1 = luaL_checknumber(L, 6), b2 = luaL_checknumber(L, 7);
  double eps = luaL_checknumber(L, 8);
  fl_tensor **buf = lists(L, n, fname);
  fl_tensor **w = buf, **g = buf + n, **m = buf + 2 * n, **v = buf + 3 * n;
  tensor_list(L, 1, w, n, fname, "params");
  tensor_list(L, 2, g, n, fname, "grads");
  tensor_list(L, 3, m, n, fname, "m");
  tensor_list(L, 4, v, n, fname, "v");
  if (fl_cuda_adam_step_multi(n, w, (const fl_tensor *const *)g, m, v, alpha, b1, b2, eps)) return fl_lua_error(L);
  return 0;
}

/* sgd_step(ws, gs, ms or nil, lr, momentum, nesterov): fl_nn_ops.sgd_step over every tensor */
static int l_sgd_step(lua_State *L) {
  const char *fname = "cuda.sgd_step";
  luaL_checktype(L, 1, LUA_TTABLE);
  int n = (int)luaL_len(L, 1);
  double lr = luaL_checknumber(L, 4), mu = luaL_optnumber(L, 5, 0);
  int nesterov = lua_toboolean(L, 6);
  fl_tensor **buf = lists(L, n, fname);
  fl_tensor **w = buf, **g = buf + n, **m = buf + 2 * n;
  tensor_list(L, 1, w, n, fname, "params");
  tensor_list(L, 2, g, n, fname, "grads");
  int has_m = !lua_isnoneornil(L, 3);
  if (has_m) tensor_list(L, 3, m, n, fname, "momentum buffers");
  if (mu != 0 && !has_m) return luaL_error(L, "%s: momentum %f needs momentum buffers", fname, mu);
  if (fl_cuda_sgd_step_multi(n, w, (const fl_tensor *const *)g, has_m ? m : NULL, lr, mu, nesterov))
    return fl_lua_error(L);
  return 0;
}

#else   /* !FLOWER_CUDA: every device function explains itself */

/* upvalue 1: the function's name */
static int l_no_cuda(lua_State *L) {
  return luaL_error(L, "cuda.%s: %s", lua_tostring(L, lua_upvalueindex(1)), NO_CUDA);
}

static int l_empty_cache(lua_State *L) { (void)L; return 0; }   /* nothing is cached */

#endif

static const luaL_Reg cuda_funcs[] = {
  {"built", l_built}, {"available", l_available}, {"unavailable_reason", l_unavailable_reason},
  {"device_count", l_device_count}, {"empty_cache", l_empty_cache}, {"to_device_async", l_to_device_async},
#ifdef FLOWER_CUDA
  {"device_name", l_device_name}, {"memory_stats", l_memory_stats}, {"reset_peak_memory_stats", l_reset_peak},
  {"synchronize", l_synchronize}, {"allow_tf32", l_allow_tf32}, {"benchmark", l_benchmark},
  {"deterministic", l_deterministic}, {"conv_stats", l_conv_stats}, {"adam_step", l_adam_step},
  {"sgd_step", l_sgd_step},
#endif
  {NULL, NULL},
};

#ifndef FLOWER_CUDA
/* the device functions of a CUDA build, present here so that calling one explains the build */
static const char *const device_funcs[] = {
  "device_name", "memory_stats", "reset_peak_memory_stats", "synchronize", "allow_tf32", "benchmark",
  "deterministic", "conv_stats", "adam_step", "sgd_step", NULL,
};
#endif

static const luaL_Reg tensor_methods[] = {
  {"cuda", t_cuda}, {"is_cuda", t_is_cuda}, {"get_device", t_get_device},
  {"pin_memory", t_pin_memory}, {"is_pinned", t_is_pinned},
  {NULL, NULL},
};

void fl_lua_open_cuda(lua_State *L) {
  /* methods go into the tensor metatable, which is where flower.Tensor looks them up (l_tensor.c);
   * fl_lua_open_tensor has run before us (l_core.c) */
  if (luaL_getmetatable(L, FL_TENSOR_MT) == LUA_TTABLE) luaL_setfuncs(L, tensor_methods, 0);
  lua_pop(L, 1);
  lua_newtable(L);
  luaL_setfuncs(L, cuda_funcs, 0);
#ifndef FLOWER_CUDA
  for (int i = 0; device_funcs[i]; i++) {
    lua_pushstring(L, device_funcs[i]);
    lua_pushcclosure(L, l_no_cuda, 1);
    lua_setfield(L, -2, device_funcs[i]);
  }
#endif
  lua_setfield(L, -2, "cuda");
}
