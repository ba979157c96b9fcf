/* Lua bindings of the nn kernels (core/nn.h): flower.core._nn, a table of C functions on tensors.
 * scripts/flower/nn.lua builds the layers on top of them; users normally never call these directly.
 *
 * A window is a Lua table {kh=, kw=, sh=, sw=, dh=, dw=, pt=, pb=, pl=, pr=} as returned by
 * _nn.window(...); for convolutions kh/kw may be left out (taken from the kernel).
 *
 *   _nn.window(H, W, kh, kw, sh, sw, dh, dw, padding)  -> win, OH, OW   (padding 'valid' | 'same')
 *   _nn.conv2d(x, w, win [, scale, shift, relu])        -> y
 *   _nn.conv2d_backward_data(gy, w, x_or_shape, win)    -> gx
 *   _nn.conv2d_backward_filter(x, gy, win, gw [, gb, beta=0])
 *   _nn.depthwise(...), _nn.depthwise_backward_data(...), _nn.depthwise_backward_filter(...)  (same)
 *   _nn.pool2d(x, 'max'|'avg', win [, want_argmax])     -> y [, argmax (int32)]
 *   _nn.pool2d_backward(gy, x_or_shape, 'max'|'avg', win [, argmax]) -> gx   (max: x itself or argmax)
 *   _nn.batchnorm_train(x, gamma, beta, moving_mean, moving_var, momentum, eps [, unbiased=true, relu])
 *                                                       -> y, mean, invstd
 *   _nn.batchnorm_backward(x, gy, mean, invstd, gamma, training, ggamma, gbeta, beta_acc, want_gx [, relu_y])
 *                                                       -> gx|nil   (relu_y: output of a fused ReLU)
 *   _nn.add_act(a, b, scale, relu [, out])              -> out = relu?(a + scale*b); out may be a or b
 *   _nn.channel_affine(x, scale, shift, relu [, out])   -> y   (out may be x: in place)
 *   _nn.act_backward('relu'|'sigmoid'|'tanh'|'softmax', gy, y) -> gx
 *   _nn.softmax_xent(logits, target, smoothing, grad_scale, want_grad) -> loss (N), grad|nil
 *   _nn.gemm(out, a, b, trans_a, trans_b, alpha, beta)   -> out  (out = alpha*op(a)op(b) + beta*out)
 *   _nn.rng_uniform(t, seed, offset)                    -> t    (Philox stream, see core/rng.h)
 *   _nn.axpby(y, a, x, b) -> y (y = a*x + b*y);  _nn.sumsq(x) -> number
 *   _nn.sgd_step(w, g, m|nil, lr, momentum, nesterov);  _nn.adam_step(w, g, m, v, alpha, beta1, beta2, eps)
 *   _nn.now() -> seconds (monotonic wall clock)
 *   _nn.conv_engine('auto'|'own'|'onednn')              (which code runs CPU float32 convolutions;
 *                                                        for benchmarks and tests, see core/nn.h)
 * Optional tensor arguments take nil. */
#include "l_tensor.h"
#include "nn.h"

#include <string.h>

static const fl_tensor *opt_tensor(lua_State *L, int idx) {
  return lua_isnoneornil(L, idx) ? NULL : fl_lua_checktensor(L, idx);
}

static int get_int_field(lua_State *L, int idx, const char *k, int def, const char *fname) {
  int isnum;
  lua_getfield(L, idx, k);
  lua_Integer v = lua_tointegerx(L, -1, &isnum);
  int present = !lua_isnil(L, -1);
  lua_pop(L, 1);
  if (!present) {
    if (def == INT32_MIN) return luaL_error(L, "%s: window field '%s' is missing", fname, k);
    return def;
  }
  if (!isnum || v < 0 || v > (1 << 24)) return luaL_error(L, "%s: window field '%s' must be a small non-negative integer", fname, k);
  return (int)v;
}

