/* Every op and nn kernel of every registered backend against the CPU's (as ggml's test-backend-ops).
 *
 * The test walks the backend registry (core/backend.h); a CPU-only build also registers the fake
 * device backend (fake_backend.h: the CPU's kernels behind memory host code cannot touch), so the
 * walk, the transfers and the comparisons run everywhere, and a `make CUDA=1` build on a GPU compares
 * the CUDA backend too. Each case builds its inputs on the CPU from fixed Philox streams, copies them
 * to the backend's device, runs the same front calls (ops.h, nn.h) on both, copies the results back
 * and compares them per element, for every dtype the case lists. One TAP line a case and backend:
 *   ok - cuda: conv2d forward float32          the backend agrees with the CPU
 *   ok - cuda: softmax_xent bfloat16           both refuse the dtype (the CPU's message is shown)
 *   ok - fake: ... # SKIP fake leaves out ...  the backend has no such kernel: reported, and listed
 *                                              again in the summary at the end
 * A backend registered without a device present (a CUDA build on a machine without a GPU) gets one
 * `# SKIP` line saying why.
 *
 * Tolerances, by the result's dtype (|g - c| per element, c the CPU's; "scale" = |c| + mean |c|):
 *   EXACT  copies, fills, integers, comparisons, max/min/arg*, where, uniform and integer draws,
 *          max pooling: equal (NaN equal to NaN);
 *   ELEM   one rounding (element-wise ops): float64 1e-12, float32 1e-5, bfloat16 2^-6, of scale;
 *   STAT   sums in another order (reductions, softmax, batch norm, losses, optimizer steps, normal
 *          draws): float64 1e-10, float32 1e-4, bfloat16 2^-6, of scale;
 *   GEMM   convolutions and matrix products, max |g - c| over max |c|: float64 1e-10, float32 1e-2
 *          (a GPU may use TF32 tensor cores: 10-bit mantissas), bfloat16 2e-2. */
#include <string.h>
#include <stdlib.h>

#include "check.h"
#include "fake_backend.h"
#include "nn.h"
#include "ops.h"

typedef enum { EXACT, ELEM, STAT, GEMM } tol_kind;

/* ---------------------------------------------------------------- where a case runs */

#define MAXKEEP 48
typedef struct {
  const fl_backend *be;
  int device;
  uint64_t seed;              /* the next input's stream: equal on both runs, so inputs are equal */
  fl_tensor keep[MAXKEEP];    /* inputs and temporaries, freed after the case */
  int nkeep;
} env;

static fl_tensor *slot(env *e) {
  if (e->nkeep == MAXKEEP) { fprintf(stderr, "test_backend_ops: MAXKEEP\n"); exit(2); }
  fl_tensor *t = &e->keep[e->nkeep++];
  memset(t, 0, sizeof *t);
  return t;
}

static void env_free(env *e) {
  for (int i = 0; i < e->nkeep; i++) fl_tensor_free(&e->keep[i]);
  e->nkeep = 0;
}

/* a copy of host tensor h on e's device (h itself on the CPU) */
static fl_tensor *on_device(env *e, fl_tensor *h) {
  if (e->be == &fl_cpu_backend) return h;
  fl_tensor *t = slot(e);
  if (fl_tensor_init(t, e->be, e->device, h->dtype, h->ndim, h->shape) || e->be->copy(t, h)) return NULL;
  return t;
}

/* random input: uniform in [lo, hi) (integers: [lo, hi) too) made on the CPU in float64 and cast
 * there, then moved to the device */
static fl_tensor *in(env *e, fl_dtype dt, int ndim, const int64_t *shape, double lo, double hi) {
  fl_tensor *h64 = slot(e), *h = slot(e);
  int isint = !fl_dtype_is_float(dt);
  if (fl_tensor_init(h64, &fl_cpu_backend, 0, isint ? FL_I64 : FL_F64, ndim, shape)) return NULL;
  if (fl_rng(h64, isint ? FL_RNG_INT : FL_RNG_UNIFORM, 1234, e->seed, lo, hi)) return NULL;
  e->seed += 1 << 20;
  if (fl_cast(h, h64, dt)) return NULL;
  return on_device(e, h);
}

/* a zero-filled tensor on the device (outputs written in place) */
static fl_tensor *zeros(env *e, fl_dtype dt, int ndim, const int64_t *shape) {
  fl_tensor *t = slot(e);
  if (fl_tensor_init(t, e->be, e->device, dt, ndim, shape) || fl_fill(t, 0)) return NULL;
  return t;
}

#define SH(...) (sizeof((int64_t[]){__VA_ARGS__}) / sizeof(int64_t)), ((int64_t[]){__VA_ARGS__})
#define TRY(x) do { if (!(x)) return -1; } while (0)
#define RUN(x) do { if ((x) != 0) return -1; } while (0)

/* ---------------------------------------------------------------- the cases */

