/* C tests of the nn kernels against naive loops written here from the definitions (float64, and
 * float32 within tolerance), plus adjoint identities: <conv(x), g> = <x, conv_backward_data(g)>. */
#include <stdlib.h>
#include <string.h>
#include <math.h>
#include "check.h"
#include "nn.h"
#include "ops.h"

static uint64_t rng_state = 88172645463325252ull;
static double urand(void) {  /* xorshift64*, uniform in [-1, 1) */
  rng_state ^= rng_state >> 12; rng_state ^= rng_state << 25; rng_state ^= rng_state >> 27;
  return (double)((rng_state * 2685821657736338717ull) >> 11) / 9007199254740992.0 * 2 - 1;
}

static void mk(fl_tensor *t, fl_dtype dt, int nd, int64_t a, int64_t b, int64_t c, int64_t d) {
  int64_t s[4] = {a, b, c, d};
  memset(t, 0, sizeof *t);
  if (fl_tensor_init(t, &fl_cpu_backend, 0, dt, nd, s)) { printf("alloc failed: %s\n", fl_errmsg()); exit(1); }
  int64_t n = fl_tensor_numel(t);
  for (int64_t i = 0; i < n; i++) {
    double v = urand();
    if (dt == FL_F32) ((float *)fl_tensor_data(t))[i] = (float)v;
    else ((double *)fl_tensor_data(t))[i] = v;
  }
}

static double at(const fl_tensor *t, int64_t i) {
  return t->dtype == FL_F32 ? ((float *)fl_tensor_data(t))[i] : ((double *)fl_tensor_data(t))[i];
}

static double dot(const fl_tensor *a, const fl_tensor *b) {
  double s = 0;
  for (int64_t i = 0; i < fl_tensor_numel(a); i++) s += at(a, i) * at(b, i);
  return s;
}

/* max |a - ref| / max(1, max |ref|) */
static double relerr(const fl_tensor *a, const double *ref, int64_t n) {
  double m = 0, s = 1;
  for (int64_t i = 0; i < n; i++) { s = fmax(s, fabs(ref[i])); m = fmax(m, fabs(at(a, i) - ref[i])); }
  return m / s;
}

typedef struct { int64_t n, h, w, c, f; int kh, kw, sh, sw, dh, dw; const char *pad; int depthwise; } conv_case;

/* naive convolution from the definition; depthwise: f is the multiplier M */
static void naive_conv(double *y, const fl_tensor *x, const fl_tensor *w, const fl_window *win, int64_t oh_n,
                       int64_t ow_n, int depthwise) {
  int64_t N = x->shape[0], H = x->shape[1], W = x->shape[2], C = x->shape[3], F = w->shape[3];
  int64_t FO = depthwise ? C * F : F;
  for (int64_t n = 0; n < N; n++)
    for (int64_t oh = 0; oh < oh_n; oh++)
      for (int64_t ow = 0; ow < ow_n; ow++)
        for (int64_t fo = 0; fo < FO; fo++) {
          double s = 0;
          for (int i = 0; i < win->kh; i++)
            for (int j = 0; j < win->kw; j++) {
              int64_t ih = oh * win->sh - win->pt + i * win->dh, iw = ow * win->sw - win->pl + j * win->dw;
              if (ih < 0 || ih >= H || iw < 0 || iw >= W) continue;
              if (depthwise) {
                int64_t c = fo / F, m = fo % F;
                s += at(x, ((n * H + ih) * W + iw) * C + c) * at(w, ((i * win->kw + j) * C + c) * F + m);
              } else {
                for (int64_t c = 0; c < C; c++)
                  s += at(x, ((n * H + ih) * W + iw) * C + c) * at(w, ((i * win->kw + j) * C + c) * F + fo);
              }
            }
          y[((n * oh_n + oh) * ow_n + ow) * FO + fo] = s;
        }
}