/* reads the window table at idx; kh/kw default to the kernel's when w is given */
static void check_window(lua_State *L, int idx, const fl_tensor *w, fl_window *win, const char *fname) {
  luaL_checktype(L, idx, LUA_TTABLE);
  win->kh = get_int_field(L, idx, "kh", w ? (int)w->shape[0] : INT32_MIN, fname);
  win->kw = get_int_field(L, idx, "kw", w ? (int)w->shape[1] : INT32_MIN, fname);
  win->sh = get_int_field(L, idx, "sh", 1, fname);
  win->sw = get_int_field(L, idx, "sw", 1, fname);
  win->dh = get_int_field(L, idx, "dh", 1, fname);
  win->dw = get_int_field(L, idx, "dw", 1, fname);
  win->pt = get_int_field(L, idx, "pt", 0, fname);
  win->pb = get_int_field(L, idx, "pb", 0, fname);
  win->pl = get_int_field(L, idx, "pl", 0, fname);
  win->pr = get_int_field(L, idx, "pr", 0, fname);
}

static void push_window(lua_State *L, const fl_window *win) {
  lua_createtable(L, 0, 10);
#define SETF(name) lua_pushinteger(L, win->name); lua_setfield(L, -2, #name)
  SETF(kh); SETF(kw); SETF(sh); SETF(sw); SETF(dh); SETF(dw); SETF(pt); SETF(pb); SETF(pl); SETF(pr);
#undef SETF
}

static int check_small(lua_State *L, int arg, const char *fname, const char *what) {
  lua_Integer v = luaL_checkinteger(L, arg);
  if (v < 1 || v > (1 << 24)) return luaL_error(L, "%s: %s must be a positive integer, got %I", fname, what, v);
  return (int)v;
}

/* window(H, W, kh, kw, sh, sw, dh, dw, padding) -> win, OH, OW */
static int l_window(lua_State *L) {
  const char *f = "nn.window";
  lua_Integer H = luaL_checkinteger(L, 1), W = luaL_checkinteger(L, 2);
  int kh = check_small(L, 3, f, "kh"), kw = check_small(L, 4, f, "kw");
  int sh = check_small(L, 5, f, "sh"), sw = check_small(L, 6, f, "sw");
  int dh = check_small(L, 7, f, "dh"), dw = check_small(L, 8, f, "dw");
  const char *pad = luaL_checkstring(L, 9);
  fl_window win;
  int64_t oh, ow;
  if (fl_window_init(&win, luaL_optstring(L, 10, "window"), H, W, kh, kw, sh, sw, dh, dw, pad, &oh, &ow))
    return fl_lua_error(L);
  push_window(L, &win);
  lua_pushinteger(L, oh);
  lua_pushinteger(L, ow);
  return 3;
}

/* conv2d(x, w, win [, scale, shift, relu]) */
static int conv_forward(lua_State *L, int depthwise) {
  const char *f = depthwise ? "nn.depthwise" : "nn.conv2d";
  fl_tensor *x = fl_lua_checktensor(L, 1), *w = fl_lua_checktensor(L, 2);
  fl_window win;
  if (w->ndim != 4) return luaL_error(L, "%s: kernel must have 4 dims (KH,KW,Cin,Cout), got %d", f, w->ndim);
  check_window(L, 3, w, &win, f);
  const fl_tensor *scale = opt_tensor(L, 4), *shift = opt_tensor(L, 5);
  int relu = lua_toboolean(L, 6);
  fl_tensor *y = fl_lua_newtensor(L);
  if (depthwise) FL_TRY(L, fl_depthwise_forward(y, x, w, scale, shift, relu, &win));
  else FL_TRY(L, fl_conv2d_forward(y, x, w, scale, shift, relu, &win));
  return 1;
}
static int l_conv2d(lua_State *L) { return conv_forward(L, 0); }
static int l_depthwise(lua_State *L) { return conv_forward(L, 1); }