/* A case fills out[0..n-1] (new tensors or views of in-place results) and returns n, or -1 with a
 * message. `dt` is the dtype under test, `k` the case's variant. */
#define MAXOUT 6
typedef int (*case_fn)(env *e, fl_dtype dt, int k, fl_tensor *out);

static int view(fl_tensor *out, const fl_tensor *t) { fl_tensor_init_view(out, t); return 0; }

/* mixed precision: bfloat16 activations go with float32 parameters, statistics and gradients */
static fl_dtype param_dt(fl_dtype dt) { return dt == FL_BF16 ? FL_F32 : dt; }

static int c_copy(env *e, fl_dtype dt, int k, fl_tensor *out) {
  fl_tensor *a = in(e, dt, SH(3, 4, 5), -50, 50);
  TRY(a);
  fl_tensor v = *a;                     /* a strided view: transposed and narrowed */
  RUN(fl_view_transpose(&v, 0, 2));
  RUN(fl_view_narrow(&v, 1, 1, 2));
  static const fl_dtype to[] = {FL_F32, FL_F64, FL_I32, FL_I64, FL_U8, FL_BF16};
  RUN(fl_cast(&out[0], &v, to[k]));      /* conversion of a strided source */
  RUN(fl_clone(&out[1], &v));
  fl_tensor *empty = in(e, dt, SH(0, 3), 0, 1);
  TRY(empty);
  RUN(fl_cast(&out[2], empty, to[k]));
  return 3;
}

/* cat along each dim with a strided and a promoted part, and stack */
static int c_cat(env *e, fl_dtype dt, int k, fl_tensor *out) {
  fl_tensor *a = in(e, dt, SH(2, 3, 4), -9, 9), *b = in(e, FL_I32, SH(2, 3, 8), -9, 9);
  TRY(a && b);
  fl_tensor bt = *b;
  RUN(fl_view_narrow(&bt, 2, 2, 4));      /* (2,3,4) with the strides of (2,3,8) */
  const fl_tensor *ts[3] = {a, &bt, a};
  RUN(fl_cat(&out[0], ts, 3, k, 0));
  RUN(fl_cat(&out[1], ts, 3, k, 1));
  return 2;
}

/* the rounding cases of conversions: ties to even into bfloat16 (1 + 2^-8 -> 1, 1 + 3*2^-8 ->
 * 1 + 2^-6), overflow to infinity, NaN, signed zero, subnormals, and into integers saturation and
 * NaN to 0; k picks the target dtype */
static int c_special(env *e, fl_dtype dt, int k, fl_tensor *out) {
  static const double v[] = {1, 1 + 0x1p-8, 1 + 3 * 0x1p-8, -2.75, 257, 3.4e38, 1e39, -INFINITY, NAN, -0.0,
                             1e-40, 3.5, -3.5, 1e10, -1e10, 300, -5};
  int64_t n = (int64_t)(sizeof v / sizeof v[0]);
  fl_tensor *h64 = slot(e), *h = slot(e);
  RUN(fl_tensor_init(h64, &fl_cpu_backend, 0, FL_F64, 1, &n));
  for (int64_t i = 0; i < n; i++) fl_tensor_set(h64, &i, v[i]);
  RUN(fl_cast(h, h64, dt));
  fl_tensor *a = on_device(e, h);
  TRY(a);
  static const fl_dtype to[] = {FL_F32, FL_F64, FL_I32, FL_I64, FL_U8, FL_BF16};
  return fl_cast(&out[0], a, to[k]) ? -1 : 1;
}

/* k: 0 a value every dtype holds, 1 one that saturates the integers */
static int c_fill(env *e, fl_dtype dt, int k, fl_tensor *out) {
  fl_tensor *a = in(e, dt, SH(7, 9), 0, 10);
  TRY(a);
  fl_tensor v = *a;
  RUN(fl_view_narrow(&v, 1, 2, 4));
  RUN(fl_fill(&v, k ? -3e10 : 3.75));
  return view(&out[0], a) ? -1 : 1;
}

static const fl_binop binops[] = {FL_ADD, FL_SUB, FL_MUL, FL_DIV, FL_POW, FL_MAXIMUM, FL_MINIMUM,
                                  FL_EQ, FL_NE, FL_LT, FL_LE, FL_GT, FL_GE};