static void run_conv_case(const conv_case *cc, fl_dtype dt, int64_t chunk) {
  double tol = dt == FL_F32 ? 2e-5 : 1e-12;
  fl_tensor x, w, y = {0}, gy, gx = {0}, gw, gw2, gb, scale, shift, yf = {0};
  fl_window win;
  int64_t oh, ow;
  fl_nn_cpu_set_chunk(chunk);
  mk(&x, dt, 4, cc->n, cc->h, cc->w, cc->c);
  mk(&w, dt, 4, cc->kh, cc->kw, cc->c, cc->f);
  CHECK(fl_window_init(&win, "test", cc->h, cc->w, cc->kh, cc->kw, cc->sh, cc->sw, cc->dh, cc->dw, cc->pad, &oh,
                       &ow) == 0);
  int64_t fo = cc->depthwise ? cc->c * cc->f : cc->f;
  int rc = cc->depthwise ? fl_depthwise_forward(&y, &x, &w, NULL, NULL, 0, &win)
                         : fl_conv2d_forward(&y, &x, &w, NULL, NULL, 0, &win);
  CHECK(rc == 0);
  if (rc) { printf("# %s\n", fl_errmsg()); return; }
  CHECK(y.shape[1] == oh && y.shape[2] == ow && y.shape[3] == fo);
  int64_t ny = fl_tensor_numel(&y);
  double *ref = malloc(sizeof(double) * (size_t)ny);
  naive_conv(ref, &x, &w, &win, oh, ow, cc->depthwise);
  CHECK(relerr(&y, ref, ny) < tol);

  /* fused epilogue: y*scale + shift, relu */
  mk(&scale, dt, 1, fo, 0, 0, 0);
  mk(&shift, dt, 1, fo, 0, 0, 0);
  rc = cc->depthwise ? fl_depthwise_forward(&yf, &x, &w, &scale, &shift, 1, &win)
                     : fl_conv2d_forward(&yf, &x, &w, &scale, &shift, 1, &win);
  CHECK(rc == 0);
  for (int64_t i = 0; i < ny; i++) ref[i] = fmax(ref[i] * at(&scale, i % fo) + at(&shift, i % fo), 0);
  CHECK(relerr(&yf, ref, ny) < tol);

  /* adjoint identities: <conv(x,w), gy> = <x, dconv/dx^T gy> = <w, dconv/dw^T gy> */
  mk(&gy, dt, 4, y.shape[0], y.shape[1], y.shape[2], y.shape[3]);
  rc = cc->depthwise ? fl_depthwise_backward_data(&gx, &gy, &w, x.shape, &win)
                     : fl_conv2d_backward_data(&gx, &gy, &w, x.shape, &win);
  CHECK(rc == 0);
  double lhs = dot(&y, &gy);
  CHECK_NEAR(dot(&x, &gx), lhs, tol * 10 * (1 + fabs(lhs)));
  mk(&gw, dt, 4, cc->kh, cc->kw, cc->c, cc->f);
  mk(&gb, dt, 1, fo, 0, 0, 0);
  rc = cc->depthwise ? fl_depthwise_backward_filter_into(&gw, &gb, &x, &gy, &win, 0)
                     : fl_conv2d_backward_filter_into(&gw, &gb, &x, &gy, &win, 0);
  CHECK(rc == 0);
  CHECK_NEAR(dot(&w, &gw), lhs, tol * 10 * (1 + fabs(lhs)));
  /* bias gradient = sum of gy per channel */
  for (int64_t f = 0; f < fo; f++) {
    double s = 0;
    for (int64_t i = f; i < ny; i += fo) s += at(&gy, i);
    CHECK_NEAR(at(&gb, f), s, tol * 10 * (1 + fabs(s)));
  }
  /* accumulation: beta = 1 doubles the gradient */
  fl_tensor_init(&gw2, &fl_cpu_backend, 0, dt, 4, gw.shape);
  memcpy(fl_tensor_data(&gw2), fl_tensor_data(&gw), (size_t)fl_tensor_numel(&gw) * fl_dtype_size(dt));
  rc = cc->depthwise ? fl_depthwise_backward_filter_into(&gw2, NULL, &x, &gy, &win, 1)
                     : fl_conv2d_backward_filter_into(&gw2, NULL, &x, &gy, &win, 1);
  CHECK(rc == 0);
  double worst = 0;
  for (int64_t i = 0; i < fl_tensor_numel(&gw); i++) worst = fmax(worst, fabs(at(&gw2, i) - 2 * at(&gw, i)));
  CHECK(worst < tol * 100);
  free(ref);
  fl_tensor_free(&x); fl_tensor_free(&w); fl_tensor_free(&y); fl_tensor_free(&gy); fl_tensor_free(&gx);
  fl_tensor_free(&gw); fl_tensor_free(&gw2); fl_tensor_free(&gb); fl_tensor_free(&scale);
  fl_tensor_free(&shift); fl_tensor_free(&yf);
  fl_nn_cpu_set_chunk(0);
}

