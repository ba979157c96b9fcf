/* The CPU backend's nn kernels (struct fl_nn_ops): float32 and float64 versions of the generic code
 * in nn_cpu_impl.h, and a dtype dispatcher per kernel. Our convolutions are GEMMs on NHWC through
 * OpenBLAS: 1x1 stride-1 convolutions use the activations directly as the GEMM's left matrix;
 * others go through im2col in chunks of output rows, so the column buffer stays a few MB (reused,
 * per thread) whatever the batch size. Most float32 convolutions go to oneDNN instead (conv_dnnl.c),
 * which measured faster; the dispatchers at the end say which. (A Winograd F(2x2,3x3) path lived
 * here too, off by default because it measured 1.2-1.8x slower than im2col + sgemm; oneDNN's direct
 * kernels are faster than both, so it went.) */
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <omp.h>
#include <cblas.h>
#include "nn.h"
#include "ops.h"
#include "cpu.h"

/* elements per im2col chunk (about 4 MB of float32); tests shrink it to exercise chunk edges */
static int64_t nn_chunk = (int64_t)1 << 20;
#define FL_NN_CHUNK nn_chunk

void fl_nn_cpu_set_chunk(int64_t elements) { nn_chunk = elements > 0 ? elements : ((int64_t)1 << 20); }

/* Per-thread scratch buffers that only grow (slots: 0 im2col columns, 1 partial gradients):
 * convolutions reuse them instead of allocating per call. OpenMP's worker threads persist, so each
 * keeps its buffers across calls. */
static _Thread_local void *scratch_ptr[2];
static _Thread_local size_t scratch_cap[2];

static void *fl_cpu_nn_scratch(int slot, size_t nbytes) {
  if (nbytes <= scratch_cap[slot]) return scratch_ptr[slot];
  void *p = NULL;
  size_t cap = nbytes + nbytes / 4;
  if (posix_memalign(&p, 64, cap) != 0) return NULL;
  free(scratch_ptr[slot]);
  scratch_ptr[slot] = p;
  scratch_cap[slot] = cap;
  return p;
}

/* Threads for a convolution of `macs` multiply-adds: one below ~1 MMAC, where a fork costs more
 * than it saves. */
static int nn_threads(int64_t macs) {
  int nt = fl_get_num_threads();
  if (nt < 1) nt = 1;
  return macs < ((int64_t)1 << 20) ? 1 : nt;
}

/* Rows per block of a 1x1 convolution's GEMM: about four blocks per thread, taken dynamically so a
 * thread slowed by other processes does not hold the rest back (rows are independent, so the
 * result does not depend on who computes what); at least 256 rows to keep each GEMM efficient. */
static int64_t pointwise_block(int64_t m, int nt) {
  int64_t per = (m + 4 * nt - 1) / (4 * nt);
  return per < 256 ? (m < 256 ? (m > 0 ? m : 1) : 256) : per;
}

/* While our own threads each run a GEMM, OpenBLAS must run single-threaded in each of them. */
static void blas_single_begin(int nt) { if (nt > 1) openblas_set_num_threads(1); }
static void blas_single_end(int nt) { if (nt > 1) openblas_set_num_threads(fl_get_num_threads()); }

/* A 1x1, stride 1, unpadded convolution is a plain GEMM on NHWC: no im2col needed. */
static int win_is_pointwise(const fl_window *w) {
  return w->kh == 1 && w->kw == 1 && w->sh == 1 && w->sw == 1 && w->pt == 0 && w->pb == 0 && w->pl == 0 &&
         w->pr == 0;
}

/* inner loops over channels: no loop-carried dependences, vectorise them (GCC's -O2 would not,
 * for lack of a proof that outputs and inputs do not alias) */
#define SIMD _Pragma("omp simd")

#define real float
#define NN(name) name##_f32
#define GEMM cblas_sgemm
#include "nn_cpu_impl.h"
#undef real
#undef NN
#undef GEMM

#define real double
#define NN(name) name##_f64
#define GEMM cblas_dgemm
#include "nn_cpu_impl.h"
#undef real
#undef NN
#undef GEMM