/* an input shape (N,H,W,C) from a tensor or a table of 4 integers */
static void check_xshape(lua_State *L, int idx, int64_t *shape, const char *f) {
  fl_tensor *x = fl_lua_totensor(L, idx);
  if (x) {
    if (x->ndim != 4) luaL_error(L, "%s: input must have 4 dims (N,H,W,C), got %d", f, x->ndim);
    memcpy(shape, x->shape, sizeof(int64_t) * 4);
    return;
  }
  luaL_checktype(L, idx, LUA_TTABLE);
  if (luaL_len(L, idx) != 4) luaL_error(L, "%s: input shape must have 4 entries (N,H,W,C)", f);
  for (int i = 0; i < 4; i++) {
    lua_geti(L, idx, i + 1);
    int isnum;
    lua_Integer v = lua_tointegerx(L, -1, &isnum);
    if (!isnum || v < 1) luaL_error(L, "%s: input shape entry %d must be a positive integer", f, i + 1);
    shape[i] = v;
    lua_pop(L, 1);
  }
}

/* conv2d_backward_data(gy, w, x_or_shape, win) -> gx */
static int conv_backward_data(lua_State *L, int depthwise) {
  const char *f = depthwise ? "nn.depthwise_backward_data" : "nn.conv2d_backward_data";
  fl_tensor *gy = fl_lua_checktensor(L, 1), *w = fl_lua_checktensor(L, 2);
  int64_t xs[4];
  fl_window win;
  if (w->ndim != 4) return luaL_error(L, "%s: kernel must have 4 dims, got %d", f, w->ndim);
  check_xshape(L, 3, xs, f);
  check_window(L, 4, w, &win, f);
  fl_tensor *gx = fl_lua_newtensor(L);
  if (depthwise) FL_TRY(L, fl_depthwise_backward_data(gx, gy, w, xs, &win));
  else FL_TRY(L, fl_conv2d_backward_data(gx, gy, w, xs, &win));
  return 1;
}
static int l_conv2d_backward_data(lua_State *L) { return conv_backward_data(L, 0); }
static int l_depthwise_backward_data(lua_State *L) { return conv_backward_data(L, 1); }

/* conv2d_backward_filter(x, gy, win, gw [, gb, beta=0]) */
static int conv_backward_filter(lua_State *L, int depthwise) {
  const char *f = depthwise ? "nn.depthwise_backward_filter" : "nn.conv2d_backward_filter";
  fl_tensor *x = fl_lua_checktensor(L, 1), *gy = fl_lua_checktensor(L, 2);
  fl_tensor *gw = fl_lua_checktensor(L, 4);
  fl_tensor *gb = (fl_tensor *)opt_tensor(L, 5);
  double beta = luaL_optnumber(L, 6, 0);
  fl_window win;
  if (gw->ndim != 4) return luaL_error(L, "%s: kernel gradient must have 4 dims, got %d", f, gw->ndim);
  check_window(L, 3, gw, &win, f);
  if (depthwise) FL_TRY(L, fl_depthwise_backward_filter_into(gw, gb, x, gy, &win, beta));
  else FL_TRY(L, fl_conv2d_backward_filter_into(gw, gb, x, gy, &win, beta));
  return 0;
}
static int l_conv2d_backward_filter(lua_State *L) { return conv_backward_filter(L, 0); }
static int l_depthwise_backward_filter(lua_State *L) { return conv_backward_filter(L, 1); }

static fl_pool_kind check_pool_kind(lua_State *L, int idx, const char *f) {
  const char *k = luaL_checkstring(L, idx);
  if (strcmp(k, "max") == 0) return FL_POOL_MAX;
  if (strcmp(k, "avg") == 0) return FL_POOL_AVG;
  luaL_error(L, "%s: pooling kind must be 'max' or 'avg', got '%s'", f, k);
  return FL_POOL_MAX;
}

/* pool2d(x, kind, win [, want_argmax]) -> y [, argmax] */
static int l_pool2d(lua_State *L) {
  const char *f = "nn.pool2d";
  fl_tensor *x = fl_lua_checktensor(L, 1);
  fl_pool_kind kind = check_pool_kind(L, 2, f);
  fl_window win;
  check_window(L, 3, NULL, &win, f);
  int want = lua_toboolean(L, 4);
  fl_tensor *y = fl_lua_newtensor(L);
  fl_tensor *am = want ? fl_lua_newtensor(L) : NULL;
  FL_TRY(L, fl_pool2d_forward(y, am, x, kind, &win));
  return want ? 2 : 1;
}