static void naive_pool(double *y, const fl_tensor *x, const fl_window *win, int64_t OH, int64_t OW, int avg) {
  int64_t N = x->shape[0], H = x->shape[1], W = x->shape[2], C = x->shape[3];
  for (int64_t n = 0; n < N; n++)
    for (int64_t oh = 0; oh < OH; oh++)
      for (int64_t ow = 0; ow < OW; ow++)
        for (int64_t c = 0; c < C; c++) {
          double s = avg ? 0 : -INFINITY;
          int cnt = 0;
          for (int i = 0; i < win->kh; i++)
            for (int j = 0; j < win->kw; j++) {
              int64_t ih = oh * win->sh - win->pt + i, iw = ow * win->sw - win->pl + j;
              if (ih < 0 || ih >= H || iw < 0 || iw >= W) continue;
              double v = at(x, ((n * H + ih) * W + iw) * C + c);
              cnt++;
              s = avg ? s + v : fmax(s, v);
            }
          y[((n * OH + oh) * OW + ow) * C + c] = avg ? s / cnt : s;
        }
}

static void run_pool_case(int64_t n, int64_t h, int64_t w, int64_t c, int k, int s, const char *pad, int avg,
                          fl_dtype dt) {
  double tol = dt == FL_F32 ? 1e-6 : 1e-13;
  fl_tensor x, y = {0}, gy, gx = {0};
  fl_window win;
  int64_t oh, ow;
  mk(&x, dt, 4, n, h, w, c);
  CHECK(fl_window_init(&win, "pool", h, w, k, k, s, s, 1, 1, pad, &oh, &ow) == 0);
  CHECK(fl_pool2d_forward(&y, NULL, &x, avg ? FL_POOL_AVG : FL_POOL_MAX, &win) == 0);
  int64_t ny = n * oh * ow * c;
  double *ref = malloc(sizeof(double) * (size_t)ny);
  naive_pool(ref, &x, &win, oh, ow, avg);
  CHECK(relerr(&y, ref, ny) < tol);
  /* pooling is piecewise linear: <pool(x), gy> = <x, pool_backward(gy)> for max (no ties in random
   * data) and average pooling alike */
  mk(&gy, dt, 4, n, oh, ow, c);
  CHECK(fl_pool2d_backward(&gx, &gy, avg ? NULL : &x, NULL, x.shape, avg ? FL_POOL_AVG : FL_POOL_MAX, &win) == 0);
  double lhs = dot(&y, &gy);
  CHECK_NEAR(dot(&x, &gx), lhs, tol * 100 * (1 + fabs(lhs)));
  if (!avg) {   /* with recorded argmax: the same output and the same gradient */
    fl_tensor y2 = {0}, am = {0}, gx2 = {0};
    CHECK(fl_pool2d_forward(&y2, &am, &x, FL_POOL_MAX, &win) == 0);
    CHECK(am.dtype == FL_I32);
    CHECK(relerr(&y2, ref, ny) < tol);
    CHECK(fl_pool2d_backward(&gx2, &gy, NULL, &am, x.shape, FL_POOL_MAX, &win) == 0);
    double worst = 0;
    for (int64_t i = 0; i < fl_tensor_numel(&gx); i++) worst = fmax(worst, fabs(at(&gx2, i) - at(&gx, i)));
    CHECK(worst == 0);
    fl_tensor_free(&y2); fl_tensor_free(&am); fl_tensor_free(&gx2);
  }
  free(ref);
  fl_tensor_free(&x); fl_tensor_free(&y); fl_tensor_free(&gy); fl_tensor_free(&gx);
}

/* batch norm in training mode, checked against the definition and by finite differences of
 * L = sum(y * gy) in float64 */
static double bn_loss(const fl_tensor *x, const fl_tensor *g, const fl_tensor *b, const fl_tensor *gy) {
  fl_tensor y = {0}, m = {0}, iv = {0};
  if (fl_batchnorm_forward_train(&y, &m, &iv, x, g, b, NULL, NULL, 0.99, 1e-3, 1, 0)) return NAN;
  double l = dot(&y, gy);
  fl_tensor_free(&y); fl_tensor_free(&m); fl_tensor_free(&iv);
  return l;
}