/* Each entry picks the float32 or float64 kernel from its first tensor argument's dtype (the front
 * has already checked that all of them agree). */
#define PICK(t, name, ...) ((t)->dtype == FL_F64 ? name##_f64(__VA_ARGS__) : name##_f32(__VA_ARGS__))

/* bfloat16 activations (the mixed-precision kernels of nn.h): the entry calls itself again on float32
 * stand-ins, and outputs are rounded back once (core/cpu/bf16.c). Parameters and statistics are
 * float32 already and pass through as they are. */
#define BF16_BEGIN cpu_bf16_call c; cpu_bf16_begin(&c)
#define IN(t) cpu_bf16_arg(&c, t, 1, 0)
#define OUT(t) cpu_bf16_arg(&c, t, 0, 1)
#define BF16_END(call) return cpu_bf16_end(&c, c.rc ? -1 : (call))

/* ---- which engine runs a float32 convolution ----
 * oneDNN (core/cpu/conv_dnnl.c) or the GEMM kernels above, by what measured faster on this project's
 * 2-core AMD EPYC (AVX-512; oneDNN picks its brgconv kernels) with 2 threads at batch 8, on
 * ResNet50's and InceptionV3's shapes (ms per call, best of interleaved runs, ours / oneDNN; the
 * machine was shared, so the CPU time per call was compared too; tests/bench/layers.lua prints
 * the current numbers):
 *   forward: oneDNN everywhere: 3x3 1.25-1.4x (res3 128 at 28x28: 10.8 / 7.8), 1x1 1.05-1.3x, the
 *     7x7/2 stem 1.4x (12.1 / 8.6), InceptionV3's 1x7 / 7x1 1.2x; the fused BN+ReLU epilogue rides
 *     along as post-ops at no cost. Its worst: 1x1/2 512->1024 at 28x28, 0.86x; a tie on 3x3/2
 *     valid 192->320 at 17x17. Depthwise 1.6-2.8x (our loop is not blocked for the cache).
 *   backward data: oneDNN (1.1-1.7x) from 16 input channels; below, i.e. the RGB stem (7x7/2 3->64
 *     at 224: 21.5 / 44.0), ours: oneDNN has no blocked kernel for 3 channels.
 *   backward filter: oneDNN for spatial kernels from 64 input channels (3x3 1.15-1.45x, 1x7 1.25x)
 *     and 1x1 from 256 (1.05-1.3x); ours for 1x1 below 256 input channels (56x56 64->256: 5.8 /
 *     6.4, oneDNN's CPU time up to 1.3x ours) and spatial kernels below 64 (InceptionV3's 3x3/2
 *     32->32 at 149: 6.0 / 7.0). Depthwise always oneDNN (1.1-2.4x). The bias gradient is our
 *     column sum either way (oneDNN's fused one cost up to 1.7 ms more per call).
 * float64 (gradient checks) always runs our kernels: oneDNN has no float64 convolution. */
static fl_conv_engine conv_engine = FL_CONV_AUTO;
void fl_nn_cpu_set_conv_engine(fl_conv_engine e) { conv_engine = e; }

enum { CONV_FWD, CONV_BWD_DATA, CONV_BWD_FILTER };

/* 1 if this convolution goes to oneDNN. x (N,H,W,C), y (N,OH,OW,F). */
static int conv_by_dnnl(int op, int depthwise, const fl_tensor *x, const fl_tensor *y, const fl_tensor *w) {
  if (conv_engine == FL_CONV_OWN || x->dtype != FL_F32) return 0;
  if (fl_tensor_numel(x) == 0 || fl_tensor_numel(y) == 0 || fl_tensor_numel(w) == 0) return 0;
  if (conv_engine == FL_CONV_ONEDNN || depthwise) return 1;
  int64_t c = x->shape[3];
  int pointwise = w->shape[0] == 1 && w->shape[1] == 1;
  if (op == CONV_BWD_DATA) return c >= 16;
  if (op == CONV_BWD_FILTER) return c >= (pointwise ? 256 : 64);
  return 1;
}

/* oneDNN's result when it took the call, else ours */
#define ROUTE(call_dnnl, call_own) do { \
    int rc_ = (call_dnnl); \
    return rc_ <= 0 ? rc_ : (call_own); \
  } while (0)

