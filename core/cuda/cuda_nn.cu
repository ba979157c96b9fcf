/* The CUDA backend's nn kernels (struct fl_nn_ops, core/nn.h) and the fused optimizer updates.
 * Convolutions go to cuDNN (cuda_conv.cu) after turning Keras's kernels into cuDNN's KRSC layout:
 * HWIO (R,S,C,K) -> (K,R,S,C), depthwise (R,S,C,M) -> (C*M,R,S,1) as a convolution with C groups.
 * Asymmetric 'same' padding (TensorFlow puts the odd pixel at the bottom/right) goes through an
 * explicitly padded copy so cuDNN only sees symmetric problems. Pooling, batch norm, the per-channel
 * epilogue, activation gradients and the fused softmax cross-entropy are kernels written here,
 * following the CPU backend (core/cpu/nn_cpu_impl.h) operation for operation: reductions accumulate
 * in double in a fixed order (deterministic), and products/sums that the CPU rounds separately are
 * spelled with __fmul_rn/__fadd_rn so nvcc does not fuse them into one FMA.
 *
 * bfloat16 activations (T = __nv_bfloat16): every kernel but the optimizer updates and the fused
 * loss takes them. Elements are loaded into A = cu_acc_t<T> (float), the float32 arithmetic runs
 * unchanged, each output is rounded once (cu_store). The per-channel tensors beside bfloat16
 * activations -- scale/shift, gamma/beta, batch statistics, bias and BN parameter gradients -- are
 * float32 (the front keeps them so): in the kernels they have type A, which is T itself for
 * float32/float64. */
#include "cuda_internal.h"

#include <math.h>
#include <string.h>
#include <vector>

/* ---------------------------------------------------------------- helpers */

template <class T> __device__ inline T mul_rn(T a, T b) {
  if constexpr (std::is_same<T, float>::value) return __fmul_rn(a, b);
  else return __dmul_rn(a, b);
}
template <class T> __device__ inline T add_rn(T a, T b) {
  if constexpr (std::is_same<T, float>::value) return __fadd_rn(a, b);
  else return __dadd_rn(a, b);
}

/* a contiguous tensor seen with another shape of the same size */
static fl_tensor view_as(const fl_tensor *t, int nd, const int64_t *shape) {
  fl_tensor v = *t;
  v.ndim = nd;
  for (int i = 0; i < nd; i++) v.shape[i] = shape[i];
  fl_contiguous_strides(nd, v.shape, v.stride);
  return v;
}

static fl_tensor view_perm(const fl_tensor *t, const int *perm) {
  fl_tensor v = *t;
  for (int i = 0; i < t->ndim; i++) { v.shape[i] = t->shape[perm[i]]; v.stride[i] = t->stride[perm[i]]; }
  return v;
}

static const void *opt_ptr(const fl_tensor *t) { return t ? (const void *)cu_ptr(t) : NULL; }

static int dev_of(const char *op, const fl_tensor *t, cu_dev **d) { return cu_enter(op, t->storage->device, d); }

/* The frame of a one-kernel element-wise op over t's n elements: nothing to do for n == 0, else
 * launch(tag, d, n) with tag naming t's float type and d its device. BF16: whether the kernel
 * has a bfloat16 form (else bfloat16 is refused with a message naming op). */
template <bool BF16, class F> static int launch_frame(const char *op, const fl_tensor *t, F &&launch) {
  int64_t n = fl_tensor_numel(t);
  if (n == 0) return 0;
  cu_dev *d;
  if (dev_of(op, t, &d)) return -1;
  auto body = [&](auto tag) {
    if (launch(tag, d, n)) return -1;
    return cu_launched(op);
  };
  if constexpr (BF16) return cu_visit_act(op, t->dtype, body);
  else return cu_visit_float(op, t->dtype, body);
}
/* float32 / float64 only */
template <class F> static int float_launch(const char *op, const fl_tensor *t, F &&launch) {
  return launch_frame<false>(op, t, launch);
}
/* float32 / float64 / bfloat16 */
template <class F> static int act_launch(const char *op, const fl_tensor *t, F &&launch) {
  return launch_frame<true>(op, t, launch);
}

/* The dtype of per-channel tensors beside activations of dtype act: float32 for bfloat16, act
 * itself otherwise (the kernels read them as cu_acc_t<T>). */
static fl_dtype param_dtype(fl_dtype act) { return act == FL_BF16 ? FL_F32 : act; }