static void test_batchnorm(void) {
  const int64_t N = 3, H = 2, W = 3, C = 4, rows = N * H * W;
  fl_tensor x, g, b, rm, rv, gy, y = {0}, m = {0}, iv = {0}, gx = {0}, gg, gbt;
  mk(&x, FL_F64, 4, N, H, W, C); mk(&g, FL_F64, 1, C, 0, 0, 0); mk(&b, FL_F64, 1, C, 0, 0, 0);
  mk(&rm, FL_F64, 1, C, 0, 0, 0); mk(&rv, FL_F64, 1, C, 0, 0, 0); mk(&gy, FL_F64, 4, N, H, W, C);
  for (int64_t i = 0; i < C; i++) ((double *)fl_tensor_data(&rv))[i] += 2;
  double rm0[4], rv0[4];
  memcpy(rm0, fl_tensor_data(&rm), sizeof rm0);
  memcpy(rv0, fl_tensor_data(&rv), sizeof rv0);
  CHECK(fl_batchnorm_forward_train(&y, &m, &iv, &x, &g, &b, &rm, &rv, 0.9, 1e-3, 1, 0) == 0);
  for (int64_t c = 0; c < C; c++) {
    double s = 0, v = 0;
    for (int64_t r = 0; r < rows; r++) s += at(&x, r * C + c);
    s /= rows;
    for (int64_t r = 0; r < rows; r++) v += (at(&x, r * C + c) - s) * (at(&x, r * C + c) - s);
    v /= rows;
    CHECK_NEAR(at(&m, c), s, 1e-12);
    CHECK_NEAR(at(&iv, c), 1 / sqrt(v + 1e-3), 1e-10);
    CHECK_NEAR(at(&rm, c), 0.9 * rm0[c] + 0.1 * s, 1e-12);
    CHECK_NEAR(at(&rv, c), 0.9 * rv0[c] + 0.1 * v * rows / (rows - 1), 1e-12);
    for (int64_t r = 0; r < rows; r++)
      CHECK_NEAR(at(&y, r * C + c), (at(&x, r * C + c) - s) / sqrt(v + 1e-3) * at(&g, c) + at(&b, c), 1e-10);
  }
  mk(&gg, FL_F64, 1, C, 0, 0, 0); mk(&gbt, FL_F64, 1, C, 0, 0, 0);
  CHECK(fl_batchnorm_backward(&gx, &gg, &gbt, &x, &gy, &m, &iv, &g, 1, 0, NULL) == 0);
  const double h = 1e-6;
  double *px = fl_tensor_data(&x), *pg = fl_tensor_data(&g), *pb = fl_tensor_data(&b);
  for (int64_t i = 0; i < rows * C; i += 5) {
    double o = px[i];
    px[i] = o + h; double lp = bn_loss(&x, &g, &b, &gy);
    px[i] = o - h; double lm = bn_loss(&x, &g, &b, &gy);
    px[i] = o;
    CHECK_NEAR(at(&gx, i), (lp - lm) / (2 * h), 1e-6);
  }
  for (int64_t c = 0; c < C; c++) {
    double o = pg[c];
    pg[c] = o + h; double lp = bn_loss(&x, &g, &b, &gy);
    pg[c] = o - h; double lm = bn_loss(&x, &g, &b, &gy);
    pg[c] = o;
    CHECK_NEAR(at(&gg, c), (lp - lm) / (2 * h), 1e-6);
    o = pb[c];
    pb[c] = o + h; lp = bn_loss(&x, &g, &b, &gy);
    pb[c] = o - h; lm = bn_loss(&x, &g, &b, &gy);
    pb[c] = o;
    CHECK_NEAR(at(&gbt, c), (lp - lm) / (2 * h), 1e-6);
  }
  /* inference backward: gx = gy*gamma*invstd, no dependence through the statistics */
  fl_tensor gx2 = {0};
  CHECK(fl_batchnorm_backward(&gx2, NULL, NULL, &x, &gy, &m, &iv, &g, 0, 0, NULL) == 0);
  for (int64_t i = 0; i < rows * C; i++)
    CHECK_NEAR(at(&gx2, i), at(&gy, i) * at(&g, i % C) * at(&iv, i % C), 1e-12);
  fl_tensor *all[] = {&x, &g, &b, &rm, &rv, &gy, &y, &m, &iv, &gx, &gg, &gbt, &gx2};
  for (size_t i = 0; i < sizeof all / sizeof *all; i++) fl_tensor_free(all[i]);
}