static int c_binary(env *e, fl_dtype dt, int k, fl_tensor *out) {
  int pw = binops[k] == FL_POW;
  fl_tensor *a = in(e, dt, SH(4, 1, 6), pw ? 0.5 : -8, pw ? 3 : 8);
  fl_tensor *b = in(e, dt, SH(5, 6), pw ? 0 : -8, pw ? 3 : 8);
  TRY(a && b);
  if (binops[k] == FL_DIV && !fl_dtype_is_float(dt)) RUN(fl_fill(b, 3));
  RUN(fl_binary(binops[k], &out[0], a, b));
  fl_tensor bt = *b;                    /* a transposed (strided) operand */
  RUN(fl_view_transpose(&bt, 0, 1));
  fl_tensor *c = in(e, dt, SH(6, 5), pw ? 0.5 : -8, pw ? 3 : 8);
  TRY(c);
  RUN(fl_binary(binops[k], &out[1], c, &bt));
  if (!fl_dtype_is_float(dt)) return 2;
  fl_tensor *n = in(e, dt, SH(5, 6), -8, 8);   /* NaN operands: maximum/minimum propagate them */
  TRY(n);
  fl_tensor row = *n;
  RUN(fl_view_narrow(&row, 0, 1, 1));
  RUN(fl_fill(&row, NAN));
  RUN(fl_binary(binops[k], &out[2], n, b));
  return 3;
}

static const fl_unop unops[] = {FL_NEG, FL_EXP, FL_LOG, FL_SQRT, FL_ABS, FL_TANH, FL_SIGMOID, FL_RELU,
                                FL_CLAMP, FL_POWS, FL_AFFINE};
static int c_unary(env *e, fl_dtype dt, int k, fl_tensor *out) {
  fl_unop op = unops[k];
  int pos = op == FL_LOG || op == FL_SQRT || op == FL_POWS;
  fl_tensor *a = in(e, dt, SH(5, 7), pos ? 1 : -4, 5);
  TRY(a);
  double p0 = op == FL_CLAMP ? -1 : op == FL_POWS ? 2 : op == FL_AFFINE ? 3 : 0;
  double p1 = op == FL_CLAMP ? 2 : op == FL_AFFINE ? -1 : 0;
  RUN(fl_unary(op, &out[0], a, p0, p1));
  fl_tensor at = *a;
  RUN(fl_view_transpose(&at, 0, 1));
  RUN(fl_unary(op, &out[1], &at, p0, p1));
  return 2;
}

/* NaN counts as the largest and the smallest; ties go to the first occurrence */
static int c_reduce_nan(env *e, fl_dtype dt, int k, fl_tensor *out) {
  fl_tensor *a = in(e, dt, SH(3, 5), 0, 3);
  TRY(a);
  fl_tensor row = *a, one = *a;
  RUN(fl_view_narrow(&row, 0, 1, 1));
  RUN(fl_fill(&row, 2));                /* a row of ties */
  RUN(fl_view_narrow(&one, 0, 2, 1));
  RUN(fl_view_narrow(&one, 1, 3, 1));
  RUN(fl_fill(&one, NAN));
  static const fl_redop ops[] = {FL_ARGMAX, FL_ARGMIN, FL_MAX, FL_MIN};
  RUN(fl_reduce(ops[k], &out[0], a, 1, 0, 1));
  RUN(fl_reduce(ops[k], &out[1], a, -1, 0, 1));
  return 2;
}

static const fl_redop redops[] = {FL_SUM, FL_MEAN, FL_MAX, FL_MIN, FL_ARGMAX, FL_ARGMIN, FL_VAR, FL_STD};
static int c_reduce(env *e, fl_dtype dt, int k, fl_tensor *out) {
  fl_tensor *a = in(e, dt, SH(6, 5, 33), -9, 9);
  TRY(a);
  for (int d = -1; d < 3; d++) RUN(fl_reduce(redops[k], &out[d + 1], a, d, 0, 1));
  /* many blocks with a ragged tail; wide rows (a block per output) */
  fl_tensor *big = in(e, dt, SH(1000003), -9, 9), *wide = in(e, dt, SH(3, 5000), -9, 9);
  TRY(big && wide);
  RUN(fl_reduce(redops[k], &out[4], big, -1, 0, 1));
  RUN(fl_reduce(redops[k], &out[5], wide, 1, 0, 1));
  return 6;
}

static int c_where(env *e, fl_dtype dt, int k, fl_tensor *out) {
  (void)k;
  fl_tensor *m = in(e, FL_U8, SH(4, 1), 0, 2), *a = in(e, dt, SH(4, 6), -5, 5), *b = in(e, dt, SH(6), -5, 5);
  TRY(m && a && b);
  return fl_where(&out[0], m, a, b) ? -1 : 1;
}

/* k: batched by a shared matrix, a transposed (strided) operand, vector @ matrix, matrix @ vector,
 * broadcast batch dims, a large product, gemm with both operands transposed, alpha and beta, and
 * gemm accumulating x^T g into float32 for bfloat16 operands (mixed precision's master gradients) */