/* pool2d_backward(gy, x_or_shape, kind, win [, argmax]) -> gx; max pooling needs the input tensor
 * itself or the argmax from its forward */
static int l_pool2d_backward(lua_State *L) {
  const char *f = "nn.pool2d_backward";
  fl_tensor *gy = fl_lua_checktensor(L, 1);
  fl_tensor *x = fl_lua_totensor(L, 2);
  int64_t xs[4];
  check_xshape(L, 2, xs, f);
  fl_pool_kind kind = check_pool_kind(L, 3, f);
  fl_window win;
  check_window(L, 4, NULL, &win, f);
  const fl_tensor *am = opt_tensor(L, 5);
  if (kind == FL_POOL_MAX && !x && !am)
    return luaL_error(L, "%s: max pooling needs the input tensor or its argmax, got a shape", f);
  fl_tensor *gx = fl_lua_newtensor(L);
  FL_TRY(L, fl_pool2d_backward(gx, gy, kind == FL_POOL_MAX ? x : NULL, am, xs, kind, &win));
  return 1;
}

/* batchnorm_train(x, gamma, beta, moving_mean, moving_var, momentum, eps) -> y, mean, invstd */
static int l_batchnorm_train(lua_State *L) {
  fl_tensor *x = fl_lua_checktensor(L, 1);
  const fl_tensor *gamma = opt_tensor(L, 2), *beta = opt_tensor(L, 3);
  fl_tensor *rm = (fl_tensor *)opt_tensor(L, 4), *rv = (fl_tensor *)opt_tensor(L, 5);
  double momentum = luaL_checknumber(L, 6), eps = luaL_checknumber(L, 7);
  int unbiased = lua_isnoneornil(L, 8) ? 1 : lua_toboolean(L, 8);
  int relu = lua_toboolean(L, 9);
  fl_tensor *y = fl_lua_newtensor(L), *mean = fl_lua_newtensor(L), *invstd = fl_lua_newtensor(L);
  FL_TRY(L, fl_batchnorm_forward_train(y, mean, invstd, x, gamma, beta, rm, rv, momentum, eps, unbiased, relu));
  return 3;
}

/* batchnorm_backward(x, gy, mean, invstd, gamma, training, ggamma, gbeta, beta_acc, want_gx) -> gx|nil */
static int l_batchnorm_backward(lua_State *L) {
  fl_tensor *x = fl_lua_checktensor(L, 1), *gy = fl_lua_checktensor(L, 2);
  fl_tensor *mean = fl_lua_checktensor(L, 3), *invstd = fl_lua_checktensor(L, 4);
  const fl_tensor *gamma = opt_tensor(L, 5);
  int training = lua_toboolean(L, 6);
  fl_tensor *gg = (fl_tensor *)opt_tensor(L, 7), *gb = (fl_tensor *)opt_tensor(L, 8);
  double beta_acc = luaL_optnumber(L, 9, 0);
  int want_gx = lua_toboolean(L, 10);
  const fl_tensor *relu_y = opt_tensor(L, 11);
  fl_tensor *gx = NULL;
  if (want_gx) gx = fl_lua_newtensor(L);
  else lua_pushnil(L);
  FL_TRY(L, fl_batchnorm_backward(gx, gg, gb, x, gy, mean, invstd, gamma, training, beta_acc, relu_y));
  return 1;
}

/* channel_affine(x, scale, shift, relu [, out]) -> out */
static int l_channel_affine(lua_State *L) {
  fl_tensor *x = fl_lua_checktensor(L, 1);
  const fl_tensor *scale = opt_tensor(L, 2), *shift = opt_tensor(L, 3);
  int relu = lua_toboolean(L, 4);
  if (!lua_isnoneornil(L, 5)) {
    fl_tensor *out = fl_lua_checktensor(L, 5);
    FL_TRY(L, fl_channel_affine_into(out, x, scale, shift, relu));
    lua_pushvalue(L, 5);
    return 1;
  }
  fl_tensor *y = fl_lua_newtensor(L);
  FL_TRY(L, fl_channel_affine(y, x, scale, shift, relu));
  return 1;
}