static void test_softmax_xent(void) {
  const int64_t N = 5, K = 7;
  fl_tensor z, lab, loss = {0}, grad = {0}, probs;
  mk(&z, FL_F64, 2, N, K, 0, 0);
  int64_t ns = N;
  fl_tensor_init(&lab, &fl_cpu_backend, 0, FL_I64, 1, &ns);
  for (int64_t r = 0; r < N; r++) ((int64_t *)fl_tensor_data(&lab))[r] = (r * 3) % K;
  ((double *)fl_tensor_data(&z))[0] = 800;  /* large logit: must stay finite */
  CHECK(fl_softmax_xent(&loss, &grad, &z, &lab, 0.1, 0.5) == 0);
  mk(&probs, FL_F64, 2, N, K, 0, 0);
  for (int64_t r = 0; r < N; r++) {
    double mx = -INFINITY, se = 0, l = 0;
    for (int64_t k = 0; k < K; k++) mx = fmax(mx, at(&z, r * K + k));
    for (int64_t k = 0; k < K; k++) se += exp(at(&z, r * K + k) - mx);
    for (int64_t k = 0; k < K; k++) {
      double t = 0.9 * ((r * 3) % K == k) + 0.1 / K;
      double ls = at(&z, r * K + k) - mx - log(se);
      l -= t * ls;
      CHECK_NEAR(at(&grad, r * K + k), 0.5 * (exp(ls) - t), 1e-12);
      ((double *)fl_tensor_data(&probs))[r * K + k] = (r * 3) % K == k;
    }
    CHECK_NEAR(at(&loss, r), l, 1e-9);
    CHECK(isfinite(at(&loss, r)));
  }
  /* one-hot probabilities give the same loss as the labels */
  fl_tensor loss2 = {0};
  CHECK(fl_softmax_xent(&loss2, NULL, &z, &probs, 0.1, 1) == 0);
  for (int64_t r = 0; r < N; r++) CHECK_NEAR(at(&loss2, r), at(&loss, r), 1e-9);
  /* a label out of range is an error, not a crash */
  ((int64_t *)fl_tensor_data(&lab))[2] = K;
  fl_tensor loss3 = {0};
  CHECK(fl_softmax_xent(&loss3, NULL, &z, &lab, 0, 1) == -1);
  CHECK(strstr(fl_errmsg(), "outside [0, 7)") != NULL);
  fl_tensor *all[] = {&z, &lab, &loss, &grad, &probs, &loss2};
  for (size_t i = 0; i < sizeof all / sizeof *all; i++) fl_tensor_free(all[i]);
}

static void test_act_backward(void) {
  fl_tensor y, gy, gx = {0};
  mk(&y, FL_F64, 2, 3, 5, 0, 0);
  mk(&gy, FL_F64, 2, 3, 5, 0, 0);
  fl_act_kind kinds[] = {FL_ACT_RELU, FL_ACT_SIGMOID, FL_ACT_TANH, FL_ACT_SOFTMAX};
  for (int k = 0; k < 4; k++) {
    CHECK(fl_act_backward(kinds[k], &gx, &gy, &y) == 0);
    for (int64_t r = 0; r < 3; r++) {
      double d = 0;
      for (int64_t i = 0; i < 5; i++) d += at(&gy, r * 5 + i) * at(&y, r * 5 + i);
      for (int64_t i = 0; i < 5; i++) {
        double v = at(&y, r * 5 + i), g = at(&gy, r * 5 + i);
        double want = k == 0 ? (v > 0 ? g : 0) : k == 1 ? g * v * (1 - v) : k == 2 ? g * (1 - v * v) : v * (g - d);
        CHECK_NEAR(at(&gx, r * 5 + i), want, 1e-14);
      }
    }
    fl_tensor_free(&gx);
  }
  fl_tensor_free(&y); fl_tensor_free(&gy);
}

static void test_errors(void) {
  fl_tensor x, w, y = {0};
  fl_window win;
  int64_t oh, ow;
  mk(&x, FL_F32, 4, 2, 5, 5, 4);
  mk(&w, FL_F32, 4, 3, 3, 3, 8);
  CHECK(fl_window_init(&win, "conv2d", 5, 5, 3, 3, 1, 1, 1, 1, "same", &oh, &ow) == 0);
  CHECK(fl_conv2d_forward(&y, &x, &w, NULL, NULL, 0, &win) == -1);
  CHECK(strstr(fl_errmsg(), "input has 4 channels, kernel expects 3") != NULL);
  CHECK(y.storage == NULL);
  CHECK(fl_window_init(&win, "conv2d", 5, 5, 3, 3, 1, 1, 1, 1, "full", &oh, &ow) == -1);
  CHECK(strstr(fl_errmsg(), "padding must be 'valid' or 'same'") != NULL);
  CHECK(fl_window_init(&win, "max_pool2d", 2, 2, 3, 3, 1, 1, 1, 1, "valid", &oh, &ow) == -1);
  CHECK(strstr(fl_errmsg(), "does not fit") != NULL);
  fl_tensor w64;
  mk(&w64, FL_F64, 4, 3, 3, 4, 8);
  CHECK(fl_window_init(&win, "conv2d", 5, 5, 3, 3, 1, 1, 1, 1, "same", &oh, &ow) == 0);
  CHECK(fl_conv2d_forward(&y, &x, &w64, NULL, NULL, 0, &win) == -1);
  CHECK(strstr(fl_errmsg(), "kernel has dtype float64, expected float32") != NULL);
  fl_tensor_free(&x); fl_tensor_free(&w); fl_tensor_free(&w64);
}

