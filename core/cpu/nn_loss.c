/* The CPU's loss kernel (struct fl_nn_ops): softmax cross-entropy over the last dim, with integer
 * labels or probabilities and label smoothing, fused with its gradient. float32 and float64 only. */
#ifndef NN_GENERIC
#include "nn_cpu.h"

#define NN_GENERIC "nn_loss.c"
#include "nn_generic.h"

/* ---- the entries of struct fl_nn_ops (cpu.c's table) ---- */

int cpu_softmax_xent(fl_tensor *loss, fl_tensor *grad, const fl_tensor *logits, const fl_tensor *target,
                     double smoothing, double grad_scale) {
  return PICK(logits, softmax_xent, loss, grad, logits, target, smoothing, grad_scale);
}

#else   /* ---- the generic part: compiled for float (real, NN(name) = name_f32) and double ---- */

static int NN(softmax_xent)(fl_tensor *loss, fl_tensor *grad, const fl_tensor *logits, const fl_tensor *target,
                            double smoothing, double grad_scale) {
  const int64_t N = logits->shape[0], K = logits->shape[1];
  const real *Z = fl_tensor_data(logits);
  real *L = fl_tensor_data(loss), *G = grad ? fl_tensor_data(grad) : NULL;
  const int labels = target->dtype == FL_I32 || target->dtype == FL_I64;
  const real *T = labels ? NULL : fl_tensor_data(target);
  int64_t bad = -1;
  for (int64_t r = 0; r < N && labels; r++) {
    int64_t l = target->dtype == FL_I32 ? ((const int32_t *)fl_tensor_data(target))[r]
                                         : ((const int64_t *)fl_tensor_data(target))[r];
    if (l < 0 || l >= K) { bad = r; break; }
  }
  if (bad >= 0) {
    int64_t l = target->dtype == FL_I32 ? ((const int32_t *)fl_tensor_data(target))[bad]
                                         : ((const int64_t *)fl_tensor_data(target))[bad];
    return fl_fail("label %lld of row %lld is outside [0, %lld)", (long long)l, (long long)bad + 1, (long long)K);
  }
  const double off = smoothing / (double)K, on = 1 - smoothing;
#pragma omp parallel for schedule(static) if (N * K > 32768)
  for (int64_t r = 0; r < N; r++) {
    const real *z = Z + r * K;
    double mx = z[0], se = 0;
    for (int64_t i = 1; i < K; i++) mx = z[i] > mx ? z[i] : mx;
    for (int64_t i = 0; i < K; i++) se += exp(z[i] - mx);
    double lse = mx + log(se), l = 0;
    int64_t lab = -1;
    if (labels)
      lab = target->dtype == FL_I32 ? ((const int32_t *)fl_tensor_data(target))[r]
                                     : ((const int64_t *)fl_tensor_data(target))[r];
    for (int64_t i = 0; i < K; i++) {
      double t = labels ? (i == lab ? 1.0 : 0.0) : (double)T[r * K + i];
      t = on * t + off;
      if (t != 0) l -= t * (z[i] - lse);
      if (G) G[r * K + i] = (real)(grad_scale * (exp(z[i] - lse) - t));
    }
    L[r] = (real)l;
  }
  return 0;
}

#endif
