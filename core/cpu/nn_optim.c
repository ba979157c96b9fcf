/* The CPU's optimizer kernels (struct fl_nn_ops): one pass over contiguous tensors, in place:
 * y = a*x + b*y, the sum of squares (clipping by norm), Keras's SGD and Adam steps. float32 and
 * float64 only. */
#ifndef NN_GENERIC
#include "nn_cpu.h"

#define NN_GENERIC "nn_optim.c"
#include "nn_generic.h"

/* ---- the entries of struct fl_nn_ops (cpu.c's table) ---- */

int cpu_axpby(fl_tensor *y, double a, const fl_tensor *x, double b) {
  return PICK(y, axpby, y, a, x, b);
}
int cpu_sumsq(const fl_tensor *x, double *out) { return PICK(x, sumsq, x, out); }
int cpu_sgd_step(fl_tensor *w, const fl_tensor *g, fl_tensor *m, double lr, double momentum, int nesterov) {
  return PICK(w, sgd_step, w, g, m, lr, momentum, nesterov);
}
int cpu_adam_step(fl_tensor *w, const fl_tensor *g, fl_tensor *m, fl_tensor *v, double alpha, double beta1,
                  double beta2, double eps) {
  return PICK(w, adam_step, w, g, m, v, alpha, beta1, beta2, eps);
}

#else   /* ---- the generic part: compiled for float (real, NN(name) = name_f32) and double ---- */

/* ---- optimizer kernels ---- */

static int NN(axpby)(fl_tensor *y, double a, const fl_tensor *x, double b) {
  const int64_t n = fl_tensor_numel(y);
  real *Y = fl_tensor_data(y);
  const real *X = fl_tensor_data(x);
  const real ra = (real)a, rb = (real)b;
#pragma omp parallel for simd schedule(static) if (n > 65536)
  for (int64_t i = 0; i < n; i++) Y[i] = ra * X[i] + rb * Y[i];
  return 0;
}

static int NN(sumsq)(const fl_tensor *x, double *out) {
  const int64_t n = fl_tensor_numel(x);
  const real *X = fl_tensor_data(x);
  double s = 0;
#pragma omp parallel for simd schedule(static) reduction(+ : s) if (n > 65536)
  for (int64_t i = 0; i < n; i++) s += (double)X[i] * X[i];
  *out = s;
  return 0;
}

static int NN(sgd_step)(fl_tensor *w, const fl_tensor *g, fl_tensor *m, double lr, double momentum, int nesterov) {
  const int64_t n = fl_tensor_numel(w);
  real *W = fl_tensor_data(w), *Mo = m ? fl_tensor_data(m) : NULL;
  const real *G = fl_tensor_data(g);
  const real rl = (real)lr, mu = (real)momentum;
  if (!Mo) {
#pragma omp parallel for simd schedule(static) if (n > 65536)
    for (int64_t i = 0; i < n; i++) W[i] -= rl * G[i];
    return 0;
  }
  if (nesterov) {
#pragma omp parallel for simd schedule(static) if (n > 65536)
    for (int64_t i = 0; i < n; i++) {
      real mi = mu * Mo[i] - rl * G[i];
      Mo[i] = mi;
      W[i] += mu * mi - rl * G[i];
    }
  } else {
#pragma omp parallel for simd schedule(static) if (n > 65536)
    for (int64_t i = 0; i < n; i++) {
      real mi = mu * Mo[i] - rl * G[i];
      Mo[i] = mi;
      W[i] += mi;
    }
  }
  return 0;
}

static int NN(adam_step)(fl_tensor *w, const fl_tensor *g, fl_tensor *m, fl_tensor *v, double alpha, double beta1,
                         double beta2, double eps) {
  const int64_t n = fl_tensor_numel(w);
  real *W = fl_tensor_data(w), *Mo = fl_tensor_data(m), *V = fl_tensor_data(v);
  const real *G = fl_tensor_data(g);
  const real a = (real)alpha, c1 = (real)(1 - beta1), c2 = (real)(1 - beta2), e = (real)eps;
#pragma omp parallel for simd schedule(static) if (n > 65536)   /* sqrt without errno (Makefile) */
  for (int64_t i = 0; i < n; i++) {
    real gi = G[i];
    real mi = Mo[i] + (gi - Mo[i]) * c1;
    real vi = V[i] + (gi * gi - V[i]) * c2;
    Mo[i] = mi;
    V[i] = vi;
    W[i] -= mi * a / (sqrt(vi) + e);
  }
  return 0;
}

#endif