/* BatchNorm with a fused ReLU equals BatchNorm then ReLU, forward and backward */
/* a large mean against a small spread (raw pixel-like data): the batch variance stays accurate */
static void test_batchnorm_large_mean(void) {
  fl_tensor x, y = {0}, m = {0}, iv = {0};
  mk(&x, FL_F32, 2, 4000, 3, 0, 0);
  float *p = fl_tensor_data(&x);
  for (int64_t i = 0; i < 12000; i++) p[i] = 1000.0f + p[i];   /* mean ~1000, std ~0.58 */
  double mean[3] = {0}, var[3] = {0};
  for (int64_t i = 0; i < 12000; i++) mean[i % 3] += p[i] / 4000.0;
  for (int64_t i = 0; i < 12000; i++) var[i % 3] += (p[i] - mean[i % 3]) * (p[i] - mean[i % 3]) / 4000.0;
  CHECK(fl_batchnorm_forward_train(&y, &m, &iv, &x, NULL, NULL, NULL, NULL, 0.99, 1e-3, 1, 0) == 0);
  for (int c = 0; c < 3; c++) {
    CHECK_NEAR(at(&m, c), mean[c], 1e-3);
    CHECK_NEAR(at(&iv, c), 1 / sqrt(var[c] + 1e-3), 1e-4 / sqrt(var[c] + 1e-3));
  }
  fl_tensor_free(&x); fl_tensor_free(&y); fl_tensor_free(&m); fl_tensor_free(&iv);
}

static void test_batchnorm_relu(void) {
  fl_tensor x, g, b, gy, y = {0}, m = {0}, iv = {0}, yr = {0}, m2 = {0}, iv2 = {0}, gx = {0}, gxr = {0};
  mk(&x, FL_F64, 4, 2, 3, 3, 5); mk(&g, FL_F64, 1, 5, 0, 0, 0); mk(&b, FL_F64, 1, 5, 0, 0, 0);
  mk(&gy, FL_F64, 4, 2, 3, 3, 5);
  CHECK(fl_batchnorm_forward_train(&y, &m, &iv, &x, &g, &b, NULL, NULL, 0.99, 1e-3, 1, 0) == 0);
  CHECK(fl_batchnorm_forward_train(&yr, &m2, &iv2, &x, &g, &b, NULL, NULL, 0.99, 1e-3, 1, 1) == 0);
  int64_t n = fl_tensor_numel(&y);
  fl_tensor gm;
  mk(&gm, FL_F64, 4, 2, 3, 3, 5);
  for (int64_t i = 0; i < n; i++) {
    CHECK_NEAR(at(&yr, i), fmax(at(&y, i), 0), 1e-14);
    ((double *)fl_tensor_data(&gm))[i] = at(&y, i) > 0 ? at(&gy, i) : 0;
  }
  CHECK(fl_batchnorm_backward(&gx, NULL, NULL, &x, &gm, &m, &iv, &g, 1, 0, NULL) == 0);
  CHECK(fl_batchnorm_backward(&gxr, NULL, NULL, &x, &gy, &m, &iv, &g, 1, 0, &yr) == 0);
  for (int64_t i = 0; i < n; i++) CHECK_NEAR(at(&gxr, i), at(&gx, i), 1e-12);
  fl_tensor *all[] = {&x, &g, &b, &gy, &y, &m, &iv, &yr, &m2, &iv2, &gx, &gxr, &gm};
  for (size_t i = 0; i < sizeof all / sizeof *all; i++) fl_tensor_free(all[i]);
}

