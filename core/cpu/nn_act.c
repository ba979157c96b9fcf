/* The CPU's activation kernels (struct fl_nn_ops): gradients through ReLU, sigmoid, tanh and softmax
 * from their outputs, and the residual sum y = a + scale*b (+ReLU). */
#ifndef NN_GENERIC
#include "nn_cpu.h"

#define NN_GENERIC "nn_act.c"
#include "nn_generic.h"

/* ---- the entries of struct fl_nn_ops (cpu.c's table) ---- */

int cpu_add_act(fl_tensor *y, const fl_tensor *a, const fl_tensor *b, double scale, int relu) {
  if (a->dtype == FL_BF16) {
    BF16_BEGIN;
    fl_tensor *y2 = OUT(y), *a2 = IN(a), *b2 = IN(b);
    BF16_END(cpu_add_act(y2, a2, b2, scale, relu));
  }
  return PICK(a, add_act, y, a, b, scale, relu);
}
int cpu_act_backward(fl_act_kind act, fl_tensor *gx, const fl_tensor *gy, const fl_tensor *y) {
  if (y->dtype == FL_BF16) {
    BF16_BEGIN;
    fl_tensor *gx2 = OUT(gx), *gy2 = IN(gy), *y2 = IN(y);
    BF16_END(cpu_act_backward(act, gx2, gy2, y2));
  }
  return PICK(y, act_backward, act, gx, gy, y);
}

#else   /* ---- the generic part: compiled for float (real, NN(name) = name_f32) and double ---- */

static int NN(add_act)(fl_tensor *y, const fl_tensor *a, const fl_tensor *b, double scale, int relu) {
  const int64_t n = fl_tensor_numel(a);
  const real *A = fl_tensor_data(a), *B = fl_tensor_data(b);
  real *Y = fl_tensor_data(y);
  const real s = (real)scale;
  if (relu) {
#pragma omp parallel for simd schedule(static) if (n > 65536)
    for (int64_t i = 0; i < n; i++) { real v = A[i] + s * B[i]; Y[i] = v < 0 ? 0 : v; }
  } else {
#pragma omp parallel for simd schedule(static) if (n > 65536)
    for (int64_t i = 0; i < n; i++) Y[i] = A[i] + s * B[i];
  }
  return 0;
}

static int NN(act_backward)(fl_act_kind act, fl_tensor *gx, const fl_tensor *gy, const fl_tensor *y) {
  const int64_t n = fl_tensor_numel(y);
  const real *Y = fl_tensor_data(y), *GY = fl_tensor_data(gy);
  real *GX = fl_tensor_data(gx);
  if (act == FL_ACT_SOFTMAX) {
    const int64_t k = y->ndim ? y->shape[y->ndim - 1] : 1, rows = k ? n / k : 0;
#pragma omp parallel for schedule(static) if (n > 32768)
    for (int64_t r = 0; r < rows; r++) {
      const real *p = Y + r * k, *g = GY + r * k;
      real *o = GX + r * k;
      double dot = 0;
      SIMD for (int64_t i = 0; i < k; i++) dot += (double)g[i] * p[i];
      SIMD for (int64_t i = 0; i < k; i++) o[i] = (real)(p[i] * (g[i] - dot));
    }
    return 0;
  }
  if (act == FL_ACT_RELU) {
#pragma omp parallel for simd schedule(static) if (n > 65536)
    for (int64_t i = 0; i < n; i++) { real g = GY[i], v = Y[i]; GX[i] = v > 0 ? g : 0; }   /* loads first: vectorises */
  } else if (act == FL_ACT_SIGMOID) {
#pragma omp parallel for simd schedule(static) if (n > 65536)
    for (int64_t i = 0; i < n; i++) GX[i] = GY[i] * Y[i] * (1 - Y[i]);
  } else if (act == FL_ACT_TANH) {
#pragma omp parallel for simd schedule(static) if (n > 65536)
    for (int64_t i = 0; i < n; i++) GX[i] = GY[i] * (1 - Y[i] * Y[i]);
  }
  return 0;
}

#endif