static int c_matmul(env *e, fl_dtype dt, int k, fl_tensor *out) {
  static const struct { int na, nb; int64_t a[4], b[4]; } mm[] = {
    {3, 2, {3, 17, 40}, {40, 23}}, {3, 3, {3, 40, 17}, {3, 40, 23}}, {1, 2, {7}, {7, 4}}, {2, 1, {4, 7}, {7}},
    {4, 3, {3, 1, 4, 6}, {2, 6, 5}}, {2, 2, {130, 257}, {257, 65}},
  };
  if (k == 7) {
    fl_tensor *x = in(e, dt, SH(130, 257), -1, 1), *g = in(e, dt, SH(130, 65), -1, 1);
    fl_tensor *acc = in(e, param_dt(dt), SH(257, 65), -1, 1);
    TRY(x && g && acc);
    RUN(fl_gemm(acc, x, g, 1, 0, 1, 1));
    return view(&out[0], acc) ? -1 : 1;
  }
  if (k == 6) {
    fl_tensor *a = in(e, dt, SH(9, 6), -1, 1), *b = in(e, dt, SH(5, 9), -1, 1), *o = in(e, dt, SH(6, 5), -1, 1);
    TRY(a && b && o);
    RUN(fl_gemm(o, a, b, 1, 1, 0.5, 2));
    return view(&out[0], o) ? -1 : 1;
  }
  fl_tensor *a = in(e, dt, mm[k].na, mm[k].a, -1, 1), *b = in(e, dt, mm[k].nb, mm[k].b, -1, 1);
  TRY(a && b);
  fl_tensor at = *a;
  if (k == 1) RUN(fl_view_transpose(&at, 1, 2));   /* (3,17,40) through the strides */
  return fl_matmul(&out[0], &at, b) ? -1 : 1;
}

static int c_softmax(env *e, fl_dtype dt, int k, fl_tensor *out) {
  fl_tensor *a = in(e, dt, SH(3, 4, 300), -10, 10);
  TRY(a);
  for (int d = 0; d < 3; d++) RUN(fl_softmax(&out[d], a, d, k));
  return 3;
}

static int c_rng(env *e, fl_dtype dt, int k, fl_tensor *out) {
  fl_tensor *t = zeros(e, dt, SH(10007));   /* not a multiple of Philox's 4 outputs, at an odd offset */
  TRY(t);
  static const fl_rngkind kinds[] = {FL_RNG_UNIFORM, FL_RNG_NORMAL, FL_RNG_INT};
  RUN(fl_rng(t, kinds[k], 77, 12345, k == 2 ? -3 : 0.5, k == 2 ? 40 : 2));
  return view(&out[0], t) ? -1 : 1;
}

/* ---- nn kernels ---- */

/* conv cases: x (N,H,W,C), kernel, strides, dilation, padding */
static const struct { int64_t x[4]; int kh, kw, f, s, d; const char *pad; } convs[] = {
  {{2, 9, 8, 3}, 3, 3, 5, 1, 1, "same"},
  {{2, 11, 10, 4}, 3, 2, 6, 2, 1, "valid"},
  {{1, 12, 12, 3}, 3, 3, 4, 1, 2, "same"},
  {{2, 7, 7, 8}, 1, 1, 16, 1, 1, "valid"},
  {{2, 9, 10, 4}, 3, 3, 5, 2, 1, "same"},      /* asymmetric padding (bottom/right) */
  {{1, 11, 11, 3}, 7, 7, 4, 2, 1, "valid"},
  {{2, 8, 8, 5}, 2, 2, 3, 2, 1, "same"},
};

static int window_for(int k, fl_window *win, int64_t *oh, int64_t *ow) {
  return fl_window_init(win, "conv", convs[k].x[1], convs[k].x[2], convs[k].kh, convs[k].kw, convs[k].s,
                        convs[k].s, convs[k].d, convs[k].d, convs[k].pad, oh, ow);
}


static int c_conv(env *e, fl_dtype dt, int k, fl_tensor *out, int depthwise) {
  fl_window win;
  int64_t oh, ow;
  RUN(window_for(k, &win, &oh, &ow));
  int64_t C = convs[k].x[3], F = depthwise ? C * 2 : convs[k].f;
  fl_tensor *x = in(e, dt, 4, convs[k].x, -1, 1);
  fl_tensor *w = depthwise ? in(e, dt, SH(convs[k].kh, convs[k].kw, C, 2), -1, 1)
                           : in(e, dt, SH(convs[k].kh, convs[k].kw, C, F), -1, 1);
  fl_tensor *sc = in(e, param_dt(dt), SH(F), 0.5, 1.5), *sh = in(e, param_dt(dt), SH(F), -0.5, 0.5);
  fl_tensor *gy = in(e, dt, SH(convs[k].x[0], oh, ow, F), -1, 1);
  TRY(x && w && sc && sh && gy);
  fl_tensor *gw = zeros(e, param_dt(dt), w->ndim, w->shape), *gb = zeros(e, param_dt(dt), SH(F));
  TRY(gw && gb);
  RUN(fl_fill(gw, 0.25));               /* beta 0.5 scales it and adds */
  if (depthwise) {
    RUN(fl_depthwise_forward(&out[0], x, w, sc, sh, k % 2, &win));
    RUN(fl_depthwise_backward_data(&out[1], gy, w, x->shape, &win));
    RUN(fl_depthwise_backward_filter_into(gw, gb, x, gy, &win, 0.5));
  } else {
    RUN(fl_conv2d_forward(&out[0], x, w, sc, sh, k % 2, &win));
    RUN(fl_conv2d_backward_data(&out[1], gy, w, x->shape, &win));
    RUN(fl_conv2d_backward_filter_into(gw, gb, x, gy, &win, 0.5));
  }
  view(&out[2], gw);
  view(&out[3], gb);
  return 4;
}
static int c_conv2d(env *e, fl_dtype dt, int k, fl_tensor *out) { return c_conv(e, dt, k, out, 0); }
static int c_depthwise(env *e, fl_dtype dt, int k, fl_tensor *out) { return c_conv(e, dt, k, out, 1); }