/* gb (F) = beta*gb + sum of gy (N,OH,OW,F) over all but the channels (float32) */
static int bias_grad(fl_tensor *gb, const fl_tensor *gy, double beta) {
  int64_t f = gy->shape[3];
  return colsum_f32(fl_tensor_data(gb), fl_tensor_data(gy), fl_tensor_numel(gy) / f, f, beta);
}

static int cpu_conv2d_forward(fl_tensor *y, const fl_tensor *x, const fl_tensor *w, const fl_tensor *scale,
                              const fl_tensor *shift, int relu, const fl_window *win) {
  if (x->dtype == FL_BF16) {
    BF16_BEGIN;
    fl_tensor *y2 = OUT(y), *x2 = IN(x), *w2 = IN(w);
    BF16_END(cpu_conv2d_forward(y2, x2, w2, scale, shift, relu, win));
  }
  if (conv_by_dnnl(CONV_FWD, 0, x, y, w))
    ROUTE(cpu_dnnl_conv_forward(y, x, w, scale, shift, relu, win, 0),
          conv2d_forward_f32(y, x, w, scale, shift, relu, win));
  return PICK(x, conv2d_forward, y, x, w, scale, shift, relu, win);
}
static int cpu_conv2d_backward_data(fl_tensor *gx, const fl_tensor *gy, const fl_tensor *w, const fl_window *win) {
  if (gy->dtype == FL_BF16) {
    BF16_BEGIN;
    fl_tensor *gx2 = OUT(gx), *gy2 = IN(gy), *w2 = IN(w);
    BF16_END(cpu_conv2d_backward_data(gx2, gy2, w2, win));
  }
  if (conv_by_dnnl(CONV_BWD_DATA, 0, gx, gy, w))
    ROUTE(cpu_dnnl_conv_backward_data(gx, gy, w, win, 0), conv2d_backward_data_f32(gx, gy, w, win));
  return PICK(gy, conv2d_backward_data, gx, gy, w, win);
}
typedef int (*filter_fn)(fl_tensor *, fl_tensor *, const fl_tensor *, const fl_tensor *, const fl_window *, double);

/* oneDNN's weight gradient with our bias column sum (its fused one measured slower); `own` when
 * oneDNN declines the problem (rc > 0) */
static int dnnl_backward_filter(int depthwise, filter_fn own, fl_tensor *gw, fl_tensor *gb, const fl_tensor *x,
                                const fl_tensor *gy, const fl_window *win, double beta) {
  int rc = cpu_dnnl_conv_backward_filter(gw, x, gy, win, beta, depthwise);
  if (rc == 0 && gb) rc = bias_grad(gb, gy, beta);
  if (rc <= 0) return rc;
  return own(gw, gb, x, gy, win, beta);
}

