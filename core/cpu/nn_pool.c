/* The CPU's pooling kernels (struct fl_nn_ops): max and average pooling over windows of NHWC
 * activations, forward (with the argmax of max pooling) and backward. */
#ifndef NN_GENERIC
#include "nn_cpu.h"

#define NN_GENERIC "nn_pool.c"
#include "nn_generic.h"

/* ---- the entries of struct fl_nn_ops (cpu.c's table) ---- */

int cpu_pool2d_forward(fl_tensor *y, fl_tensor *argmax, const fl_tensor *x, fl_pool_kind kind,
                       const fl_window *win) {
  if (x->dtype == FL_BF16) {
    BF16_BEGIN;
    fl_tensor *y2 = OUT(y), *x2 = IN(x);
    BF16_END(cpu_pool2d_forward(y2, argmax, x2, kind, win));
  }
  return PICK(x, pool2d_forward, y, argmax, x, kind, win);
}
int cpu_pool2d_backward(fl_tensor *gx, const fl_tensor *gy, const fl_tensor *x, const fl_tensor *argmax,
                        fl_pool_kind kind, const fl_window *win) {
  if (gy->dtype == FL_BF16) {
    BF16_BEGIN;
    fl_tensor *gx2 = OUT(gx), *gy2 = IN(gy), *x2 = IN(x);
    BF16_END(cpu_pool2d_backward(gx2, gy2, x2, argmax, kind, win));
  }
  return PICK(gy, pool2d_backward, gx, gy, x, argmax, kind, win);
}

#else   /* ---- the generic part: compiled for float (real, NN(name) = name_f32) and double ---- */

/* ---- pooling ---- */

static int NN(pool2d_forward)(fl_tensor *y, fl_tensor *argmax, const fl_tensor *x, fl_pool_kind kind,
                              const fl_window *win) {
  const int64_t N = x->shape[0], H = x->shape[1], W = x->shape[2], C = x->shape[3];
  const int64_t OH = y->shape[1], OW = y->shape[2];
  const real *X = fl_tensor_data(x);
  real *Y = fl_tensor_data(y);
  if (argmax) {   /* max pooling that also records where each maximum is (first one wins) */
    int32_t *A = fl_tensor_data(argmax);
#pragma omp parallel for schedule(static) if (N * OH * OW * C > 16384)
    for (int64_t r = 0; r < N * OH; r++) {
      int64_t n = r / OH, oh = r % OH;
      for (int64_t ow = 0; ow < OW; ow++) {
        real *out = Y + (r * OW + ow) * C;
        int32_t *ai = A + (r * OW + ow) * C;
        int first = 1;
        FOR_TAPS(win, oh, ow, H, W) {
          const real *xp = X + ((n * H + ih) * W + iw) * C;
          const int32_t base = (int32_t)((ih * W + iw) * C);
          if (first) {
            SIMD for (int64_t c = 0; c < C; c++) { out[c] = xp[c]; ai[c] = base + (int32_t)c; }
            first = 0;
          } else {
            SIMD for (int64_t c = 0; c < C; c++) {   /* arithmetic select: vectorises */
              int32_t gt = xp[c] > out[c];
              ai[c] += gt * (base + (int32_t)c - ai[c]);
              out[c] = xp[c] > out[c] ? xp[c] : out[c];
            }
          }
        }
      }
    }
    return 0;
  }
#pragma omp parallel for schedule(static) if (N * OH * OW * C > 16384)
  for (int64_t r = 0; r < N * OH; r++) {
    int64_t n = r / OH, oh = r % OH;
    for (int64_t ow = 0; ow < OW; ow++) {
      real *out = Y + (r * OW + ow) * C;
      int count = 0;
      const real init = kind == FL_POOL_MAX ? -(real)INFINITY : 0;
      SIMD for (int64_t c = 0; c < C; c++) out[c] = init;
      FOR_TAPS(win, oh, ow, H, W) {
        const real *xp = X + ((n * H + ih) * W + iw) * C;
        count++;
        if (kind == FL_POOL_MAX) {
          SIMD for (int64_t c = 0; c < C; c++) out[c] = xp[c] > out[c] ? xp[c] : out[c];
        } else {
          SIMD for (int64_t c = 0; c < C; c++) out[c] += xp[c];
        }
      }
      if (kind == FL_POOL_AVG) {
        real inv = (real)1 / (real)(count > 0 ? count : 1);
        SIMD for (int64_t c = 0; c < C; c++) out[c] *= inv;
      }
    }
  }
  return 0;
}