/* k: 0 max 3x3/2 same, 1 avg 3x3/2 same, 2 max 2x2/2 valid, 3 avg 3x3/1 valid, 4 max 3x3/1 same,
 * 5 avg 2x2/2 valid */
static int c_pool(env *e, fl_dtype dt, int k, fl_tensor *out) {
  fl_pool_kind kind = k % 2 ? FL_POOL_AVG : FL_POOL_MAX;
  int ks = k == 2 || k == 5 ? 2 : 3, st = k == 3 || k == 4 ? 1 : 2;
  fl_window win;
  int64_t oh, ow;
  RUN(fl_window_init(&win, "pool", 9, 8, ks, ks, st, st, 1, 1, k < 2 || k == 4 ? "same" : "valid", &oh, &ow));
  fl_tensor *x = in(e, dt, SH(2, 9, 8, 5), -4, 4), *gy = in(e, dt, SH(2, oh, ow, 5), -1, 1);
  TRY(x && gy);
  fl_tensor *am = kind == FL_POOL_MAX ? slot(e) : NULL;
  RUN(fl_pool2d_forward(&out[0], am, x, kind, &win));
  RUN(fl_pool2d_backward(&out[1], gy, kind == FL_POOL_MAX ? x : NULL, NULL, x->shape, kind, &win));
  if (!am) return 2;
  view(&out[2], am);
  RUN(fl_pool2d_backward(&out[3], gy, NULL, am, x->shape, kind, &win));
  return 4;
}

/* k: 0 plain, 1 fused ReLU and unbiased running variance, 2 no gamma/beta, inference-mode backward */
static int c_batchnorm(env *e, fl_dtype dt, int k, fl_tensor *out) {
  fl_dtype p = param_dt(dt);
  fl_tensor *x = in(e, dt, SH(3, 5, 4, 6), -2, 3), *gy = in(e, dt, SH(3, 5, 4, 6), -1, 1);
  fl_tensor *g = in(e, p, SH(6), 0.5, 1.5), *b = in(e, p, SH(6), -1, 1);
  fl_tensor *rm = in(e, p, SH(6), -1, 1), *rv = in(e, p, SH(6), 0.5, 2);
  fl_tensor *gg = in(e, p, SH(6), -1, 1), *gbeta = in(e, p, SH(6), -1, 1);   /* k 1 accumulates onto them */
  TRY(x && gy && g && b && rm && rv && gg && gbeta);
  fl_tensor *mean = slot(e), *invstd = slot(e);
  RUN(fl_batchnorm_forward_train(&out[0], mean, invstd, x, k == 2 ? NULL : g, k == 2 ? NULL : b, rm, rv, 0.9,
                                 1e-3, k == 1, k == 1));
  RUN(fl_batchnorm_backward(&out[1], k == 2 ? NULL : gg, k == 2 ? NULL : gbeta, x, gy, mean, invstd, k == 2 ? NULL : g, k != 2, k == 1,
                            k == 1 ? &out[0] : NULL));
  view(&out[2], rm);
  view(&out[3], rv);
  view(&out[4], gg);
  view(&out[5], gbeta);
  return 6;
}

/* channel_affine (k 0: scale and shift, 1: shift only and ReLU), add_act (k 0: sum, 1: scaled + ReLU) */
static int c_affine(env *e, fl_dtype dt, int k, fl_tensor *out) {
  fl_tensor *x = in(e, dt, SH(4, 3, 7), -2, 2), *y = in(e, dt, SH(4, 3, 7), -2, 2);
  fl_tensor *sc = in(e, param_dt(dt), SH(7), 0.5, 1.5), *sh = in(e, param_dt(dt), SH(7), -1, 1);
  TRY(x && y && sc && sh);
  RUN(fl_channel_affine(&out[0], x, k ? NULL : sc, sh, k));
  RUN(fl_add_act(&out[1], x, y, k ? 0.17 : 1, k));
  RUN(fl_channel_affine_into(y, y, sc, k ? NULL : sh, !k));   /* in place */
  view(&out[2], y);
  return 3;
}