static int cpu_conv2d_backward_filter(fl_tensor *gw, fl_tensor *gb, const fl_tensor *x, const fl_tensor *gy,
                                      const fl_window *win, double beta) {
  if (x->dtype == FL_BF16) {
    BF16_BEGIN;
    fl_tensor *gw2 = cpu_bf16_arg(&c, gw, beta != 0, 1), *x2 = IN(x), *gy2 = IN(gy);
    BF16_END(cpu_conv2d_backward_filter(gw2, gb, x2, gy2, win, beta));
  }
  if (conv_by_dnnl(CONV_BWD_FILTER, 0, x, gy, gw))
    return dnnl_backward_filter(0, conv2d_backward_filter_f32, gw, gb, x, gy, win, beta);
  return PICK(x, conv2d_backward_filter, gw, gb, x, gy, win, beta);
}
static int cpu_depthwise_forward(fl_tensor *y, const fl_tensor *x, const fl_tensor *w, const fl_tensor *scale,
                                 const fl_tensor *shift, int relu, const fl_window *win) {
  if (x->dtype == FL_BF16) {
    BF16_BEGIN;
    fl_tensor *y2 = OUT(y), *x2 = IN(x), *w2 = IN(w);
    BF16_END(cpu_depthwise_forward(y2, x2, w2, scale, shift, relu, win));
  }
  if (conv_by_dnnl(CONV_FWD, 1, x, y, w))
    ROUTE(cpu_dnnl_conv_forward(y, x, w, scale, shift, relu, win, 1),
          depthwise_forward_f32(y, x, w, scale, shift, relu, win));
  return PICK(x, depthwise_forward, y, x, w, scale, shift, relu, win);
}
static int cpu_depthwise_backward_data(fl_tensor *gx, const fl_tensor *gy, const fl_tensor *w,
                                       const fl_window *win) {
  if (gy->dtype == FL_BF16) {
    BF16_BEGIN;
    fl_tensor *gx2 = OUT(gx), *gy2 = IN(gy), *w2 = IN(w);
    BF16_END(cpu_depthwise_backward_data(gx2, gy2, w2, win));
  }
  if (conv_by_dnnl(CONV_BWD_DATA, 1, gx, gy, w))
    ROUTE(cpu_dnnl_conv_backward_data(gx, gy, w, win, 1), depthwise_backward_data_f32(gx, gy, w, win));
  return PICK(gy, depthwise_backward_data, gx, gy, w, win);
}
static int cpu_depthwise_backward_filter(fl_tensor *gw, fl_tensor *gb, const fl_tensor *x, const fl_tensor *gy,
                                         const fl_window *win, double beta) {
  if (x->dtype == FL_BF16) {
    BF16_BEGIN;
    fl_tensor *gw2 = cpu_bf16_arg(&c, gw, beta != 0, 1), *x2 = IN(x), *gy2 = IN(gy);
    BF16_END(cpu_depthwise_backward_filter(gw2, gb, x2, gy2, win, beta));
  }
  if (conv_by_dnnl(CONV_BWD_FILTER, 1, x, gy, gw))
    return dnnl_backward_filter(1, depthwise_backward_filter_f32, gw, gb, x, gy, win, beta);
  return PICK(x, depthwise_backward_filter, gw, gb, x, gy, win, beta);
}
static int cpu_pool2d_forward(fl_tensor *y, fl_tensor *argmax, const fl_tensor *x, fl_pool_kind kind,
                              const fl_window *win) {
  if (x->dtype == FL_BF16) {
    BF16_BEGIN;
    fl_tensor *y2 = OUT(y), *x2 = IN(x);
    BF16_END(cpu_pool2d_forward(y2, argmax, x2, kind, win));
  }
  return PICK(x, pool2d_forward, y, argmax, x, kind, win);
}
static int cpu_pool2d_backward(fl_tensor *gx, const fl_tensor *gy, const fl_tensor *x, const fl_tensor *argmax,
                               fl_pool_kind kind, const fl_window *win) {
  if (gy->dtype == FL_BF16) {
    BF16_BEGIN;
    fl_tensor *gx2 = OUT(gx), *gy2 = IN(gy), *x2 = IN(x);
    BF16_END(cpu_pool2d_backward(gx2, gy2, x2, argmax, kind, win));
  }
  return PICK(gy, pool2d_backward, gx, gy, x, argmax, kind, win);
}
static int cpu_batchnorm_forward_train(fl_tensor *y, fl_tensor *mean, fl_tensor *invstd, const fl_tensor *x,
                                       const fl_tensor *gamma, const fl_tensor *beta, fl_tensor *rm,
                                       fl_tensor *rv, double momentum, double eps, int unbiased, int relu) {
  if (x->dtype == FL_BF16) {
    BF16_BEGIN;
    fl_tensor *y2 = OUT(y), *x2 = IN(x);
    BF16_END(cpu_batchnorm_forward_train(y2, mean, invstd, x2, gamma, beta, rm, rv, momentum, eps, unbiased, relu));
  }
  return PICK(x, batchnorm_forward_train, y, mean, invstd, x, gamma, beta, rm, rv, momentum, eps, unbiased, relu);
}
static int cpu_batchnorm_backward(fl_tensor *gx, fl_tensor *ggamma, fl_tensor *gbeta, const fl_tensor *x,
                                  const fl_tensor *gy, const fl_tensor *mean, const fl_tensor *invstd,
                                  const fl_tensor *gamma, int training, double beta_acc, const fl_tensor *relu_y) {
  if (x->dtype == FL_BF16) {
    BF16_BEGIN;
    fl_tensor *gx2 = OUT(gx), *x2 = IN(x), *gy2 = IN(gy), *ry2 = IN(relu_y);
    BF16_END(cpu_batchnorm_backward(gx2, ggamma, gbeta, x2, gy2, mean, invstd, gamma, training, beta_acc, ry2));
  }
  return PICK(x, batchnorm_backward, gx, ggamma, gbeta, x, gy, mean, invstd, gamma, training, beta_acc, relu_y);
}
static int cpu_add_act(fl_tensor *y, const fl_tensor *a, const fl_tensor *b, double scale, int relu) {
  if (a->dtype == FL_BF16) {
    BF16_BEGIN;
    fl_tensor *y2 = OUT(y), *a2 = IN(a), *b2 = IN(b);
    BF16_END(cpu_add_act(y2, a2, b2, scale, relu));
  }
  return PICK(a, add_act, y, a, b, scale, relu);
}
static int cpu_channel_affine(fl_tensor *y, const fl_tensor *x, const fl_tensor *scale, const fl_tensor *shift,
                              int relu) {
  if (x->dtype == FL_BF16) {
    BF16_BEGIN;
    fl_tensor *y2 = OUT(y), *x2 = IN(x);
    BF16_END(cpu_channel_affine(y2, x2, scale, shift, relu));
  }
  return PICK(x, channel_affine, y, x, scale, shift, relu);
}
static int cpu_act_backward(fl_act_kind act, fl_tensor *gx, const fl_tensor *gy, const fl_tensor *y) {
  if (y->dtype == FL_BF16) {
    BF16_BEGIN;
    fl_tensor *gx2 = OUT(gx), *gy2 = IN(gy), *y2 = IN(y);
    BF16_END(cpu_act_backward(act, gx2, gy2, y2));
  }
  return PICK(y, act_backward, act, gx, gy, y);
}
static int cpu_softmax_xent(fl_tensor *loss, fl_tensor *grad, const fl_tensor *logits, const fl_tensor *target,
                            double smoothing, double grad_scale) {
  return PICK(logits, softmax_xent, loss, grad, logits, target, smoothing, grad_scale);
}