/* add_act(a, b, scale, relu [, out]) -> out = a + scale*b (ReLU'd); out may be a or b */
static int l_add_act(lua_State *L) {
  fl_tensor *a = fl_lua_checktensor(L, 1), *b = fl_lua_checktensor(L, 2);
  double scale = luaL_optnumber(L, 3, 1);
  int relu = lua_toboolean(L, 4);
  if (!lua_isnoneornil(L, 5)) {
    fl_tensor *out = fl_lua_checktensor(L, 5);
    if (fl_add_act_into(out, a, b, scale, relu)) return fl_lua_error(L);
    lua_pushvalue(L, 5);
    return 1;
  }
  fl_tensor *y = fl_lua_newtensor(L);
  FL_TRY(L, fl_add_act(y, a, b, scale, relu));
  return 1;
}

/* act_backward(kind, gy, y) -> gx */
static int l_act_backward(lua_State *L) {
  static const char *const names[] = {"relu", "sigmoid", "tanh", "softmax", NULL};
  static const fl_act_kind kinds[] = {FL_ACT_RELU, FL_ACT_SIGMOID, FL_ACT_TANH, FL_ACT_SOFTMAX};
  int k = luaL_checkoption(L, 1, NULL, names);
  fl_tensor *gy = fl_lua_checktensor(L, 2), *y = fl_lua_checktensor(L, 3);
  fl_tensor *gx = fl_lua_newtensor(L);
  FL_TRY(L, fl_act_backward(kinds[k], gx, gy, y));
  return 1;
}

/* softmax_xent(logits, target, smoothing, grad_scale, want_grad) -> loss, grad|nil */
static int l_softmax_xent(lua_State *L) {
  fl_tensor *z = fl_lua_checktensor(L, 1), *t = fl_lua_checktensor(L, 2);
  double smoothing = luaL_optnumber(L, 3, 0), scale = luaL_optnumber(L, 4, 1);
  int want_grad = lua_toboolean(L, 5);
  fl_tensor *loss = fl_lua_newtensor(L);
  fl_tensor *grad = NULL;
  if (want_grad) grad = fl_lua_newtensor(L);
  else lua_pushnil(L);
  FL_TRY(L, fl_softmax_xent(loss, grad, z, t, smoothing, scale));
  return 2;
}

/* gemm(out, a, b, trans_a, trans_b, alpha, beta): out = alpha*op(a)@op(b) + beta*out, in place */
static int l_gemm(lua_State *L) {
  fl_tensor *out = fl_lua_checktensor(L, 1), *a = fl_lua_checktensor(L, 2), *b = fl_lua_checktensor(L, 3);
  int ta = lua_toboolean(L, 4), tb = lua_toboolean(L, 5);
  double alpha = luaL_optnumber(L, 6, 1), beta = luaL_optnumber(L, 7, 0);
  if (fl_gemm(out, a, b, ta, tb, alpha, beta)) return fl_lua_error(L);
  lua_settop(L, 1);
  return 1;
}

/* rng_uniform(t, seed, offset): fills t with uniform [0,1) numbers of the Philox stream (seed,
 * offset) — element i gets counter offset + i — so a seeded layer draws the same numbers on any
 * machine, independent of the global generator. Returns t. */
static int l_rng_uniform(lua_State *L) {
  fl_tensor *t = fl_lua_checktensor(L, 1);
  lua_Integer seed = luaL_checkinteger(L, 2), offset = luaL_checkinteger(L, 3);
  if (offset < 0) return luaL_error(L, "nn.rng_uniform: offset must be >= 0, got %I", offset);
  if (fl_rng(t, FL_RNG_UNIFORM, (uint64_t)seed, (uint64_t)offset, 0, 1)) return fl_lua_error(L);
  lua_settop(L, 1);
  return 1;
}

