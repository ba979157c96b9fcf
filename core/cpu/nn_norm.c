/* The CPU's normalisation kernels (struct fl_nn_ops): batch normalisation (training forward with the
 * running statistics, backward in both modes, a fused ReLU) and the per-channel affine
 * y = x*scale + shift (+ReLU) that inference BatchNorm and convolution biases become; its loop,
 * epilogue_p, also finishes the convolutions (nn_conv.c). */
#ifndef NN_GENERIC
#include "nn_cpu.h"

#define NN_GENERIC "nn_norm.c"
#include "nn_generic.h"

/* ---- the entries of struct fl_nn_ops (cpu.c's table) ---- */

int cpu_batchnorm_forward_train(fl_tensor *y, fl_tensor *mean, fl_tensor *invstd, const fl_tensor *x,
                                const fl_tensor *gamma, const fl_tensor *beta, fl_tensor *rm,
                                fl_tensor *rv, double momentum, double eps, int unbiased, int relu) {
  if (x->dtype == FL_BF16) {
    BF16_BEGIN;
    fl_tensor *y2 = OUT(y), *x2 = IN(x);
    BF16_END(cpu_batchnorm_forward_train(y2, mean, invstd, x2, gamma, beta, rm, rv, momentum, eps, unbiased, relu));
  }
  return PICK(x, batchnorm_forward_train, y, mean, invstd, x, gamma, beta, rm, rv, momentum, eps, unbiased, relu);
}
int cpu_batchnorm_backward(fl_tensor *gx, fl_tensor *ggamma, fl_tensor *gbeta, const fl_tensor *x,
                           const fl_tensor *gy, const fl_tensor *mean, const fl_tensor *invstd,
                           const fl_tensor *gamma, int training, double beta_acc, const fl_tensor *relu_y) {
  if (x->dtype == FL_BF16) {
    BF16_BEGIN;
    fl_tensor *gx2 = OUT(gx), *x2 = IN(x), *gy2 = IN(gy), *ry2 = IN(relu_y);
    BF16_END(cpu_batchnorm_backward(gx2, ggamma, gbeta, x2, gy2, mean, invstd, gamma, training, beta_acc, ry2));
  }
  return PICK(x, batchnorm_backward, gx, ggamma, gbeta, x, gy, mean, invstd, gamma, training, beta_acc, relu_y);
}
int cpu_channel_affine(fl_tensor *y, const fl_tensor *x, const fl_tensor *scale, const fl_tensor *shift,
                       int relu) {
  if (x->dtype == FL_BF16) {
    BF16_BEGIN;
    fl_tensor *y2 = OUT(y), *x2 = IN(x);
    BF16_END(cpu_channel_affine(y2, x2, scale, shift, relu));
  }
  return PICK(x, channel_affine, y, x, scale, shift, relu);
}

#else   /* ---- the generic part: compiled for float (real, NN(name) = name_f32) and double ---- */

/* y[r, f] = y[r, f]*scale[f] + shift[f], then max(., 0) if relu; rows r in [0, rows).
 * par = 0 inside an already parallel region (no nested team) */
void NN(epilogue_p)(real *y, int64_t rows, int64_t f, const real *scale, const real *shift, int relu,
                           int par) {
  if (!scale && !shift && !relu) return;
#pragma omp parallel for schedule(static) if (par && rows * f > 32768)
  for (int64_t r = 0; r < rows; r++) {
    real *p = y + r * f;
    if (scale && shift) {
      SIMD for (int64_t c = 0; c < f; c++) p[c] = p[c] * scale[c] + shift[c];
    } else if (scale) {
      SIMD for (int64_t c = 0; c < f; c++) p[c] *= scale[c];
    } else if (shift) {
      SIMD for (int64_t c = 0; c < f; c++) p[c] += shift[c];
    }
    if (relu) SIMD for (int64_t c = 0; c < f; c++) p[c] = p[c] < 0 ? 0 : p[c];
  }
}

/* ---- batch normalisation over rows of (rows, C) ---- */