static int c_act_backward(env *e, fl_dtype dt, int k, fl_tensor *out) {
  fl_tensor *gy = in(e, dt, SH(6, 11), -1, 1), *x = in(e, dt, SH(6, 11), -3, 3);
  TRY(gy && x);
  fl_tensor *y = slot(e);
  static const fl_unop fwd[] = {FL_RELU, FL_SIGMOID, FL_TANH};
  if (k < 3) RUN(fl_unary(fwd[k], y, x, 0, 0));
  else RUN(fl_softmax(y, x, 1, 0));
  return fl_act_backward((fl_act_kind)k, &out[0], gy, y) ? -1 : 1;
}

/* k: 0 int64 labels, 1 int32 labels with smoothing, 2 probabilities */
static int c_xent(env *e, fl_dtype dt, int k, fl_tensor *out) {
  int64_t K = k == 1 ? 1000 : 6;        /* a wide row: the GPU's reductions over blocks */
  fl_tensor *logits = in(e, dt, SH(9, K), -8, 8);
  fl_tensor *t = k == 2 ? in(e, dt, SH(9, K), 0, 1) : in(e, k ? FL_I32 : FL_I64, SH(9), 0, (double)K);
  TRY(logits && t);
  fl_tensor *grad = zeros(e, dt, SH(9, K));
  TRY(grad);
  RUN(fl_softmax_xent(&out[0], grad, logits, t, k == 1 ? 0.1 : 0, 1.0 / 9));
  view(&out[1], grad);
  return 2;
}

/* k: 0 axpby and sumsq, 1 SGD, 2 SGD momentum, 3 SGD Nesterov, 4 Adam */
static int c_optim(env *e, fl_dtype dt, int k, fl_tensor *out) {
  fl_tensor *w = in(e, dt, SH(3, 37), -1, 1), *g = in(e, dt, SH(3, 37), -1, 1);
  fl_tensor *m = in(e, dt, SH(3, 37), -0.1, 0.1), *v = in(e, dt, SH(3, 37), 0, 0.01);
  TRY(w && g && m && v);
  if (k == 0) {
    double ss;
    RUN(fl_axpby(w, 0.5, g, -2));
    RUN(fl_sumsq(w, &ss));
    fl_tensor *s = slot(e);
    RUN(fl_tensor_init_scalar(s, &fl_cpu_backend, 0, FL_F64, ss));
    view(&out[1], s);
  } else if (k < 4) {
    RUN(fl_sgd_step(w, g, k == 1 ? NULL : m, 0.1, k == 1 ? 0 : 0.9, k == 3));
    view(&out[1], m);
  } else {
    RUN(fl_adam_step(w, g, m, v, 1e-3, 0.9, 0.999, 1e-7));
    view(&out[1], v);
    view(&out[2], m);
  }
  view(&out[0], w);
  return k == 4 ? 3 : 2;
}

/* ---------------------------------------------------------------- the table of cases */

#define ALL {FL_F32, FL_F64, FL_I32, FL_I64, FL_U8, FL_BF16}
#define FLOATS {FL_F32, FL_F64, FL_BF16}
static const struct {
  const char *name;
  case_fn fn;
  int variants;
  tol_kind tol;
  fl_dtype dts[6];
  int ndt;
} cases[] = {
  {"copy and convert, strided", c_copy, 6, EXACT, ALL, 6},
  {"fill a view", c_fill, 2, EXACT, ALL, 6},
  {"conversions: rounding, overflow, NaN, signed zero, saturation", c_special, 6, EXACT, FLOATS, 3},
  {"binary ops, broadcast", c_binary, 13, ELEM, ALL, 6},
  {"unary ops", c_unary, 11, ELEM, ALL, 6},
  {"reductions", c_reduce, 8, STAT, ALL, 6},
  {"arg/max/min with NaN and ties", c_reduce_nan, 4, EXACT, FLOATS, 3},
  {"where", c_where, 1, EXACT, ALL, 6},
  {"cat and stack", c_cat, 3, EXACT, ALL, 6},
  {"matmul and gemm", c_matmul, 8, GEMM, FLOATS, 3},
  {"softmax, log-softmax", c_softmax, 2, STAT, FLOATS, 3},
  {"uniform, normal, integer draws", c_rng, 3, STAT, ALL, 6},
  {"conv2d forward, backward data and filter", c_conv2d, 7, GEMM, FLOATS, 3},
  {"depthwise forward, backward data and filter", c_depthwise, 7, GEMM, FLOATS, 3},
  {"pool2d forward and backward", c_pool, 6, STAT, FLOATS, 3},
  {"batchnorm train forward and backward", c_batchnorm, 3, STAT, FLOATS, 3},
  {"channel_affine, add_act", c_affine, 2, ELEM, FLOATS, 3},
  {"act_backward", c_act_backward, 4, STAT, FLOATS, 3},
  {"softmax_xent", c_xent, 3, STAT, FLOATS, 3},
  {"axpby, sumsq, sgd_step, adam_step", c_optim, 5, STAT, FLOATS, 3},
};
#define NCASES (int)(sizeof cases / sizeof cases[0])