/* 0 when p is NULL or has param_dtype(act); else a message (a wrong dtype would be misread) */
static int check_param(const char *op, const char *what, const fl_tensor *p, fl_dtype act) {
  if (!p || p->dtype == param_dtype(act)) return 0;
  return fl_fail("%s: %s is %s, expected %s beside %s activations", op, what, fl_dtype_name(p->dtype),
                 fl_dtype_name(param_dtype(act)), fl_dtype_name(act));
}

/* HWIO (R,S,C,K) -> KRSC (K,R,S,C) */
static int to_krsc(const char *op, const fl_tensor *w, cu_tmp &out) {
  int64_t sh[4] = {w->shape[3], w->shape[0], w->shape[1], w->shape[2]};
  if (out.init(op, w->storage->device, w->dtype, 4, sh)) return -1;
  static const int perm[4] = {3, 0, 1, 2};
  fl_tensor src = view_perm(w, perm);
  return cu_copy_dev(op, &out.t, &src);
}

/* depthwise (R,S,C,M) -> (C*M, R, S, 1) */
static int dw_to_krsc(const char *op, const fl_tensor *w, cu_tmp &out) {
  int64_t R = w->shape[0], S = w->shape[1], K = w->shape[2] * w->shape[3];
  int64_t sh[4] = {K, R, S, 1};
  if (out.init(op, w->storage->device, w->dtype, 4, sh)) return -1;
  int64_t rsk[3] = {R, S, K}, krs[3] = {K, R, S};
  fl_tensor wv = view_as(w, 3, rsk);
  static const int perm[3] = {2, 0, 1};
  fl_tensor src = view_perm(&wv, perm);
  fl_tensor dst = view_as(&out.t, 3, krs);
  return cu_copy_dev(op, &dst, &src);
}

static int asymmetric(const fl_window *w) { return w->pt != w->pb || w->pl != w->pr; }

/* the interior (unpadded part) of a padded (N, H+pt+pb, W+pl+pr, C) tensor */
static fl_tensor interior(const fl_tensor *p, const fl_window *win, int64_t H, int64_t W) {
  fl_tensor v = *p;
  v.offset += win->pt * p->stride[1] + win->pl * p->stride[2];
  v.shape[1] = H;
  v.shape[2] = W;
  return v;
}

/* xp = x zero-padded by win's pads; w0 = win without padding */
static int pad_input(const char *op, const fl_tensor *x, const fl_window *win, cu_tmp &xp, fl_window *w0) {
  int64_t sh[4] = {x->shape[0], x->shape[1] + win->pt + win->pb, x->shape[2] + win->pl + win->pr, x->shape[3]};
  if (xp.init(op, x->storage->device, x->dtype, 4, sh)) return -1;
  if (cu_fill_dev(op, &xp.t, 0)) return -1;
  fl_tensor in = interior(&xp.t, win, x->shape[1], x->shape[2]);
  if (cu_copy_dev(op, &in, x)) return -1;
  *w0 = *win;
  w0->pt = w0->pb = w0->pl = w0->pr = 0;
  return 0;
}

/* ---- column sums of (rows, C) data: out[v*C + c] = sum_r f_v(r, c), in double, fixed order ---- */

#define CS_TX 32
#define CS_TY 8

template <int NV, class F> __global__ void colsum_part_kernel(F f, int64_t rows, int64_t C, double *part) {
  __shared__ double sh[NV][CS_TY][CS_TX];
  int tx = threadIdx.x, ty = threadIdx.y;
  int64_t c = (int64_t)blockIdx.x * CS_TX + tx;
  double acc[NV];
#pragma unroll
  for (int v = 0; v < NV; v++) acc[v] = 0;
  if (c < C)
    for (int64_t r = (int64_t)blockIdx.y * CS_TY + ty; r < rows; r += (int64_t)gridDim.y * CS_TY) f(r, c, acc);
#pragma unroll
  for (int v = 0; v < NV; v++) sh[v][ty][tx] = acc[v];
  __syncthreads();
  if (ty == 0 && c < C)
    for (int v = 0; v < NV; v++) {
      double s = 0;
      for (int j = 0; j < CS_TY; j++) s += sh[v][j][tx];
      part[((int64_t)blockIdx.y * NV + v) * C + c] = s;
    }
}

