/* The CUDA backend's convolution kernels (struct fl_nn_ops): Conv2D and DepthwiseConv2D go to cuDNN
 * (conv_cudnn.cu) after turning Keras's kernels into cuDNN's KRSC layout: HWIO (R,S,C,K) ->
 * (K,R,S,C), depthwise (R,S,C,M) -> (C*M,R,S,1) as a convolution with C groups. Asymmetric 'same'
 * padding (TensorFlow puts the odd pixel at the bottom/right) goes through an explicitly padded copy
 * so cuDNN only sees symmetric problems. The bias gradient is a deterministic column sum. */
#include "nn_cuda.h"

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

int nn_conv2d_forward(fl_tensor *y, const fl_tensor *x, const fl_tensor *w, const fl_tensor *scale,
                      const fl_tensor *shift, int relu, const fl_window *win) {
  const char *op = "cuda conv2d_forward";
  cu_tmp wk;
  if (to_krsc(op, w, wk)) return -1;
  return conv_fwd_common(op, y, x, &wk.t, 1, scale, shift, relu, win);
}

int nn_conv2d_backward_data(fl_tensor *gx, const fl_tensor *gy, const fl_tensor *w, const fl_window *win) {
  const char *op = "cuda conv2d_backward_data";
  cu_tmp wk;
  if (to_krsc(op, w, wk)) return -1;
  return conv_bwd_data_common(op, gx, gy, &wk.t, 1, win);
}

int nn_conv2d_backward_filter(fl_tensor *gw, fl_tensor *gb, const fl_tensor *x, const fl_tensor *gy,
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

int nn_depthwise_forward(fl_tensor *y, const fl_tensor *x, const fl_tensor *w, const fl_tensor *scale,
                         const fl_tensor *shift, int relu, const fl_window *win) {
  const char *op = "cuda depthwise_forward";
  cu_tmp wk;
  if (dw_to_krsc(op, w, wk)) return -1;
  return conv_fwd_common(op, y, x, &wk.t, (int)x->shape[3], scale, shift, relu, win);
}

int nn_depthwise_backward_data(fl_tensor *gx, const fl_tensor *gy, const fl_tensor *w, const fl_window *win) {
  const char *op = "cuda depthwise_backward_data";
  cu_tmp wk;
  if (dw_to_krsc(op, w, wk)) return -1;
  return conv_bwd_data_common(op, gx, gy, &wk.t, (int)gx->shape[3], win);
}

int nn_depthwise_backward_filter(fl_tensor *gw, fl_tensor *gb, const fl_tensor *x, const fl_tensor *gy,
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