static int NN(pool2d_backward)(fl_tensor *gx, const fl_tensor *gy, const fl_tensor *x, const fl_tensor *argmax,
                               fl_pool_kind kind, const fl_window *win) {
  const int64_t N = gx->shape[0], H = gx->shape[1], W = gx->shape[2], C = gx->shape[3];
  const int64_t OH = gy->shape[1], OW = gy->shape[2];
  const real *X = x ? fl_tensor_data(x) : NULL, *GY = fl_tensor_data(gy);
  real *GX = fl_tensor_data(gx);
  memset(GX, 0, sizeof(real) * (size_t)fl_tensor_numel(gx));
  if (argmax) {   /* scatter through the recorded positions; images are independent */
    const int32_t *A = fl_tensor_data(argmax);
    const int64_t per = OH * OW * C, img = H * W * C;
#pragma omp parallel for schedule(static) if (N > 1 && N * per > 16384)
    for (int64_t n = 0; n < N; n++) {
      const real *g = GY + n * per;
      const int32_t *a = A + n * per;
      real *dst = GX + n * img;
      for (int64_t e = 0; e < per; e++) dst[a[e]] += g[e];
    }
    return 0;
  }
  int nt = omp_get_max_threads();
  /* per thread: best value and its flat input offset, per channel (max pooling) */
  real *bestv = malloc(sizeof(real) * (size_t)(nt * C + 1));
  int64_t *besti = malloc(sizeof(int64_t) * (size_t)(nt * C + 1));
  if (!bestv || !besti) {
    free(bestv); free(besti);
    return fl_fail_oom("out of memory (pooling scratch)");
  }
  /* windows of one image overlap, so threads split the batch (or, for one image, run serially) */
#pragma omp parallel for schedule(static) if (N > 1 && N * H * W * C > 16384)
  for (int64_t n = 0; n < N; n++) {
    real *bv = bestv + (int64_t)omp_get_thread_num() * C;
    int64_t *bi = besti + (int64_t)omp_get_thread_num() * C;
    for (int64_t oh = 0; oh < OH; oh++) {
      for (int64_t ow = 0; ow < OW; ow++) {
        const real *g = GY + ((n * OH + oh) * OW + ow) * C;
        int count = 0;
        if (kind == FL_POOL_MAX)
          for (int64_t c = 0; c < C; c++) { bv[c] = -(real)INFINITY; bi[c] = -1; }
        if (kind == FL_POOL_MAX)
          FOR_TAPS(win, oh, ow, H, W) {
            int64_t off = ((n * H + ih) * W + iw) * C;
            const real *xp = X + off;
            if (++count == 1) {   /* the window's first element inside the input */
              SIMD for (int64_t c = 0; c < C; c++) { bv[c] = xp[c]; bi[c] = off + c; }
            } else {
              SIMD for (int64_t c = 0; c < C; c++) {
                int gt = xp[c] > bv[c];
                bv[c] = gt ? xp[c] : bv[c];
                bi[c] = gt ? off + c : bi[c];
              }
            }
          }
        if (kind == FL_POOL_MAX) {
          for (int64_t c = 0; c < C; c++)
            if (bi[c] >= 0) GX[bi[c]] += g[c];
        } else {
          /* average: the window's elements inside the input, counted first; g*inv once per output
           * (bv as scratch), then added to each of them (the same products as before, row order) */
          FOR_TAPS(win, oh, ow, H, W) count++;
          if (count == 0) continue;
          real inv = (real)1 / (real)count;
          SIMD for (int64_t c = 0; c < C; c++) bv[c] = g[c] * inv;
          FOR_TAPS(win, oh, ow, H, W) {
            real *dst = GX + ((n * H + ih) * W + iw) * C;
            SIMD for (int64_t c = 0; c < C; c++) dst[c] += bv[c];
          }
        }
      }
    }
  }
  free(bestv);
  free(besti);
  return 0;
}

#endif
