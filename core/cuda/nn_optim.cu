/* The CUDA backend's optimizer kernels (struct fl_nn_ops): y = a*x + b*y, the sum of squares, Keras's
 * SGD and Adam steps, as core/cpu/nn_optim.c, and the same steps fused over many tensors in few
 * launches (fl_cuda_adam_step_multi / fl_cuda_sgd_step_multi, cuda_backend.h). float32 and float64
 * only. */
#include "nn_cuda.h"

/* ---------------------------------------------------------------- optimizer kernels */

/* y = a*x + b*y, exactly the CPU's expression (NaN in y propagates even when b == 0) */
template <class T> __global__ void axpby_kernel(T *y, const T *x, int64_t n, T a, T b) {
  int64_t step = (int64_t)gridDim.x * blockDim.x;
  for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += step)
    y[i] = add_rn(mul_rn(a, x[i]), mul_rn(b, y[i]));
}

int nn_axpby(fl_tensor *y, double a, const fl_tensor *x, double b) {
  return float_launch("cuda axpby", y, [&](auto tag, cu_dev *d, int64_t n) {
    typedef typename decltype(tag)::type T;
    axpby_kernel<T><<<cu_grid(d, n, CU_THREADS), CU_THREADS, 0, d->stream>>>((T *)cu_ptr(y), (const T *)cu_ptr(x), n,
                                                                             (T)a, (T)b);
    return 0;
  });
}

/* sum of squares: blocks over chunks, then one block over the partial sums (fixed order) */
template <class T> __global__ void sumsq_part_kernel(const T *x, int64_t n, int64_t chunk, double *part) {
  __shared__ double sh[CU_THREADS];
  int64_t lo = (int64_t)blockIdx.x * chunk, hi = lo + chunk < n ? lo + chunk : n;
  double s = 0;
  for (int64_t i = lo + threadIdx.x; i < hi; i += CU_THREADS) s += (double)x[i] * (double)x[i];
  sh[threadIdx.x] = s;
  __syncthreads();
  for (int k = CU_THREADS / 2; k > 0; k >>= 1) {
    if ((int)threadIdx.x < k) sh[threadIdx.x] += sh[threadIdx.x + k];
    __syncthreads();
  }
  if (threadIdx.x == 0) part[blockIdx.x] = sh[0];
}

__global__ void sum_parts_kernel(const double *part, int np, double *out) {
  __shared__ double sh[CU_THREADS];
  double s = 0;
  for (int i = threadIdx.x; i < np; i += CU_THREADS) s += part[i];
  sh[threadIdx.x] = s;
  __syncthreads();
  for (int k = CU_THREADS / 2; k > 0; k >>= 1) {
    if ((int)threadIdx.x < k) sh[threadIdx.x] += sh[threadIdx.x + k];
    __syncthreads();
  }
  if (threadIdx.x == 0) *out = sh[0];
}

/* the result goes to the host: waits for the stream (gradient clipping reads it at once anyway) */
int nn_sumsq(const fl_tensor *x, double *out) {
  const char *op = "cuda sumsq";
  int64_t n = fl_tensor_numel(x);
  *out = 0;
  if (n == 0) return 0;
  cu_dev *d;
  if (dev_of(op, x, &d)) return -1;
  int64_t nb = (int64_t)d->sm_count * 4, need = (n + CU_THREADS - 1) / CU_THREADS;
  if (nb > need) nb = need;
  int64_t chunk = (n + nb - 1) / nb;
  cu_buf part;
  if (part.get(op, d->index, (size_t)(nb + 1) * sizeof(double))) return -1;
  double *pp = (double *)part.p;
  int rc = cu_visit_float(op, x->dtype, [&](auto tag) {
    typedef typename decltype(tag)::type T;
    sumsq_part_kernel<T><<<(unsigned)nb, CU_THREADS, 0, d->stream>>>((const T *)cu_ptr(x), n, chunk, pp);
    return cu_launched(op);
  });
  if (rc) return -1;
  sum_parts_kernel<<<1, CU_THREADS, 0, d->stream>>>(pp, (int)nb, pp + nb);
  if (cu_launched(op)) return -1;
  CU_TRY(op, cudaMemcpyAsync(out, pp + nb, sizeof(double), cudaMemcpyDeviceToHost, d->stream));
  CU_TRY(op, cudaStreamSynchronize(d->stream));
  return 0;
}