/* One pass: per-thread sums of x and x^2 in double, reduced into sum (C) and sumsq (C). The
 * variance is then E[x^2] - mean^2, which in double loses nothing that matters for activations. */
/* Rows per block of the batch-norm reductions: sums over a block run in the tensor's type with full
 * SIMD width, then go into double accumulators (precision of double sums, speed of float loops).
 * The moments are taken of x - x[0] (the first row, per channel): the variance is unchanged and
 * E[v^2] - E[v]^2 does not cancel badly when the mean is large against the spread. */
#define BN_BLOCK 16

static void NN(bn_moments)(double *part, int nt, const real *x, int64_t rows, int64_t C, double *sum, double *sumsq) {
  memset(part, 0, sizeof(double) * (size_t)(nt * 2 * C));
  const int64_t nb = (rows + BN_BLOCK - 1) / BN_BLOCK;
  real *blk = malloc(sizeof(real) * (size_t)(nt * 2 * C));
#pragma omp parallel if (blk && rows * C > 32768)
  {
    int t = omp_get_thread_num();
    double *p = part + (int64_t)t * 2 * C, *q2 = p + C;
    real *b1 = blk ? blk + (int64_t)t * 2 * C : NULL, *b2 = b1 ? b1 + C : NULL;
#pragma omp for schedule(static)
    for (int64_t bi = 0; bi < nb; bi++) {
      int64_t r0 = bi * BN_BLOCK, r1 = r0 + BN_BLOCK < rows ? r0 + BN_BLOCK : rows;
      if (!b1) {   /* no scratch: plain double sums */
        for (int64_t r = r0; r < r1; r++) {
          const real *q = x + r * C;
          SIMD for (int64_t c = 0; c < C; c++) { double v = (double)q[c] - x[c]; p[c] += v; q2[c] += v * v; }
        }
        continue;
      }
      SIMD for (int64_t c = 0; c < C; c++) { b1[c] = 0; b2[c] = 0; }
      for (int64_t r = r0; r < r1; r++) {
        const real *q = x + r * C;
        SIMD for (int64_t c = 0; c < C; c++) { real v = q[c] - x[c]; b1[c] += v; b2[c] += v * v; }
      }
      SIMD for (int64_t c = 0; c < C; c++) { p[c] += b1[c]; q2[c] += b2[c]; }
    }
  }
  free(blk);
  for (int64_t c = 0; c < C; c++) { sum[c] = 0; sumsq[c] = 0; }
  for (int t = 0; t < nt; t++)
    for (int64_t c = 0; c < C; c++) { sum[c] += part[(int64_t)t * 2 * C + c]; sumsq[c] += part[(int64_t)t * 2 * C + C + c]; }
}