template <int NV> __global__ void colsum_final_kernel(const double *part, int nparts, int64_t C, double *out) {
  int64_t step = (int64_t)gridDim.x * blockDim.x;
  for (int64_t c = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; c < C; c += step)
    for (int v = 0; v < NV; v++) {
      double s = 0;
      for (int b = 0; b < nparts; b++) s += part[((int64_t)b * NV + v) * C + c];
      out[v * C + c] = s;
    }
}

template <int NV, class F> static int colsums(const char *op, cu_dev *d, F f, int64_t rows, int64_t C, double *out) {
  int64_t gx = (C + CS_TX - 1) / CS_TX;
  int64_t gy = (int64_t)d->sm_count * 8 / gx;
  int64_t maxy = (rows + CS_TY - 1) / CS_TY;
  if (gy > maxy) gy = maxy;
  if (gy > 1024) gy = 1024;
  if (gy < 1) gy = 1;
  if (gx > 65535 * 64) return fl_fail("%s: too many channels (%lld)", op, (long long)C);
  cu_buf part;
  if (part.get(op, d->index, (size_t)(gy * NV * C) * sizeof(double))) return -1;
  dim3 grid((unsigned)gx, (unsigned)gy), block(CS_TX, CS_TY);
  colsum_part_kernel<NV, F><<<grid, block, 0, d->stream>>>(f, rows, C, (double *)part.p);
  if (cu_launched(op)) return -1;
  colsum_final_kernel<NV><<<cu_grid(d, C, CU_THREADS), CU_THREADS, 0, d->stream>>>((const double *)part.p, (int)gy,
                                                                                    C, out);
  return cu_launched(op);
}

template <class T> struct sum_f {
  const T *x;
  int64_t C;
  __device__ void operator()(int64_t r, int64_t c, double *acc) const { acc[0] += (double)cu_load(x[r * C + c]); }
};

/* out (C) = beta*out + column sums of g (rows, C); P: out's type (float32 beside bfloat16 g) */
template <class P> __global__ void acc_into_kernel(P *out, const double *s, int64_t C, double beta) {
  int64_t step = (int64_t)gridDim.x * blockDim.x;
  for (int64_t c = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; c < C; c += step)
    out[c] = (P)((beta == 0 ? 0.0 : beta * (double)out[c]) + s[c]);
}