/* Many tensors per launch: up to OPT_CHUNK tensors' pointers travel as the kernel's parameters
 * (no upload, no synchronisation); element e of the chunk belongs to tensor j with
 * start[j] <= e < start[j+1]. */
#define OPT_CHUNK 32

typedef struct {
  int n;
  void *w[OPT_CHUNK];
  const void *g[OPT_CHUNK];
  void *m[OPT_CHUNK], *v[OPT_CHUNK];
  int64_t start[OPT_CHUNK + 1];
} opt_chunk;

__device__ inline int opt_find(const opt_chunk &c, int64_t e) {
  int lo = 0, hi = c.n - 1;
  while (lo < hi) {
    int mid = (lo + hi + 1) / 2;
    if (c.start[mid] <= e) lo = mid;
    else hi = mid - 1;
  }
  return lo;
}

/* Keras's Adam (core/nn.h): m += (g-m)*(1-b1); v += (g^2-v)*(1-b2); w -= m*alpha/(sqrt(v)+eps), with the
 * CPU's precisions (the square root and division in double) */
template <class T> __global__ void adam_kernel(opt_chunk c, T a, T c1, T c2, double e) {
  int64_t total = c.start[c.n], step = (int64_t)gridDim.x * blockDim.x;
  for (int64_t k = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; k < total; k += step) {
    int j = opt_find(c, k);
    int64_t i = k - c.start[j];
    T *W = (T *)c.w[j], *M = (T *)c.m[j], *V = (T *)c.v[j];
    T gi = ((const T *)c.g[j])[i], mo = M[i], vo = V[i];
    T mi = add_rn(mo, mul_rn(gi - mo, c1));
    T vi = add_rn(vo, mul_rn(mul_rn(gi, gi) - vo, c2));
    M[i] = mi;
    V[i] = vi;
    W[i] = (T)((double)W[i] - (double)mul_rn(mi, a) / (sqrt((double)vi) + e));
  }
}

/* Keras's SGD: m = mu*m - lr*g; w += nesterov ? mu*m - lr*g : m (plain w -= lr*g without m) */
template <class T> __global__ void sgd_kernel(opt_chunk c, T lr, T mu, int nesterov) {
  int64_t total = c.start[c.n], step = (int64_t)gridDim.x * blockDim.x;
  for (int64_t k = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; k < total; k += step) {
    int j = opt_find(c, k);
    int64_t i = k - c.start[j];
    T *W = (T *)c.w[j], *M = (T *)c.m[j];
    T gi = ((const T *)c.g[j])[i];
    if (!M) {
      W[i] = W[i] - mul_rn(lr, gi);
      continue;
    }
    T mi = mul_rn(mu, M[i]) - mul_rn(lr, gi);
    M[i] = mi;
    W[i] = W[i] + (nesterov ? mul_rn(mu, mi) - mul_rn(lr, gi) : mi);
  }
}

/* Checks the lists: every tensor contiguous, on w[0]'s device, of w[0]'s dtype and its parameter's
 * element count. m or v may be NULL lists; a NULL entry in m means no momentum for that tensor. */
static int opt_check(const char *op, int n, fl_tensor *const *w, const fl_tensor *const *g, fl_tensor *const *m,
                     fl_tensor *const *v, int need_m) {
  if (n <= 0) return fl_fail("%s: no parameters", op);
  const fl_tensor *w0 = w[0];
  if (!w0 || !w0->storage || !cu_is_dev(w0)) return fl_fail("%s: parameter 1 is not a CUDA tensor", op);
  if (w0->dtype == FL_BF16)   /* bfloat16 training keeps float32 master weights and moments */
    return fl_fail("%s: bfloat16 parameters are not supported (float32 or float64 master weights)", op);
  if (w0->dtype != FL_F32 && w0->dtype != FL_F64)
    return fl_fail("%s: parameters must be float32 or float64, got %s", op, fl_dtype_name(w0->dtype));
  static const char *const names[4] = {"parameter", "gradient", "first moment", "second moment"};
  for (int j = 0; j < n; j++) {
    const fl_tensor *ts[4] = {w[j], g[j], m ? m[j] : NULL, v ? v[j] : NULL};
    for (int k = 0; k < 4; k++) {
      const fl_tensor *t = ts[k];
      if (!t) {
        if (k < 2 || (k == 2 && need_m) || (k == 3 && v)) return fl_fail("%s: %s %d is missing", op, names[k], j + 1);
        continue;
      }
      if (!t->storage || !cu_is_dev(t) || t->storage->device != w0->storage->device)
        return fl_fail("%s: %s %d is not on cuda:%d", op, names[k], j + 1, w0->storage->device);
      if (t->dtype != w0->dtype)
        return fl_fail("%s: %s %d is %s, parameters are %s", op, names[k], j + 1, fl_dtype_name(t->dtype),
                       fl_dtype_name(w0->dtype));
      if (!fl_tensor_is_contiguous(t)) return fl_fail("%s: %s %d is not contiguous", op, names[k], j + 1);
      if (fl_tensor_numel(t) != fl_tensor_numel(w[j]))
        return fl_fail("%s: %s %d has %lld elements, its parameter %lld", op, names[k], j + 1,
                       (long long)fl_tensor_numel(t), (long long)fl_tensor_numel(w[j]));
    }
  }
  return 0;
}

