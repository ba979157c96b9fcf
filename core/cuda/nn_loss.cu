/* The CUDA backend's loss kernel (struct fl_nn_ops): softmax cross-entropy over the last dim with
 * integer labels (checked on the device) or probabilities and label smoothing, fused with its
 * gradient, as core/cpu/nn_loss.c. float32 and float64 only. */
#include "nn_cuda.h"

/* ---------------------------------------------------------------- softmax cross-entropy */

/* first row whose label is outside [0, K) (atomicMin over rows) */
template <class L> __global__ void label_check_kernel(const L *lab, int64_t N, int64_t K, unsigned long long *bad) {
  int64_t step = (int64_t)gridDim.x * blockDim.x;
  for (int64_t r = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; r < N; r += step) {
    int64_t l = (int64_t)lab[r];
    if (l < 0 || l >= K) atomicMin(bad, (unsigned long long)r);
  }
}

/* one block per row of logits z (N,K): loss[r] = -sum_i t_i (z_i - lse), grad = scale*(softmax - t),
 * t = (1-s)*target + s/K; target is labels (L integer, (N)) or probabilities (T, (N,K)) */
template <class T, class L> __global__ void xent_kernel(T *loss, T *grad, const T *z, const L *lab, const T *prob,
                                                        int64_t N, int64_t K, double on, double off, double gscale) {
  __shared__ double sh[CU_THREADS];
  int t = threadIdx.x;
  for (int64_t r = blockIdx.x; r < N; r += gridDim.x) {
    const T *zr = z + r * K;
    double mx = -INFINITY;
    for (int64_t i = t; i < K; i += CU_THREADS) mx = fmax(mx, (double)zr[i]);
    sh[t] = mx;
    __syncthreads();
    for (int s = CU_THREADS / 2; s > 0; s >>= 1) {
      if (t < s) sh[t] = fmax(sh[t], sh[t + s]);
      __syncthreads();
    }
    mx = sh[0];
    __syncthreads();
    double se = 0;
    for (int64_t i = t; i < K; i += CU_THREADS) se += exp((double)zr[i] - mx);
    sh[t] = se;
    __syncthreads();
    for (int s = CU_THREADS / 2; s > 0; s >>= 1) {
      if (t < s) sh[t] += sh[t + s];
      __syncthreads();
    }
    double lse = mx + log(sh[0]);
    __syncthreads();
    int64_t l = lab ? (int64_t)lab[r] : -1;
    double acc = 0;
    for (int64_t i = t; i < K; i += CU_THREADS) {
      double tv = lab ? (i == l ? 1.0 : 0.0) : (double)prob[r * K + i];
      tv = on * tv + off;
      if (tv != 0) acc -= tv * ((double)zr[i] - lse);
      if (grad) grad[r * K + i] = (T)(gscale * (exp((double)zr[i] - lse) - tv));
    }
    sh[t] = acc;
    __syncthreads();
    for (int s = CU_THREADS / 2; s > 0; s >>= 1) {
      if (t < s) sh[t] += sh[t + s];
      __syncthreads();
    }
    if (t == 0) loss[r] = (T)sh[0];
    __syncthreads();
  }
}

/* Labels are checked on the device; a bad one is reported like the CPU does (this waits for the
 * stream once per call, which the caller reading the loss does anyway). */
template <class L> static int check_labels(const char *op, cu_dev *d, const fl_tensor *target, int64_t N, int64_t K) {
  cu_buf bad;
  if (bad.get(op, d->index, sizeof(unsigned long long))) return -1;
  CU_TRY(op, cudaMemsetAsync(bad.p, 0xff, sizeof(unsigned long long), d->stream));
  label_check_kernel<L><<<cu_grid(d, N, CU_THREADS), CU_THREADS, 0, d->stream>>>(
      (const L *)cu_ptr(target), N, K, (unsigned long long *)bad.p);
  if (cu_launched(op)) return -1;
  unsigned long long row = 0;
  CU_TRY(op, cudaMemcpyAsync(&row, bad.p, sizeof row, cudaMemcpyDeviceToHost, d->stream));
  CU_TRY(op, cudaStreamSynchronize(d->stream));
  if (row == ~0ull) return 0;
  L lab = 0;
  CU_TRY(op, cudaMemcpyAsync(&lab, (const L *)cu_ptr(target) + row, sizeof lab, cudaMemcpyDeviceToHost, d->stream));
  CU_TRY(op, cudaStreamSynchronize(d->stream));
  return fl_fail("label %lld of row %lld is outside [0, %lld)", (long long)lab, (long long)row + 1, (long long)K);
}

int nn_softmax_xent(fl_tensor *loss, fl_tensor *grad, const fl_tensor *logits, const fl_tensor *target,
                    double smoothing, double grad_scale) {
  const char *op = "cuda softmax_xent";
  /* the loss is computed in float32 from float32 logits (the front casts bfloat16 ones) */
  if (logits->dtype == FL_BF16) return fl_fail("%s: bfloat16 logits are not supported (float32 or float64)", op);
  int64_t N = logits->shape[0], K = logits->shape[1];
  if (N == 0) return 0;
  cu_dev *d;
  if (dev_of(op, logits, &d)) return -1;
  int labels = target->dtype == FL_I32 || target->dtype == FL_I64;
  if (labels && (target->dtype == FL_I32 ? check_labels<int32_t>(op, d, target, N, K)
                                         : check_labels<int64_t>(op, d, target, N, K)))
    return -1;
  double off = smoothing / (double)K, on = 1 - smoothing;
  int64_t g = N < (int64_t)d->sm_count * 32 ? N : (int64_t)d->sm_count * 32;
  return cu_visit_float(op, logits->dtype, [&](auto tag) {
    typedef typename decltype(tag)::type T;
    T *G = grad ? (T *)cu_ptr(grad) : NULL;
    if (target->dtype == FL_I32)
      xent_kernel<T, int32_t><<<(unsigned)g, CU_THREADS, 0, d->stream>>>(
          (T *)cu_ptr(loss), G, (const T *)cu_ptr(logits), (const int32_t *)cu_ptr(target), NULL, N, K, on, off,
          grad_scale);
    else if (target->dtype == FL_I64)
      xent_kernel<T, int64_t><<<(unsigned)g, CU_THREADS, 0, d->stream>>>(
          (T *)cu_ptr(loss), G, (const T *)cu_ptr(logits), (const int64_t *)cu_ptr(target), NULL, N, K, on, off,
          grad_scale);
    else
      xent_kernel<T, int32_t><<<(unsigned)g, CU_THREADS, 0, d->stream>>>(
          (T *)cu_ptr(loss), G, (const T *)cu_ptr(logits), NULL, (const T *)cu_ptr(target), N, K, on, off,
          grad_scale);
    return cu_launched(op);
  });
}