template <class T> static int colsum_into(const char *op, cu_dev *d, cu_acc_t<T> *out, const T *g, int64_t rows,
                                          int64_t C, double beta) {
  cu_buf s;
  if (s.get(op, d->index, (size_t)C * sizeof(double))) return -1;
  if (colsums<1>(op, d, sum_f<T>{g, C}, rows, C, (double *)s.p)) return -1;
  acc_into_kernel<cu_acc_t<T>><<<cu_grid(d, C, CU_THREADS), CU_THREADS, 0, d->stream>>>(out, (const double *)s.p,
                                                                                          C, beta);
  return cu_launched(op);
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

static int affine_run(const char *op, fl_tensor *y, const fl_tensor *x, const fl_tensor *scale,
                      const fl_tensor *shift, int relu) {
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

static int nn_channel_affine(fl_tensor *y, const fl_tensor *x, const fl_tensor *scale, const fl_tensor *shift,
                             int relu) {
  return affine_run("cuda channel_affine", y, x, scale, shift, relu);
}

/* ---------------------------------------------------------------- convolutions */

static int conv_fwd_common(const char *op, fl_tensor *y, const fl_tensor *x, const fl_tensor *wk, int groups,
                           const fl_tensor *scale, const fl_tensor *shift, int relu, const fl_window *win) {
  if (asymmetric(win)) {
    cu_tmp xp;
    fl_window w0;
    if (pad_input(op, x, win, xp, &w0) || cu_conv_forward(op, y, &xp.t, wk, groups, &w0)) return -1;
  } else if (cu_conv_forward(op, y, x, wk, groups, win)) {
    return -1;
  }
  return affine_run(op, y, y, scale, shift, relu);
}

static int conv_bwd_data_common(const char *op, fl_tensor *gx, const fl_tensor *gy, const fl_tensor *wk, int groups,
                                const fl_window *win) {
  if (!asymmetric(win)) return cu_conv_backward_data(op, gx, gy, wk, groups, win);
  cu_tmp gp;
  int64_t sh[4] = {gx->shape[0], gx->shape[1] + win->pt + win->pb, gx->shape[2] + win->pl + win->pr, gx->shape[3]};
  if (gp.init(op, gx->storage->device, gx->dtype, 4, sh)) return -1;
  fl_window w0 = *win;
  w0.pt = w0.pb = w0.pl = w0.pr = 0;
  if (cu_conv_backward_data(op, &gp.t, gy, wk, groups, &w0)) return -1;
  fl_tensor in = interior(&gp.t, win, gx->shape[1], gx->shape[2]);
  return cu_copy_dev(op, gx, &in);
}

/* dw in KRSC (into a temporary), then gb (when wanted) */
static int conv_bwd_filter_common(const char *op, cu_tmp &dw, const int64_t *krsc, fl_tensor *gb, const fl_tensor *x,
                                  const fl_tensor *gy, int groups, const fl_window *win, double beta) {
  if (check_param(op, "bias gradient", gb, gy->dtype)) return -1;
  if (dw.init(op, x->storage->device, x->dtype, 4, krsc)) return -1;
  if (asymmetric(win)) {
    cu_tmp xp;
    fl_window w0;
    if (pad_input(op, x, win, xp, &w0) || cu_conv_backward_filter(op, &dw.t, &xp.t, gy, groups, &w0)) return -1;
  } else if (cu_conv_backward_filter(op, &dw.t, x, gy, groups, win)) {
    return -1;
  }
  if (!gb) return 0;
  cu_dev *d;
  if (dev_of(op, gy, &d)) return -1;
  int64_t F = gy->shape[3], rows = fl_tensor_numel(gy) / (F ? F : 1);
  return cu_visit_act(op, gy->dtype, [&](auto tag) {
    typedef typename decltype(tag)::type T;
    return colsum_into<T>(op, d, (cu_acc_t<T> *)cu_ptr(gb), (const T *)cu_ptr(gy), rows, F, beta);
  });
}

static int nn_conv2d_forward(fl_tensor *y, const fl_tensor *x, const fl_tensor *w, const fl_tensor *scale,
                             const fl_tensor *shift, int relu, const fl_window *win) {
  const char *op = "cuda conv2d_forward";
  cu_tmp wk;
  if (to_krsc(op, w, wk)) return -1;
  return conv_fwd_common(op, y, x, &wk.t, 1, scale, shift, relu, win);
}

static int nn_conv2d_backward_data(fl_tensor *gx, const fl_tensor *gy, const fl_tensor *w, const fl_window *win) {
  const char *op = "cuda conv2d_backward_data";
  cu_tmp wk;
  if (to_krsc(op, w, wk)) return -1;
  return conv_bwd_data_common(op, gx, gy, &wk.t, 1, win);
}

static int nn_conv2d_backward_filter(fl_tensor *gw, fl_tensor *gb, const fl_tensor *x, const fl_tensor *gy,
                                     const fl_window *win, double beta) {
  const char *op = "cuda conv2d_backward_filter";
  int64_t krsc[4] = {gw->shape[3], gw->shape[0], gw->shape[1], gw->shape[2]};
  cu_tmp dw;
  if (conv_bwd_filter_common(op, dw, krsc, gb, x, gy, 1, win, beta)) return -1;
  /* gw (R,S,C,K) = beta*gw + dw seen as (R,S,C,K) */
  static const int perm[4] = {1, 2, 3, 0};
  fl_tensor src = view_perm(&dw.t, perm);
  return cu_axpby(op, gw, beta, &src, 1.0);
}

static int nn_depthwise_forward(fl_tensor *y, const fl_tensor *x, const fl_tensor *w, const fl_tensor *scale,
                                const fl_tensor *shift, int relu, const fl_window *win) {
  const char *op = "cuda depthwise_forward";
  cu_tmp wk;
  if (dw_to_krsc(op, w, wk)) return -1;
  return conv_fwd_common(op, y, x, &wk.t, (int)x->shape[3], scale, shift, relu, win);
}

static int nn_depthwise_backward_data(fl_tensor *gx, const fl_tensor *gy, const fl_tensor *w, const fl_window *win) {
  const char *op = "cuda depthwise_backward_data";
  cu_tmp wk;
  if (dw_to_krsc(op, w, wk)) return -1;
  return conv_bwd_data_common(op, gx, gy, &wk.t, (int)gx->shape[3], win);
}

static int nn_depthwise_backward_filter(fl_tensor *gw, fl_tensor *gb, const fl_tensor *x, const fl_tensor *gy,
                                        const fl_window *win, double beta) {
  const char *op = "cuda depthwise_backward_filter";
  int64_t R = gw->shape[0], S = gw->shape[1], K = gw->shape[2] * gw->shape[3];
  int64_t krsc[4] = {K, R, S, 1};
  cu_tmp dw;
  if (conv_bwd_filter_common(op, dw, krsc, gb, x, gy, (int)x->shape[3], win, beta)) return -1;
  /* gw (R,S,C,M) seen as (R,S,K) = beta*gw + dw (K,R,S) permuted to (R,S,K) */
  int64_t rsk[3] = {R, S, K}, krs[3] = {K, R, S};
  fl_tensor g3 = view_as(gw, 3, rsk), d3 = view_as(&dw.t, 3, krs);
  static const int perm[3] = {1, 2, 0};
  fl_tensor src = view_perm(&d3, perm);
  return cu_axpby(op, &g3, beta, &src, 1.0);
}

/* ---------------------------------------------------------------- pooling */

typedef struct {
  int64_t N, H, W, C, OH, OW;
  int kh, kw, sh, sw, dh, dw, pt, pl;
} pool_dims;

/* x: the input or anything of its shape (gx for the backward pass) */
static pool_dims pool_dims_of(const fl_tensor *x, const fl_tensor *y, const fl_window *win) {
  pool_dims p = {x->shape[0], x->shape[1], x->shape[2], x->shape[3], y->shape[1], y->shape[2],
                 win->kh, win->kw, win->sh, win->sw, win->dh, win->dw, win->pt, win->pl};
  return p;
}

/* y[n,oh,ow,c]: max (padding ignored) or mean over the in-bounds window elements; amax (max pooling,
 * optional): offset (h*W + w)*C + c within the image of the window's first maximum, as on the CPU.
 * I: the index type (cu_visit_index). */
template <class T, class I> __global__ void pool_fwd_kernel(T *y, int32_t *amax, const T *x, pool_dims p, int is_max) {
  typedef cu_acc_t<T> A;
  const I C = (I)p.C, H = (I)p.H, W = (I)p.W, OH = (I)p.OH, OW = (I)p.OW;
  const I total = (I)p.N * OH * OW * C, step = (I)gridDim.x * blockDim.x;
  for (I i = (I)blockIdx.x * blockDim.x + threadIdx.x; i < total; i += step) {
    I c = i % C, q = i / C, ow = q % OW, q2 = q / OW, oh = q2 % OH, n = q2 / OH;
    A acc = is_max ? -(A)INFINITY : (A)0;
    int count = 0;
    I best = -1;
    for (int a = 0; a < p.kh; a++) {
      I ih = oh * p.sh - p.pt + a * p.dh;
      if (ih < 0 || ih >= H) continue;
      for (int b = 0; b < p.kw; b++) {
        I iw = ow * p.sw - p.pl + b * p.dw;
        if (iw < 0 || iw >= W) continue;
        A v = cu_load(x[((n * H + ih) * W + iw) * C + c]);
        count++;
        if (is_max) {
          if (v > acc || best < 0) { acc = v > acc ? v : acc; best = (ih * W + iw) * C + c; }
        } else {
          acc = add_rn(acc, v);
        }
      }
    }
    if (!is_max) acc = mul_rn(acc, (A)1 / (A)(count > 0 ? count : 1));
    y[i] = cu_store<T>(acc);
    if (amax) amax[i] = (int32_t)(best < 0 ? 0 : best);
  }
}

/* Gather form of the backward pass (no atomics, deterministic): each input element sums the
 * gradients of the outputs whose window covers it -- for max pooling only of those whose first
 * maximum (row-major window order, as on the CPU) it is; outputs are visited in row-major order,
 * the CPU's order of accumulation. */
template <class T, class I> __global__ void pool_bwd_kernel(T *gx, const T *gy, const T *x, const int32_t *amax,
                                                            pool_dims p, int is_max) {
  typedef cu_acc_t<T> A;
  const I C = (I)p.C, H = (I)p.H, W = (I)p.W, OH = (I)p.OH, OW = (I)p.OW;
  const I total = (I)p.N * H * W * C, step = (I)gridDim.x * blockDim.x;
  for (I i = (I)blockIdx.x * blockDim.x + threadIdx.x; i < total; i += step) {
    I c = i % C, q = i / C, iw = q % W, q2 = q / W, ih = q2 % H, n = q2 / H;
    A acc = 0;
    /* outputs oh with oh*sh - pt + a*dh == ih for some 0 <= a < kh */
    I th = ih + p.pt, tw = iw + p.pl;
    I oh0 = th - (I)(p.kh - 1) * p.dh;
    oh0 = oh0 <= 0 ? 0 : (oh0 + p.sh - 1) / p.sh;
    I oh1 = th / p.sh < OH - 1 ? th / p.sh : OH - 1;
    I ow0 = tw - (I)(p.kw - 1) * p.dw;
    ow0 = ow0 <= 0 ? 0 : (ow0 + p.sw - 1) / p.sw;
    I ow1 = tw / p.sw < OW - 1 ? tw / p.sw : OW - 1;
    const I self = (ih * W + iw) * C + c;
    for (I oh = oh0; oh <= oh1; oh++) {
      /* the bounds above keep 0 <= da < kh for dense windows: the divisions are for dilated ones */
      I da = th - oh * p.sh;
      if (p.dh != 1 && (da < 0 || da % p.dh || da / p.dh >= p.kh)) continue;
      for (I ow = ow0; ow <= ow1; ow++) {
        I db = tw - ow * p.sw;
        if (p.dw != 1 && (db < 0 || db % p.dw || db / p.dw >= p.kw)) continue;
        I o = ((n * OH + oh) * OW + ow) * C + c;
        A g = cu_load(gy[o]);
        if (is_max && amax) {
          if (amax[o] == self) acc = add_rn(acc, g);
        } else if (is_max) {
          /* first maximum of this window: the first in-bounds element, replaced only by a greater one */
          I best = -1;
          A bv = -(A)INFINITY;
          for (int a = 0; a < p.kh; a++) {
            I h2 = oh * p.sh - p.pt + a * p.dh;
            if (h2 < 0 || h2 >= H) continue;
            for (int b = 0; b < p.kw; b++) {
              I w2 = ow * p.sw - p.pl + b * p.dw;
              if (w2 < 0 || w2 >= W) continue;
              A v = cu_load(x[((n * H + h2) * W + w2) * C + c]);
              if (v > bv || best < 0) { bv = v; best = h2 * W + w2; }
            }
          }
          if (best == ih * W + iw) acc = add_rn(acc, g);
        } else {
          int count = 0;
          for (int a = 0; a < p.kh; a++) {
            I h2 = oh * p.sh - p.pt + a * p.dh;
            if (h2 < 0 || h2 >= H) continue;
            for (int b = 0; b < p.kw; b++) {
              I w2 = ow * p.sw - p.pl + b * p.dw;
              if (w2 >= 0 && w2 < W) count++;
            }
          }
          if (count > 0) acc = add_rn(acc, mul_rn(g, (A)1 / (A)count));
        }
      }
    }
    gx[i] = cu_store<T>(acc);
  }
}

static int nn_pool2d_forward(fl_tensor *y, fl_tensor *argmax, const fl_tensor *x, fl_pool_kind kind,
                             const fl_window *win) {
  const char *op = "cuda pool2d_forward";
  int64_t nx = fl_tensor_numel(x);
  pool_dims p = pool_dims_of(x, y, win);
  return act_launch(op, y, [&](auto tag, cu_dev *d, int64_t n) {
    typedef typename decltype(tag)::type T;
    return cu_visit_index(n > nx ? n : nx, [&](auto itag) {
      pool_fwd_kernel<T, decltype(itag)><<<cu_grid(d, n, CU_THREADS), CU_THREADS, 0, d->stream>>>(
          (T *)cu_ptr(y), argmax ? (int32_t *)cu_ptr(argmax) : NULL, (const T *)cu_ptr(x), p, kind == FL_POOL_MAX);
      return 0;
    });
  });
}

static int nn_pool2d_backward(fl_tensor *gx, const fl_tensor *gy, const fl_tensor *x, const fl_tensor *argmax,
                              fl_pool_kind kind, const fl_window *win) {
  const char *op = "cuda pool2d_backward";
  int64_t ny = fl_tensor_numel(gy);
  if (kind == FL_POOL_MAX && !x && !argmax) return fl_fail("%s: max pooling needs the input or its argmax", op);
  pool_dims p = pool_dims_of(gx, gy, win);
  return act_launch(op, gx, [&](auto tag, cu_dev *d, int64_t n) {
    typedef typename decltype(tag)::type T;
    return cu_visit_index(n > ny ? n : ny, [&](auto itag) {
      pool_bwd_kernel<T, decltype(itag)><<<cu_grid(d, n, CU_THREADS), CU_THREADS, 0, d->stream>>>(
          (T *)cu_ptr(gx), (const T *)cu_ptr(gy), x ? (const T *)cu_ptr(x) : NULL,
          argmax ? (const int32_t *)cu_ptr(argmax) : NULL, p, kind == FL_POOL_MAX);
      return 0;
    });
  });
}

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

static int nn_batchnorm_forward_train(fl_tensor *y, fl_tensor *mean, fl_tensor *invstd, const fl_tensor *x,
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

static int nn_batchnorm_backward(fl_tensor *gx, fl_tensor *ggamma, fl_tensor *gbeta, const fl_tensor *x,
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

static int nn_act_backward(fl_act_kind act, fl_tensor *gx, const fl_tensor *gy, const fl_tensor *y) {
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

static int nn_softmax_xent(fl_tensor *loss, fl_tensor *grad, const fl_tensor *logits, const fl_tensor *target,
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

/* ---------------------------------------------------------------- optimizer kernels */

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

static int nn_add_act(fl_tensor *y, const fl_tensor *a, const fl_tensor *b, double scale, int relu) {
  return act_launch("cuda add_act", y, [&](auto tag, cu_dev *d, int64_t n) {
    typedef typename decltype(tag)::type T;
    add_act_kernel<T><<<cu_grid(d, n, CU_THREADS), CU_THREADS, 0, d->stream>>>(
        (T *)cu_ptr(y), (const T *)cu_ptr(a), (const T *)cu_ptr(b), n, (cu_acc_t<T>)scale, relu);
    return 0;
  });
}

/* y = a*x + b*y, exactly the CPU's expression (NaN in y propagates even when b == 0) */
template <class T> __global__ void axpby_kernel(T *y, const T *x, int64_t n, T a, T b) {
  int64_t step = (int64_t)gridDim.x * blockDim.x;
  for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += step)
    y[i] = add_rn(mul_rn(a, x[i]), mul_rn(b, y[i]));
}

static int nn_axpby(fl_tensor *y, double a, const fl_tensor *x, double b) {
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
static int nn_sumsq(const fl_tensor *x, double *out) {
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

static int nn_sgd_step(fl_tensor *w, const fl_tensor *g, fl_tensor *m, double lr, double momentum, int nesterov) {
  fl_tensor *mm[1] = {m};
  return fl_cuda_sgd_step_multi(1, &w, &g, m ? mm : NULL, lr, momentum, nesterov);
}

static int nn_adam_step(fl_tensor *w, const fl_tensor *g, fl_tensor *m, fl_tensor *v, double alpha, double beta1,
                        double beta2, double eps) {
  return fl_cuda_adam_step_multi(1, &w, &g, &m, &v, alpha, beta1, beta2, eps);
}

/* ---------------------------------------------------------------- the table */

static struct fl_nn_ops make_nn(void) {
  struct fl_nn_ops t;
  memset(&t, 0, sizeof t);
  t.conv2d_forward = nn_conv2d_forward;
  t.conv2d_backward_data = nn_conv2d_backward_data;
  t.conv2d_backward_filter = nn_conv2d_backward_filter;
  t.depthwise_forward = nn_depthwise_forward;
  t.depthwise_backward_data = nn_depthwise_backward_data;
  t.depthwise_backward_filter = nn_depthwise_backward_filter;
  t.pool2d_forward = nn_pool2d_forward;
  t.pool2d_backward = nn_pool2d_backward;
  t.batchnorm_forward_train = nn_batchnorm_forward_train;
  t.batchnorm_backward = nn_batchnorm_backward;
  t.channel_affine = nn_channel_affine;
  t.act_backward = nn_act_backward;
  t.softmax_xent = nn_softmax_xent;
  t.add_act = nn_add_act;
  t.axpby = nn_axpby;
  t.sumsq = nn_sumsq;
  t.sgd_step = nn_sgd_step;
  t.adam_step = nn_adam_step;
  return t;
}

const struct fl_nn_ops *cu_nn_table(void) {
  static const struct fl_nn_ops table = make_nn();
  return &table;
}