/* axpby(y, a, x, b): y = a*x + b*y in place -> y */
static int l_axpby(lua_State *L) {
  fl_tensor *y = fl_lua_checktensor(L, 1);
  double a = luaL_checknumber(L, 2);
  fl_tensor *x = fl_lua_checktensor(L, 3);
  double b = luaL_checknumber(L, 4);
  if (fl_axpby(y, a, x, b)) return fl_lua_error(L);
  lua_settop(L, 1);
  return 1;
}

/* sumsq(x) -> sum of squares (a number) */
static int l_sumsq(lua_State *L) {
  double s;
  if (fl_sumsq(fl_lua_checktensor(L, 1), &s)) return fl_lua_error(L);
  lua_pushnumber(L, s);
  return 1;
}

/* sgd_step(w, g, m|nil, lr, momentum, nesterov) */
static int l_sgd_step(lua_State *L) {
  fl_tensor *w = fl_lua_checktensor(L, 1), *g = fl_lua_checktensor(L, 2);
  fl_tensor *m = (fl_tensor *)opt_tensor(L, 3);
  if (fl_sgd_step(w, g, m, luaL_checknumber(L, 4), luaL_optnumber(L, 5, 0), lua_toboolean(L, 6)))
    return fl_lua_error(L);
  return 0;
}

/* adam_step(w, g, m, v, alpha, beta1, beta2, eps) */
static int l_adam_step(lua_State *L) {
  fl_tensor *w = fl_lua_checktensor(L, 1), *g = fl_lua_checktensor(L, 2);
  fl_tensor *m = fl_lua_checktensor(L, 3), *v = fl_lua_checktensor(L, 4);
  if (fl_adam_step(w, g, m, v, luaL_checknumber(L, 5), luaL_checknumber(L, 6), luaL_checknumber(L, 7),
                   luaL_checknumber(L, 8)))
    return fl_lua_error(L);
  return 0;
}

/* conv_engine('auto'|'own'|'onednn') */
static int l_conv_engine(lua_State *L) {
  static const char *const names[] = {"auto", "own", "onednn", NULL};
  static const fl_conv_engine engines[] = {FL_CONV_AUTO, FL_CONV_OWN, FL_CONV_ONEDNN};
  fl_nn_cpu_set_conv_engine(engines[luaL_checkoption(L, 1, NULL, names)]);
  return 0;
}

static const luaL_Reg nn_funcs[] = {
  {"now", fl_lua_now},   /* the executor's per-layer profile, benchmarks */
  {"conv_engine", l_conv_engine},
  {"axpby", l_axpby},
  {"sumsq", l_sumsq},
  {"sgd_step", l_sgd_step},
  {"adam_step", l_adam_step},
  {"window", l_window},
  {"conv2d", l_conv2d},
  {"conv2d_backward_data", l_conv2d_backward_data},
  {"conv2d_backward_filter", l_conv2d_backward_filter},
  {"depthwise", l_depthwise},
  {"depthwise_backward_data", l_depthwise_backward_data},
  {"depthwise_backward_filter", l_depthwise_backward_filter},
  {"pool2d", l_pool2d},
  {"pool2d_backward", l_pool2d_backward},
  {"batchnorm_train", l_batchnorm_train},
  {"batchnorm_backward", l_batchnorm_backward},
  {"channel_affine", l_channel_affine},
  {"act_backward", l_act_backward},
  {"add_act", l_add_act},
  {"softmax_xent", l_softmax_xent},
  {"gemm", l_gemm},
  {"rng_uniform", l_rng_uniform},
  {NULL, NULL},
};

/* Registers `_nn` into the module table at the top of the stack. (Not `nn`: `require 'flower'`
 * copies flower.core's fields, and flower.nn is the Lua module scripts/flower/nn.lua.) */
void fl_lua_open_nn(lua_State *L) {
  luaL_newlib(L, nn_funcs);
  lua_setfield(L, -2, "_nn");
}