/* ---------------------------------------------------------------- comparison */

static double tolerance(tol_kind kind, fl_dtype dt) {
  if (kind == EXACT || !fl_dtype_is_float(dt)) return 0;
  static const double t[4][3] = {{0, 0, 0}, {1e-5, 1e-12, 1.0 / 64}, {1e-4, 1e-10, 1.0 / 64}, {1e-2, 1e-10, 2e-2}};
  return t[kind][dt == FL_F32 ? 0 : dt == FL_F64 ? 1 : 2];
}

/* a float64 host copy of t (run by t's backend) */
static int host64(fl_tensor *h, const fl_tensor *t) {
  if (fl_tensor_init(h, &fl_cpu_backend, 0, FL_F64, t->ndim, t->shape)) return -1;
  return t->storage->backend->copy(h, t);
}

/* "" when g (the backend's) agrees with c (the CPU's), else what differs */
static const char *compare(const fl_tensor *g, const fl_tensor *c, tol_kind kind, char *why, size_t n) {
  char sg[80], sc[80];
  if (g->dtype != c->dtype || !fl_tensor_same_shape(g, c)) {
    fl_shape_str(sg, sizeof sg, g->ndim, g->shape);
    fl_shape_str(sc, sizeof sc, c->ndim, c->shape);
    snprintf(why, n, "result %s %s, the CPU's %s %s", fl_dtype_name(g->dtype), sg, fl_dtype_name(c->dtype), sc);
    return why;
  }
  fl_tensor hg, hc;
  memset(&hg, 0, sizeof hg);
  memset(&hc, 0, sizeof hc);
  if (host64(&hg, g) || host64(&hc, c)) {
    snprintf(why, n, "copy to the host: %s", fl_errmsg());
    fl_tensor_free(&hg);
    fl_tensor_free(&hc);
    return why;
  }
  const double *a = fl_tensor_data(&hg), *b = fl_tensor_data(&hc);
  int64_t len = fl_tensor_numel(&hc);
  double tol = tolerance(kind, c->dtype), mean = 0, big = 0;
  for (int64_t i = 0; i < len; i++) {
    if (isfinite(b[i])) mean += fabs(b[i]) / (double)len;
    if (isfinite(b[i]) && fabs(b[i]) > big) big = fabs(b[i]);
  }
  why[0] = '\0';
  for (int64_t i = 0; i < len && !why[0]; i++) {
    if (isnan(a[i]) && isnan(b[i])) continue;
    if (a[i] == b[i] && signbit(a[i]) == signbit(b[i])) continue;
    double err = fabs(a[i] - b[i]);
    double lim = kind == GEMM ? tol * big : tol * (fabs(b[i]) + mean);
    if (a[i] == b[i]) lim = 0;             /* zeros of opposite signs: EXACT tells them apart */
    if (!(err <= lim))
      snprintf(why, n, "element %lld: %.9g, the CPU's %.9g (|diff| %.3g > %.3g)", (long long)i, a[i], b[i], err, lim);
  }
  fl_tensor_free(&hg);
  fl_tensor_free(&hc);
  return why[0] ? why : "";
}

/* ---------------------------------------------------------------- the walk */

static int kernel_missing(const fl_backend *be, const char *msg) {
  char want[128];
  snprintf(want, sizeof want, "not supported by backend '%s'", be->name);
  return strstr(msg, want) != NULL || strstr(msg, "has no nn kernels") != NULL;
}

static char left_out[2048];   /* "fake axpby, cuda depthwise_forward": for the summary line */

/* one case for one dtype on one backend: every variant, one TAP line, and one `# SKIP` line for
 * each kernel the backend leaves out */