/* launches `launch(chunk, total)` for consecutive chunks of up to OPT_CHUNK tensors */
template <class F> static int opt_chunks(int n, fl_tensor *const *w, const fl_tensor *const *g, fl_tensor *const *m,
                                         fl_tensor *const *v, F launch) {
  for (int j0 = 0; j0 < n; j0 += OPT_CHUNK) {
    opt_chunk c;
    memset(&c, 0, sizeof c);
    c.n = n - j0 < OPT_CHUNK ? n - j0 : OPT_CHUNK;
    for (int j = 0; j < c.n; j++) {
      c.w[j] = cu_ptr(w[j0 + j]);
      c.g[j] = cu_ptr(g[j0 + j]);
      c.m[j] = m && m[j0 + j] ? cu_ptr(m[j0 + j]) : NULL;
      c.v[j] = v && v[j0 + j] ? cu_ptr(v[j0 + j]) : NULL;
      c.start[j + 1] = c.start[j] + fl_tensor_numel(w[j0 + j]);
    }
    if (c.start[c.n] > 0 && launch(c, c.start[c.n])) return -1;
  }
  return 0;
}

extern "C" int fl_cuda_adam_step_multi(int n, fl_tensor *const *w, const fl_tensor *const *g, fl_tensor *const *m,
                                       fl_tensor *const *v, double alpha, double beta1, double beta2, double eps) {
  const char *op = "cuda adam_step";
  if (!m || !v) return fl_fail("%s: moment tensors are required", op);
  if (opt_check(op, n, w, g, m, v, 1)) return -1;
  cu_dev *d;
  if (cu_enter(op, w[0]->storage->device, &d)) return -1;
  return cu_visit_float(op, w[0]->dtype, [&](auto tag) {
    typedef typename decltype(tag)::type T;
    return opt_chunks(n, w, g, m, v, [&](const opt_chunk &c, int64_t total) {
      adam_kernel<T><<<cu_grid(d, total, CU_THREADS), CU_THREADS, 0, d->stream>>>(c, (T)alpha, (T)(1 - beta1),
                                                                                  (T)(1 - beta2), (double)(T)eps);
      return cu_launched(op);
    });
  });
}

extern "C" int fl_cuda_sgd_step_multi(int n, fl_tensor *const *w, const fl_tensor *const *g, fl_tensor *const *m,
                                      double lr, double momentum, int nesterov) {
  const char *op = "cuda sgd_step";
  if (opt_check(op, n, w, g, m, NULL, 0)) return -1;
  cu_dev *d;
  if (cu_enter(op, w[0]->storage->device, &d)) return -1;
  return cu_visit_float(op, w[0]->dtype, [&](auto tag) {
    typedef typename decltype(tag)::type T;
    return opt_chunks(n, w, g, m, NULL, [&](const opt_chunk &c, int64_t total) {
      sgd_kernel<T><<<cu_grid(d, total, CU_THREADS), CU_THREADS, 0, d->stream>>>(c, (T)lr, (T)momentum, nesterov);
      return cu_launched(op);
    });
  });
}

int nn_sgd_step(fl_tensor *w, const fl_tensor *g, fl_tensor *m, double lr, double momentum, int nesterov) {
  fl_tensor *mm[1] = {m};
  return fl_cuda_sgd_step_multi(1, &w, &g, m ? mm : NULL, lr, momentum, nesterov);
}

int nn_adam_step(fl_tensor *w, const fl_tensor *g, fl_tensor *m, fl_tensor *v, double alpha, double beta1,
                 double beta2, double eps) {
  return fl_cuda_adam_step_multi(1, &w, &g, &m, &v, alpha, beta1, beta2, eps);
}
