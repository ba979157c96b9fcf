/* The CUDA backend's normalisation kernels (struct fl_nn_ops): batch normalisation (training forward
 * with the running statistics, backward in both modes, a fused ReLU) and the per-channel affine that
 * inference BatchNorm and convolution biases become (also the convolutions' epilogue), as
 * core/cpu/nn_norm.c. */
#include "nn_cuda.h"

/* ---------------------------------------------------------------- batch normalisation */

/* one pass over x: sums and sums of squares per channel, in double (the variance is then
 * E[x^2] - mean^2; with 53-bit accumulation this loses nothing a float32 result can show unless
 * |mean|/std exceeds ~1e4, and it reads x once instead of twice) */
template <class T> struct sum_sq_f {
  const T *x;
  int64_t C;
  __device__ void operator()(int64_t r, int64_t c, double *acc) const {
    double v = (double)cu_load(x[r * C + c]);
    acc[0] += v;
    acc[1] += v * v;
  }
};

/* per channel: mean/invstd outputs, y coefficients ab (2C), running statistics. T: the per-channel
 * tensors' type (cu_acc_t of the activations': float32 beside bfloat16). */
template <class T> __global__ void bn_stats_kernel(const double *sum, const double *sq, int64_t rows, int64_t C,
                                                   const T *gamma, const T *beta, T *mean, T *invstd, T *ab, T *rm,
                                                   T *rv, double momentum, double eps, int unbiased) {
  int64_t step = (int64_t)gridDim.x * blockDim.x;
  for (int64_t c = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; c < C; c += step) {
    double dm = sum[c] / (double)rows, dv = sq[c] / (double)rows - dm * dm;
    if (dv < 0) dv = 0;
    double inv = 1.0 / sqrt(dv + eps), a = (gamma ? (double)gamma[c] : 1.0) * inv;
    mean[c] = (T)dm;
    invstd[c] = (T)inv;
    ab[c] = (T)a;
    ab[C + c] = (T)((beta ? (double)beta[c] : 0.0) - dm * a);
    if (rm) {
      double unbias = unbiased && rows > 1 ? (double)rows / (double)(rows - 1) : 1.0;
      rm[c] = (T)(momentum * (double)rm[c] + (1 - momentum) * dm);
      rv[c] = (T)(momentum * (double)rv[c] + (1 - momentum) * dv * unbias);
    }
  }
}

/* y = x*a[c] + b[c] (then max(., 0) when relu), or, when g is given, gx = g'*a[c] + x*b[c] + k[c] with
 * g' = g where the fused ReLU's output ry is > 0 (all of g without ry). I: the index type. coef has
 * the accumulation type A (float beside bfloat16 activations). */
template <class T, class I> __global__ void bn_apply_kernel(T *o, const T *x, const T *g, const T *ry, I n, I C,
                                                            const cu_acc_t<T> *coef, int relu) {
  typedef cu_acc_t<T> A;
  I step = (I)gridDim.x * blockDim.x;
  for (I i = (I)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += step) {
    I c = i % C;
    if (g) {
      A gv = (!ry || cu_load(ry[i]) > 0) ? cu_load(g[i]) : (A)0;
      o[i] = cu_store<T>(add_rn(add_rn(mul_rn(gv, coef[c]), mul_rn(cu_load(x[i]), coef[C + c])), coef[2 * C + c]));
    } else {
      A v = add_rn(mul_rn(cu_load(x[i]), coef[c]), coef[C + c]);
      o[i] = cu_store<T>(relu && !(v > 0) ? (A)0 : v);
    }
  }
}

template <class T> static int bn_apply(const char *op, cu_dev *d, T *o, const T *x, const T *g, const T *ry,
                                       int64_t n, int64_t C, const cu_acc_t<T> *coef, int relu) {
  return cu_visit_index(n, [&](auto itag) {
    typedef decltype(itag) I;
    bn_apply_kernel<T, I><<<cu_grid(d, n, CU_THREADS), CU_THREADS, 0, d->stream>>>(o, x, g, ry, (I)n, (I)C, coef, relu);
    return cu_launched(op);
  });
}