static int NN(batchnorm_forward_train)(fl_tensor *y, fl_tensor *mean, fl_tensor *invstd, const fl_tensor *x,
                                       const fl_tensor *gamma, const fl_tensor *beta, fl_tensor *running_mean,
                                       fl_tensor *running_var, double momentum, double eps, int unbiased, int relu) {
  const int64_t C = x->shape[x->ndim - 1], rows = fl_tensor_numel(x) / C;
  const real *X = fl_tensor_data(x), *G = OPT(gamma), *B = OPT(beta);
  real *Y = fl_tensor_data(y), *MEAN = fl_tensor_data(mean), *INV = fl_tensor_data(invstd);
  int nt = omp_get_max_threads();
  double *part = malloc(sizeof(double) * (size_t)(nt * 2 * C + 4 * C));
  real *ab = malloc(sizeof(real) * (size_t)(2 * C));
  if (!part || !ab) {
    free(part); free(ab);
    return fl_fail_oom("out of memory (batch-norm partial sums)");
  }
  double *dm = part + nt * 2 * C, *dv = dm + C, *s1 = dv + C, *s2 = s1 + C;
  NN(bn_moments)(part, nt, X, rows, C, s1, s2);   /* moments of x - x[0] */
  for (int64_t c = 0; c < C; c++) {
    double m = s1[c] / (double)rows, v = s2[c] / (double)rows - m * m;
    dm[c] = m + X[c];
    dv[c] = v > 0 ? v : 0;
  }
  /* y = x*a + b with a = gamma*invstd, b = beta - mean*a; a, b stored in y's dtype */
  for (int64_t c = 0; c < C; c++) {
    double inv = 1.0 / sqrt(dv[c] + eps), a = (G ? G[c] : 1) * inv;
    MEAN[c] = (real)dm[c];
    INV[c] = (real)inv;
    ab[c] = (real)a;
    ab[C + c] = (real)((B ? B[c] : 0) - dm[c] * a);
  }
  if (running_mean) {
    real *RM = fl_tensor_data(running_mean), *RV = fl_tensor_data(running_var);
    double unbias = unbiased && rows > 1 ? (double)rows / (double)(rows - 1) : 1.0;
    for (int64_t c = 0; c < C; c++) {
      RM[c] = (real)(momentum * RM[c] + (1 - momentum) * dm[c]);
      RV[c] = (real)(momentum * RV[c] + (1 - momentum) * dv[c] * unbias);
    }
  }
  free(part);
#pragma omp parallel for schedule(static) if (rows * C > 32768)
  for (int64_t r = 0; r < rows; r++) {
    const real *q = X + r * C;
    real *o = Y + r * C;
    if (relu) {
      SIMD for (int64_t c = 0; c < C; c++) { real v = q[c] * ab[c] + ab[C + c]; o[c] = v < 0 ? 0 : v; }
    } else {
      SIMD for (int64_t c = 0; c < C; c++) o[c] = q[c] * ab[c] + ab[C + c];
    }
  }
  free(ab);
  return 0;
}