static int cpu_axpby(fl_tensor *y, double a, const fl_tensor *x, double b) {
  return PICK(y, axpby, y, a, x, b);
}
static int cpu_sumsq(const fl_tensor *x, double *out) { return PICK(x, sumsq, x, out); }
static int cpu_sgd_step(fl_tensor *w, const fl_tensor *g, fl_tensor *m, double lr, double momentum, int nesterov) {
  return PICK(w, sgd_step, w, g, m, lr, momentum, nesterov);
}
static int cpu_adam_step(fl_tensor *w, const fl_tensor *g, fl_tensor *m, fl_tensor *v, double alpha, double beta1,
                         double beta2, double eps) {
  return PICK(w, adam_step, w, g, m, v, alpha, beta1, beta2, eps);
}

const struct fl_nn_ops fl_cpu_nn_ops = {
  .conv2d_forward = cpu_conv2d_forward,
  .conv2d_backward_data = cpu_conv2d_backward_data,
  .conv2d_backward_filter = cpu_conv2d_backward_filter,
  .depthwise_forward = cpu_depthwise_forward,
  .depthwise_backward_data = cpu_depthwise_backward_data,
  .depthwise_backward_filter = cpu_depthwise_backward_filter,
  .pool2d_forward = cpu_pool2d_forward,
  .pool2d_backward = cpu_pool2d_backward,
  .batchnorm_forward_train = cpu_batchnorm_forward_train,
  .batchnorm_backward = cpu_batchnorm_backward,
  .channel_affine = cpu_channel_affine,
  .act_backward = cpu_act_backward,
  .softmax_xent = cpu_softmax_xent,
  .add_act = cpu_add_act,
  .axpby = cpu_axpby,
  .sumsq = cpu_sumsq,
  .sgd_step = cpu_sgd_step,
  .adam_step = cpu_adam_step,
};