static void run_case(const fl_backend *be, int device, int ci, fl_dtype dt) {
  char name[160], why[512], cpu_msg[512], missing[256] = "";
  snprintf(name, sizeof name, "%s: %s %s", be->name, cases[ci].name, fl_dtype_name(dt));
  check_test_begin(name);
  int refused = 0;
  for (int k = 0; k < cases[ci].variants; k++) {
    env ec = {.be = &fl_cpu_backend, .seed = 1}, eg = {.be = be, .device = device, .seed = 1};
    fl_tensor oc[MAXOUT], og[MAXOUT];
    memset(oc, 0, sizeof oc);
    memset(og, 0, sizeof og);
    int nc = cases[ci].fn(&ec, dt, k, oc);
    snprintf(cpu_msg, sizeof cpu_msg, "%s", nc < 0 ? fl_errmsg() : "");
    int ng = cases[ci].fn(&eg, dt, k, og);
    if (nc < 0 && ng < 0 && strstr(cpu_msg, fl_dtype_name(dt))) {
      refused = 1;                       /* the dtype is refused by both: the front's checks */
    } else if (ng < 0 && kernel_missing(be, fl_errmsg())) {
      /* the message starts with the kernel's name: "axpby: not supported by backend 'fake'" */
      const char *msg = fl_errmsg(), *colon = strchr(msg, ':');
      char kernel[64];
      snprintf(kernel, sizeof kernel, "%.*s", colon ? (int)(colon - msg) : 63, msg);
      if (!strstr(missing, kernel)) {
        printf("ok - %s: %s # SKIP %s leaves out %s\n", be->name, kernel, be->name, kernel);
        size_t len = strlen(missing);
        snprintf(missing + len, sizeof missing - len, " %s", kernel);
        len = strlen(left_out);
        snprintf(left_out + len, sizeof left_out - len, "%s%s %s", len ? ", " : "", be->name, kernel);
      }
    } else if (nc < 0 || ng < 0) {
      printf("not ok - %s: variant %d: %s: %s\n", name, k, nc < 0 ? "the CPU fails" : "the backend fails",
             nc < 0 ? cpu_msg : fl_errmsg());
      check_failures_here++;
    } else if (nc != ng) {
      printf("not ok - %s: variant %d: %d results, the CPU's %d\n", name, k, ng, nc);
      check_failures_here++;
    } else {
      for (int i = 0; i < nc; i++) {
        const char *d = compare(&og[i], &oc[i], cases[ci].tol, why, sizeof why);
        if (*d) {
          printf("not ok - %s: variant %d, result %d: %s\n", name, k, i + 1, d);
          check_failures_here++;
        }
      }
    }
    for (int i = 0; i < MAXOUT; i++) {
      fl_tensor_free(&oc[i]);
      fl_tensor_free(&og[i]);
    }
    env_free(&ec);
    env_free(&eg);
  }
  if (refused && check_failures_here == 0) {
    printf("ok - %s (refused by the CPU and the backend alike: %s)\n", name, cpu_msg);
    return;
  }
  check_test_end();
}

static void run_backend(const fl_backend *be) {
  int devices = fl_backend_devices(be);
  if (devices == 0) {
    printf("ok - %s: every op against the CPU # SKIP no %s device (%s)\n", be->name, be->name,
           be->unavailable_reason ? be->unavailable_reason() : "none present");
    return;
  }
  for (int ci = 0; ci < NCASES; ci++)
    for (int d = 0; d < cases[ci].ndt; d++) run_case(be, devices > 1 ? 1 : 0, ci, cases[ci].dts[d]);
}

int main(void) {
  /* the fake device backend stands in for a GPU wherever no other backend has a device */
  int only_cpu = 1;
  for (int i = 1; i < fl_backend_count(); i++)
    if (fl_backend_devices(fl_backend_at(i)) > 0) only_cpu = 0;
  if (only_cpu && fl_backend_register(&fake_backend)) {
    printf("not ok - register the fake backend: %s\n", fl_errmsg());
    return 1;
  }
  TEST("the registry lists the CPU first and finds backends by name") {
    CHECK(fl_backend_at(0) == &fl_cpu_backend);
    CHECK(fl_backend_find("cpu") == &fl_cpu_backend);
    CHECK(fl_backend_find("no-such") == NULL);
    CHECK(fl_backend_register(&fl_cpu_backend) == -1 && strstr(fl_errmsg(), "'cpu' exists"));
    const fl_backend *be = NULL;
    int dev = -1;
    CHECK(fl_device_parse("to", "cpu", &be, &dev) == 0 && be == &fl_cpu_backend && dev == 0);
    CHECK(fl_device_parse("to", "tpu:0", &be, &dev) == -1 && strstr(fl_errmsg(), "no backend 'tpu'"));
    CHECK(fl_device_parse("to", "cpu:x", &be, &dev) == -1 && strstr(fl_errmsg(), "integer >= 0"));
    CHECK(fl_device_parse("to", "cpu:1", &be, &dev) == -1 && strstr(fl_errmsg(), "there is 1 cpu device (0..0)"));
    if (only_cpu) {
      CHECK(fl_device_parse("to", "fake:1", &be, &dev) == 0 && be == &fake_backend && dev == 1);
    }
  }
  for (int i = 0; i < fl_backend_count(); i++)
    if (fl_backend_at(i) != &fl_cpu_backend) run_backend(fl_backend_at(i));
  if (only_cpu) {   /* take a kernel out of the fake backend: it must be reported */
    int (*keep)(fl_tensor *, double, const fl_tensor *, double) = fake_nn_ops.axpby;
    fake_nn_ops.axpby = NULL;
    size_t before = strlen(left_out);
    run_case(&fake_backend, 0, NCASES - 1, FL_F32);
    fake_nn_ops.axpby = keep;
    TEST("a kernel a backend leaves out is reported, not passed over") {
      CHECK(strstr(left_out + before, "fake axpby") != NULL);
    }
    left_out[before] = '\0';
  }
  if (left_out[0]) printf("# kernels left out: %s\n", left_out);
  return check_exit();
}