static int NN(batchnorm_backward)(fl_tensor *gx, fl_tensor *ggamma, fl_tensor *gbeta, const fl_tensor *x,
                                  const fl_tensor *gy, const fl_tensor *mean, const fl_tensor *invstd,
                                  const fl_tensor *gamma, int training, double beta_acc, const fl_tensor *relu_y) {
  const int64_t C = x->shape[x->ndim - 1], rows = fl_tensor_numel(x) / C;
  const real *X = fl_tensor_data(x), *GY = fl_tensor_data(gy), *MEAN = fl_tensor_data(mean);
  const real *INV = fl_tensor_data(invstd), *G = OPT(gamma), *RY = OPT(relu_y);
  int nt = omp_get_max_threads();
  /* per thread: sum gy (C) and sum gy*xhat (C) */
  double *part = calloc((size_t)(nt * 2 * C + 2 * C), sizeof(double));
  if (!part) return fl_fail_oom("out of memory (batch-norm partial sums)");
  int need_sums = training || ggamma || gbeta;
  if (need_sums) {
    /* per block of rows, in the tensor's type: sum g and sum g*(x - mean); then double */
    const int64_t nb = (rows + BN_BLOCK - 1) / BN_BLOCK;
    real *blk = malloc(sizeof(real) * (size_t)(nt * 2 * C));
    if (!blk) { free(part); return fl_fail_oom("out of memory (batch-norm partial sums)"); }
#pragma omp parallel if (rows * C > 32768)
    {
      int t = omp_get_thread_num();
      double *sg = part + (int64_t)t * 2 * C, *sgx = sg + C;
      real *b1 = blk + (int64_t)t * 2 * C, *b2 = b1 + C;
#pragma omp for schedule(static)
      for (int64_t bi = 0; bi < nb; bi++) {
        int64_t r0 = bi * BN_BLOCK, r1 = r0 + BN_BLOCK < rows ? r0 + BN_BLOCK : rows;
        SIMD for (int64_t c = 0; c < C; c++) { b1[c] = 0; b2[c] = 0; }
        for (int64_t r = r0; r < r1; r++) {
          const real *q = X + r * C, *g = GY + r * C, *ry = RY ? RY + r * C : NULL;
          if (ry) {
            SIMD for (int64_t c = 0; c < C; c++) {
              /* both loads unconditional, then a select: GCC if-converts (vectorises) only this
               * form; a conditional load, or the old g*(real)(ry > 0), compiled to branches */
              real gv = g[c], yv = ry[c], gc = yv > 0 ? gv : 0;
              b1[c] += gc;
              b2[c] += gc * (q[c] - MEAN[c]);
            }
          } else {
            SIMD for (int64_t c = 0; c < C; c++) {
              b1[c] += g[c];
              b2[c] += g[c] * (q[c] - MEAN[c]);
            }
          }
        }
        SIMD for (int64_t c = 0; c < C; c++) { sg[c] += b1[c]; sgx[c] += (double)b2[c] * INV[c]; }
      }
    }
    free(blk);
  }
  double *sum_g = part + nt * 2 * C, *sum_gx = sum_g + C;
  for (int t = 0; t < nt; t++)
    for (int64_t c = 0; c < C; c++) {
      sum_g[c] += part[(int64_t)t * 2 * C + c];
      sum_gx[c] += part[(int64_t)t * 2 * C + C + c];
    }
  if (gbeta) {
    real *o = fl_tensor_data(gbeta);
    for (int64_t c = 0; c < C; c++) o[c] = (real)((beta_acc == 0 ? 0 : beta_acc * o[c]) + sum_g[c]);
  }
  if (ggamma) {
    real *o = fl_tensor_data(ggamma);
    for (int64_t c = 0; c < C; c++) o[c] = (real)((beta_acc == 0 ? 0 : beta_acc * o[c]) + sum_gx[c]);
  }
  if (gx) {
    real *GX = fl_tensor_data(gx);
    /* training: gx = gamma*invstd * (gy - mean(gy) - xhat*mean(gy*xhat)); inference: gamma*invstd*gy.
     * Written as gx = gy*a + x*b + c per channel. */
    real *abc = malloc(sizeof(real) * (size_t)(3 * C));
    if (!abc) { free(part); return fl_fail_oom("out of memory (batch-norm coefficients)"); }
    for (int64_t c = 0; c < C; c++) {
      double a = (G ? G[c] : 1) * (double)INV[c];
      if (training) {
        double mg = sum_g[c] / (double)rows, mgx = sum_gx[c] / (double)rows;
        /* xhat = (x - mean)*inv: gx = a*gy - a*mg - a*inv*mgx*(x - mean) */
        double b = -a * INV[c] * mgx;
        abc[c] = (real)a;
        abc[C + c] = (real)b;
        abc[2 * C + c] = (real)(-a * mg - b * MEAN[c]);
      } else {
        abc[c] = (real)a; abc[C + c] = 0; abc[2 * C + c] = 0;
      }
    }
#pragma omp parallel for schedule(static) if (rows * C > 32768)
    for (int64_t r = 0; r < rows; r++) {
      const real *q = X + r * C, *g = GY + r * C, *ry = RY ? RY + r * C : NULL;
      real *o = GX + r * C;
      if (ry) {
        SIMD for (int64_t c = 0; c < C; c++) {
          real gv = g[c], yv = ry[c], gc = yv > 0 ? gv : 0;   /* a select: vectorises (see above) */
          o[c] = gc * abc[c] + q[c] * abc[C + c] + abc[2 * C + c];
        }
      } else {
        SIMD for (int64_t c = 0; c < C; c++) o[c] = g[c] * abc[c] + q[c] * abc[C + c] + abc[2 * C + c];
      }
    }
    free(abc);
  }
  free(part);
  return 0;
}

static int NN(channel_affine)(fl_tensor *y, const fl_tensor *x, const fl_tensor *scale, const fl_tensor *shift,
                              int relu) {
  const int64_t C = x->shape[x->ndim - 1], rows = C ? fl_tensor_numel(x) / C : 0;
  const real *X = fl_tensor_data(x);
  real *Y = fl_tensor_data(y);
  if (Y != X) memcpy(Y, X, sizeof(real) * (size_t)fl_tensor_numel(x));
  NN(epilogue_p)(Y, rows, C, OPT(scale), OPT(shift), relu, 1);
  return 0;
}

#endif
