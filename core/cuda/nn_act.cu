/* The CUDA backend's activation kernels (struct fl_nn_ops): gradients through ReLU, sigmoid, tanh and
 * softmax from their outputs, and the residual sum y = a + scale*b (+ReLU), as core/cpu/nn_act.c. */
#include "nn_cuda.h"

/* ---------------------------------------------------------------- activation gradients */

template <class T> __global__ void act_bwd_kernel(T *gx, const T *gy, const T *y, int64_t n, int act) {
  typedef cu_acc_t<T> A;
  int64_t step = (int64_t)gridDim.x * blockDim.x;
  for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += step) {
    A v = cu_load(y[i]), g = cu_load(gy[i]), r;
    if (act == FL_ACT_RELU) r = v > 0 ? g : (A)0;
    else if (act == FL_ACT_SIGMOID) r = mul_rn(mul_rn(g, v), (A)1 - v);
    else r = mul_rn(g, (A)1 - mul_rn(v, v));
    gx[i] = cu_store<T>(r);
  }
}

/* softmax over rows of k: gx = y*(gy - sum(gy*y)); one block per row */
template <class T> __global__ void softmax_bwd_kernel(T *gx, const T *gy, const T *y, int64_t rows, int64_t k) {
  __shared__ double sh[CU_THREADS];
  int t = threadIdx.x;
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    const T *p = y + r * k, *g = gy + r * k;
    T *o = gx + r * k;
    double dot = 0;
    for (int64_t i = t; i < k; i += CU_THREADS) dot += (double)cu_load(g[i]) * (double)cu_load(p[i]);
    sh[t] = dot;
    __syncthreads();
    for (int s = CU_THREADS / 2; s > 0; s >>= 1) {
      if (t < s) sh[t] += sh[t + s];
      __syncthreads();
    }
    dot = sh[0];
    __syncthreads();
    for (int64_t i = t; i < k; i += CU_THREADS)
      o[i] = cu_from_double<T>((double)cu_load(p[i]) * ((double)cu_load(g[i]) - dot));
  }
}

int nn_act_backward(fl_act_kind act, fl_tensor *gx, const fl_tensor *gy, const fl_tensor *y) {
  const char *op = "cuda act_backward";
  return act_launch(op, y, [&](auto tag, cu_dev *d, int64_t n) {
    typedef typename decltype(tag)::type T;
    if (act == FL_ACT_SOFTMAX) {
      int64_t k = y->ndim ? y->shape[y->ndim - 1] : 1, rows = k ? n / k : 0;
      if (rows == 0) return 0;
      int64_t g = rows < (int64_t)d->sm_count * 32 ? rows : (int64_t)d->sm_count * 32;
      softmax_bwd_kernel<T><<<(unsigned)g, CU_THREADS, 0, d->stream>>>((T *)cu_ptr(gx), (const T *)cu_ptr(gy),
                                                                       (const T *)cu_ptr(y), rows, k);
    } else if (act == FL_ACT_RELU || act == FL_ACT_SIGMOID || act == FL_ACT_TANH) {
      act_bwd_kernel<T><<<cu_grid(d, n, CU_THREADS), CU_THREADS, 0, d->stream>>>(
          (T *)cu_ptr(gx), (const T *)cu_ptr(gy), (const T *)cu_ptr(y), n, (int)act);
    } else {
      return fl_fail("%s: unknown activation %d", op, (int)act);
    }
    return 0;
  });
}

/* y = a + scale*b, then ReLU (Add, InceptionResNet's scaled residual); y may be a or b */
template <class T> __global__ void add_act_kernel(T *y, const T *a, const T *b, int64_t n, cu_acc_t<T> scale,
                                                  int relu) {
  typedef cu_acc_t<T> A;
  int64_t step = (int64_t)gridDim.x * blockDim.x;
  for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += step) {
    A v = add_rn(cu_load(a[i]), mul_rn(scale, cu_load(b[i])));
    y[i] = cu_store<T>(relu && v < (A)0 ? (A)0 : v);
  }
}

int nn_add_act(fl_tensor *y, const fl_tensor *a, const fl_tensor *b, double scale, int relu) {
  return act_launch("cuda add_act", y, [&](auto tag, cu_dev *d, int64_t n) {
    typedef typename decltype(tag)::type T;
    add_act_kernel<T><<<cu_grid(d, n, CU_THREADS), CU_THREADS, 0, d->stream>>>(
        (T *)cu_ptr(y), (const T *)cu_ptr(a), (const T *)cu_ptr(b), n, (cu_acc_t<T>)scale, relu);
    return 0;
  });
}