int nn_batchnorm_forward_train(fl_tensor *y, fl_tensor *mean, fl_tensor *invstd, const fl_tensor *x,
                               const fl_tensor *gamma, const fl_tensor *beta, fl_tensor *running_mean,
                               fl_tensor *running_var, double momentum, double eps, int unbiased,
                               int relu) {
  const char *op = "cuda batchnorm_forward_train";
  int64_t C = x->shape[x->ndim - 1], n = fl_tensor_numel(x), rows = C ? n / C : 0;
  if (C == 0) return 0;
  fl_dtype xd = x->dtype;
  if (check_param(op, "gamma", gamma, xd) || check_param(op, "beta", beta, xd) || check_param(op, "mean", mean, xd) ||
      check_param(op, "invstd", invstd, xd) || check_param(op, "running mean", running_mean, xd) ||
      check_param(op, "running variance", running_var, xd))
    return -1;
  cu_dev *d;
  if (dev_of(op, x, &d)) return -1;
  return cu_visit_act(op, x->dtype, [&](auto tag) {
    typedef typename decltype(tag)::type T;
    typedef cu_acc_t<T> P;   /* the per-channel tensors' type */
    /* st: sums (C), sums of squares (C), double; ab: y = x*a + b per channel */
    cu_buf st, ab;
    if (st.get(op, d->index, (size_t)(2 * C) * sizeof(double)) || ab.get(op, d->index, (size_t)(2 * C) * sizeof(P)))
      return -1;
    double *sum = (double *)st.p, *sq = sum + C;
    const T *X = (const T *)cu_ptr(x);
    if (colsums<2>(op, d, sum_sq_f<T>{X, C}, rows, C, sum)) return -1;
    P *rm = running_mean ? (P *)cu_ptr(running_mean) : NULL, *rv = running_var ? (P *)cu_ptr(running_var) : NULL;
    bn_stats_kernel<P><<<cu_grid(d, C, CU_THREADS), CU_THREADS, 0, d->stream>>>(
        sum, sq, rows, C, (const P *)opt_ptr(gamma), (const P *)opt_ptr(beta), (P *)cu_ptr(mean),
        (P *)cu_ptr(invstd), (P *)ab.p, rm, rv, momentum, eps, unbiased);
    if (cu_launched(op)) return -1;
    if (n == 0) return 0;
    return bn_apply<T>(op, d, (T *)cu_ptr(y), X, NULL, NULL, n, C, (const P *)ab.p, relu);
  });
}

/* sums of gy and of gy*xhat per channel, xhat = (x - mean)*invstd computed as the CPU does (x - mean
 * rounded to the accumulation type A: float32's arithmetic for bfloat16) */
template <class T> struct bn_grad_f {
  typedef cu_acc_t<T> A;
  const T *x, *g, *ry;   /* ry: a fused ReLU's output, or NULL */
  const A *mean, *inv;
  int64_t C;
  __device__ void operator()(int64_t r, int64_t c, double *acc) const {
    A gv = (!ry || cu_load(ry[r * C + c]) > 0) ? cu_load(g[r * C + c]) : (A)0;
    acc[0] += (double)gv;
    acc[1] += (double)gv * (double)(A)(cu_load(x[r * C + c]) - mean[c]) * (double)inv[c];
  }
};

/* per channel: gbeta/ggamma (accumulated with beta_acc) and gx's coefficients (3C: a, b, k). T: the
 * per-channel tensors' type, as in bn_stats_kernel. */
template <class T> __global__ void bn_grad_coef_kernel(const double *sg, const double *sgx, int64_t rows, int64_t C,
                                                       const T *gamma, const T *mean, const T *inv, int training,
                                                       T *ggamma, T *gbeta, double beta_acc, T *coef) {
  int64_t step = (int64_t)gridDim.x * blockDim.x;
  for (int64_t c = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; c < C; c += step) {
    if (gbeta) gbeta[c] = (T)((beta_acc == 0 ? 0.0 : beta_acc * (double)gbeta[c]) + sg[c]);
    if (ggamma) ggamma[c] = (T)((beta_acc == 0 ? 0.0 : beta_acc * (double)ggamma[c]) + sgx[c]);
    if (!coef) continue;
    double a = (gamma ? (double)gamma[c] : 1.0) * (double)inv[c];
    if (training) {
      double mg = sg[c] / (double)rows, mgx = sgx[c] / (double)rows;
      double b = -a * (double)inv[c] * mgx;
      coef[c] = (T)a;
      coef[C + c] = (T)b;
      coef[2 * C + c] = (T)(-a * mg - b * (double)mean[c]);
    } else {
      coef[c] = (T)a;
      coef[C + c] = 0;
      coef[2 * C + c] = 0;
    }
  }
}

