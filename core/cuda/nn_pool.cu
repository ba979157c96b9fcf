/* The CUDA backend's pooling kernels (struct fl_nn_ops): max and average pooling over windows of
 * NHWC activations, forward (with the argmax of max pooling) and backward, as core/cpu/nn_pool.c. */
#include "nn_cuda.h"

/* ---------------------------------------------------------------- pooling */

typedef struct {
  int64_t N, H, W, C, OH, OW;
  int kh, kw, sh, sw, dh, dw, pt, pl;
} pool_dims;

/* x: the input or anything of its shape (gx for the backward pass) */
/* For each tap (a, b) of the window of p at output (oh, ow) that lands inside the H x W input, with
 * (ih, iw) its input position of index type I: CU_FOR_TAPS(...) { ... }, as core/cpu/nn_cpu.h's
 * FOR_TAPS. The inner `for`s over ih and iw run at most once (the bounds check). */
#define CU_FOR_TAPS(p, I, oh, ow, H, W, ih, iw)                                         \
  for (int a = 0; a < (p).kh; a++)                                                       \
    for (I ih = (oh) * (p).sh - (p).pt + a * (p).dh; ih >= 0 && ih < (H); ih = -1)      \
      for (int b = 0; b < (p).kw; b++)                                                   \
        for (I iw = (ow) * (p).sw - (p).pl + b * (p).dw; iw >= 0 && iw < (W); iw = -1)

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
    CU_FOR_TAPS(p, I, oh, ow, H, W, ih, iw) {
      A v = cu_load(x[((n * H + ih) * W + iw) * C + c]);
      count++;
      if (is_max) {
        if (v > acc || best < 0) { acc = v > acc ? v : acc; best = (ih * W + iw) * C + c; }
      } else {
        acc = add_rn(acc, v);
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
          CU_FOR_TAPS(p, I, oh, ow, H, W, h2, w2) {
            A v = cu_load(x[((n * H + h2) * W + w2) * C + c]);
            if (v > bv || best < 0) { bv = v; best = h2 * W + w2; }
          }
          if (best == ih * W + iw) acc = add_rn(acc, g);
        } else {
          int count = 0;
          CU_FOR_TAPS(p, I, oh, ow, H, W, h2, w2) count++;
          if (count > 0) acc = add_rn(acc, mul_rn(g, (A)1 / (A)count));
        }
      }
    }
    gx[i] = cu_store<T>(acc);
  }
}

int nn_pool2d_forward(fl_tensor *y, fl_tensor *argmax, const fl_tensor *x, fl_pool_kind kind,
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

int nn_pool2d_backward(fl_tensor *gx, const fl_tensor *gy, const fl_tensor *x, const fl_tensor *argmax,
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