static void test_add_act_and_optim_kernels(void) {
  fl_tensor a, b, y = {0}, w, gr, mo, v;
  mk(&a, FL_F32, 2, 3, 70000, 0, 0);    /* big enough for the parallel loops */
  mk(&b, FL_F32, 2, 3, 70000, 0, 0);
  int64_t n = fl_tensor_numel(&a);
  CHECK(fl_add_act(&y, &a, &b, 0.17, 1) == 0);
  for (int64_t i = 0; i < n; i += 997) CHECK_NEAR(at(&y, i), fmax(at(&a, i) + 0.17 * at(&b, i), 0), 1e-6);
  fl_tensor_free(&y);
  /* in place into a */
  double a5 = at(&a, 5), b5 = at(&b, 5);
  CHECK(fl_add_act_into(&a, &a, &b, 1, 0) == 0);
  CHECK_NEAR(at(&a, 5), a5 + b5, 1e-6);
  double s;
  CHECK(fl_sumsq(&b, &s) == 0);
  double want = 0;
  for (int64_t i = 0; i < n; i++) want += at(&b, i) * at(&b, i);
  CHECK_NEAR(s, want, 1e-6 * want);
  /* axpby, sgd (plain, momentum, nesterov) and adam against scalar code */
  mk(&w, FL_F64, 1, 7, 0, 0, 0); mk(&gr, FL_F64, 1, 7, 0, 0, 0); mk(&mo, FL_F64, 1, 7, 0, 0, 0);
  mk(&v, FL_F64, 1, 7, 0, 0, 0);
  double W[7], G[7], M[7], V[7];
  for (int i = 0; i < 7; i++) {
    W[i] = at(&w, i); G[i] = at(&gr, i); M[i] = at(&mo, i);
    V[i] = fabs(at(&v, i)); ((double *)fl_tensor_data(&v))[i] = V[i];
  }
  CHECK(fl_axpby(&w, 2, &gr, 0.5) == 0);
  for (int i = 0; i < 7; i++) { W[i] = 2 * G[i] + 0.5 * W[i]; CHECK_NEAR(at(&w, i), W[i], 1e-14); }
  CHECK(fl_sgd_step(&w, &gr, NULL, 0.1, 0, 0) == 0);
  for (int i = 0; i < 7; i++) { W[i] -= 0.1 * G[i]; CHECK_NEAR(at(&w, i), W[i], 1e-14); }
  CHECK(fl_sgd_step(&w, &gr, &mo, 0.1, 0.9, 1) == 0);
  for (int i = 0; i < 7; i++) {
    M[i] = 0.9 * M[i] - 0.1 * G[i]; W[i] += 0.9 * M[i] - 0.1 * G[i];
    CHECK_NEAR(at(&w, i), W[i], 1e-14); CHECK_NEAR(at(&mo, i), M[i], 1e-14);
  }
  CHECK(fl_adam_step(&w, &gr, &mo, &v, 0.01, 0.9, 0.999, 1e-7) == 0);
  for (int i = 0; i < 7; i++) {
    M[i] += (G[i] - M[i]) * 0.1; V[i] += (G[i] * G[i] - V[i]) * 0.001;
    W[i] -= 0.01 * M[i] / (sqrt(V[i]) + 1e-7);
    CHECK_NEAR(at(&w, i), W[i], 1e-13);
  }
  CHECK(fl_sgd_step(&w, &gr, NULL, 0.1, 0.9, 0) == -1);
  CHECK(strstr(fl_errmsg(), "needs a momentum buffer") != NULL);
  fl_tensor *all[] = {&a, &b, &w, &gr, &mo, &v};
  for (size_t i = 0; i < sizeof all / sizeof *all; i++) fl_tensor_free(all[i]);
}

static void test_same_rule(void) {
  fl_window win;
  int64_t oh, ow;
  /* TF: in 224, k 7, s 2 -> out 112, pad total 5: 2 before, 3 after */
  CHECK(fl_window_init(&win, "t", 224, 224, 7, 7, 2, 2, 1, 1, "same", &oh, &ow) == 0);
  CHECK(oh == 112 && ow == 112 && win.pt == 2 && win.pb == 3 && win.pl == 2 && win.pr == 3);
  /* in 74, k 3, s 2 -> 37, pad 1: 0 before, 1 after (Xception's pools) */
  CHECK(fl_window_init(&win, "t", 74, 74, 3, 3, 2, 2, 1, 1, "same", &oh, &ow) == 0);
  CHECK(oh == 37 && win.pt == 0 && win.pb == 1);
  /* valid: floor((in - k)/s) + 1 */
  CHECK(fl_window_init(&win, "t", 299, 299, 3, 3, 2, 2, 1, 1, "valid", &oh, &ow) == 0);
  CHECK(oh == 149 && win.pt == 0 && win.pb == 0);
  /* dilation 2, k 3 spans 5 */
  CHECK(fl_window_init(&win, "t", 9, 9, 3, 3, 1, 1, 2, 2, "same", &oh, &ow) == 0);
  CHECK(oh == 9 && win.pt == 2 && win.pb == 2);
}