int nn_batchnorm_backward(fl_tensor *gx, fl_tensor *ggamma, fl_tensor *gbeta, const fl_tensor *x,
                          const fl_tensor *gy, const fl_tensor *mean, const fl_tensor *invstd,
                          const fl_tensor *gamma, int training, double beta_acc, const fl_tensor *relu_y) {
  const char *op = "cuda batchnorm_backward";
  int64_t C = x->shape[x->ndim - 1], n = fl_tensor_numel(x), rows = C ? n / C : 0;
  if (C == 0) return 0;
  fl_dtype xd = x->dtype;
  if (check_param(op, "mean", mean, xd) || check_param(op, "invstd", invstd, xd) ||
      check_param(op, "gamma", gamma, xd) || check_param(op, "gamma gradient", ggamma, xd) ||
      check_param(op, "beta gradient", gbeta, xd))
    return -1;
  cu_dev *d;
  if (dev_of(op, x, &d)) return -1;
  return cu_visit_act(op, x->dtype, [&](auto tag) {
    typedef typename decltype(tag)::type T;
    typedef cu_acc_t<T> P;   /* the per-channel tensors' type */
    cu_buf st, coef;
    if (st.get(op, d->index, (size_t)(2 * C) * sizeof(double))) return -1;
    if (gx && coef.get(op, d->index, (size_t)(3 * C) * sizeof(P))) return -1;
    double *sg = (double *)st.p, *sgx = sg + C;
    const T *X = (const T *)cu_ptr(x), *G = (const T *)cu_ptr(gy), *RY = (const T *)opt_ptr(relu_y);
    const P *MEAN = (const P *)cu_ptr(mean), *INV = (const P *)cu_ptr(invstd);
    if (training || ggamma || gbeta) {
      if (colsums<2>(op, d, bn_grad_f<T>{X, G, RY, MEAN, INV, C}, rows, C, sg)) return -1;
    } else {
      CU_TRY(op, cudaMemsetAsync(sg, 0, (size_t)(2 * C) * sizeof(double), d->stream));
    }
    bn_grad_coef_kernel<P><<<cu_grid(d, C, CU_THREADS), CU_THREADS, 0, d->stream>>>(
        sg, sgx, rows, C, (const P *)opt_ptr(gamma), MEAN, INV, training, ggamma ? (P *)cu_ptr(ggamma) : NULL,
        gbeta ? (P *)cu_ptr(gbeta) : NULL, beta_acc, gx ? (P *)coef.p : NULL);
    if (cu_launched(op)) return -1;
    if (!gx || n == 0) return 0;
    return bn_apply<T>(op, d, (T *)cu_ptr(gx), X, G, RY, n, C, (const P *)coef.p, 0);
  });
}

/* ---------------------------------------------------------------- per-channel epilogue */

/* y = x*scale[c] + shift[c] (either NULL), then max(., 0); c = i % C. y may be x. */
template <class T, class I> __global__ void affine_kernel(T *y, const T *x, I n, I C, const cu_acc_t<T> *scale,
                                                          const cu_acc_t<T> *shift, int relu) {
  typedef cu_acc_t<T> A;
  I step = (I)gridDim.x * blockDim.x;
  for (I i = (I)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += step) {
    I c = i % C;
    A v = cu_load(x[i]);
    if (scale) v = mul_rn(v, scale[c]);
    if (shift) v = add_rn(v, shift[c]);
    if (relu) v = v > 0 ? v : (A)0;
    y[i] = cu_store<T>(v);
  }
}

int affine_run(const char *op, fl_tensor *y, const fl_tensor *x, const fl_tensor *scale, const fl_tensor *shift,
        int relu) {
  int64_t n = fl_tensor_numel(x), C = x->ndim ? x->shape[x->ndim - 1] : 1;
  if (n == 0 || C == 0) return 0;
  if (check_param(op, "scale", scale, x->dtype) || check_param(op, "shift", shift, x->dtype)) return -1;
  if (!scale && !shift && !relu) return cu_ptr(y) == cu_ptr(x) ? 0 : cu_copy_dev(op, y, x);
  return act_launch(op, x, [&](auto tag, cu_dev *d, int64_t) {
    typedef typename decltype(tag)::type T;
    typedef cu_acc_t<T> A;
    return cu_visit_index(n, [&](auto itag) {
      typedef decltype(itag) I;
      affine_kernel<T, I><<<cu_grid(d, n, CU_THREADS), CU_THREADS, 0, d->stream>>>(
          (T *)cu_ptr(y), (const T *)cu_ptr(x), (I)n, (I)C, (const A *)opt_ptr(scale), (const A *)opt_ptr(shift),
          relu);
      return 0;
    });
  });
}

int nn_channel_affine(fl_tensor *y, const fl_tensor *x, const fl_tensor *scale, const fl_tensor *shift,
                      int relu) {
  return affine_run("cuda channel_affine", y, x, scale, shift, relu);
}