int main(void) {
  static const conv_case cases[] = {
    {2, 7, 6, 3, 4, 3, 3, 1, 1, 1, 1, "same", 0},
    {2, 8, 8, 3, 5, 3, 3, 2, 2, 1, 1, "same", 0},    /* asymmetric TF padding */
    {3, 5, 4, 6, 7, 1, 1, 1, 1, 1, 1, "valid", 0},   /* pointwise GEMM path */
    {2, 7, 7, 4, 3, 1, 1, 2, 2, 1, 1, "same", 0},    /* strided 1x1 */
    {1, 9, 7, 2, 3, 5, 2, 2, 1, 1, 1, "valid", 0},   /* rectangular kernel and strides */
    {2, 9, 9, 3, 2, 3, 3, 1, 1, 2, 2, "same", 0},    /* dilation */
    {2, 11, 11, 3, 4, 7, 7, 2, 2, 1, 1, "same", 0},  /* a stem-like 7x7/2 */
    {1, 6, 10, 2, 3, 1, 7, 1, 1, 1, 1, "same", 0},   /* 1x7 */
    {2, 7, 6, 5, 1, 3, 3, 1, 1, 1, 1, "same", 1},    /* depthwise M=1 */
    {2, 8, 7, 3, 2, 3, 3, 2, 2, 1, 1, "same", 1},    /* depthwise M=2, stride 2 */
    {1, 9, 9, 2, 1, 3, 3, 1, 1, 2, 2, "valid", 1},   /* depthwise dilated */
  };
  for (size_t i = 0; i < sizeof cases / sizeof *cases; i++) {
    char name[96];
    const conv_case *c = &cases[i];
    snprintf(name, sizeof name, "%s %dx%d/%d %s case %zu", c->depthwise ? "depthwise" : "conv2d", c->kh, c->kw,
             c->sh, c->pad, i);
    TEST(name) {
      run_conv_case(c, FL_F64, 0);
      run_conv_case(c, FL_F32, 0);
      run_conv_case(c, FL_F64, 37);  /* tiny im2col chunks: chunk edges inside images */
    }
  }
  /* float32 through both engines whatever FL_CONV_AUTO would pick: our GEMM kernels and oneDNN
   * (asymmetric TF padding, strides, dilation, 1xN, depthwise), fused epilogue and accumulation */
  static const fl_conv_engine engines[] = {FL_CONV_OWN, FL_CONV_ONEDNN};
  static const char *const engine_names[] = {"own kernels", "oneDNN"};
  for (int e = 0; e < 2; e++) {
    char name[96];
    snprintf(name, sizeof name, "float32 convolutions forced to %s match the naive loops", engine_names[e]);
    TEST(name) {
      fl_nn_cpu_set_conv_engine(engines[e]);
      for (size_t i = 0; i < sizeof cases / sizeof *cases; i++) run_conv_case(&cases[i], FL_F32, 0);
      static const conv_case wide = {2, 9, 10, 40, 36, 3, 3, 1, 1, 1, 1, "same", 0};
      run_conv_case(&wide, FL_F32, 0);
      fl_nn_cpu_set_conv_engine(FL_CONV_AUTO);
    }
  }
  TEST("max pool 3/2 same, avg pool 3/1 same excludes padding, valid pools") {
    for (int avg = 0; avg < 2; avg++) {
      run_pool_case(2, 7, 8, 3, 3, 2, "same", avg, FL_F64);
      run_pool_case(2, 7, 8, 3, 3, 1, "same", avg, FL_F64);
      run_pool_case(1, 9, 9, 5, 3, 2, "valid", avg, FL_F32);
      run_pool_case(2, 6, 6, 2, 2, 2, "valid", avg, FL_F64);
      run_pool_case(2, 5, 7, 4, 5, 7, "valid", avg, FL_F64);  /* global-like window */
    }
  }
  TEST("batchnorm training forward, moving stats, backward vs finite differences") test_batchnorm();
  TEST("batchnorm with a fused ReLU, forward and backward") test_batchnorm_relu();
  TEST("batchnorm statistics of data with a large mean") test_batchnorm_large_mean();
  TEST("add_act, sumsq, axpby, SGD and Adam kernels") test_add_act_and_optim_kernels();
  TEST("fused softmax cross-entropy with smoothing, labels and one-hot") test_softmax_xent();
  TEST("activation backward relu/sigmoid/tanh/softmax") test_act_backward();
  TEST("TensorFlow same-padding rule") test_same_rule();
  TEST("errors name the op and the shapes") test_errors();
  return check_exit();
}
