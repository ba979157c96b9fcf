/* Neural-network kernels: convolution, pooling, batch normalization, fused losses.
 *
 * Layout is Keras's channels_last throughout: activations are NHWC (N, H, W, C), convolution kernels
 * HWIO (KH, KW, Cin, Cout), depthwise kernels (KH, KW, C, M) with output channel c*M + m.
 *
 * The front functions (fl_conv2d_forward, ...) check shapes and dtypes, make their inputs contiguous,
 * allocate outputs (an `fl_tensor *out` argument is an empty struct that they initialise, as in
 * ops.h; a name ending in _into writes into an existing tensor) and then call the kernel table
 * `struct fl_nn_ops` of the tensors' backend (fl_backend.nn). A backend kernel gets contiguous
 * tensors of one dtype (float32 or float64) whose shapes have been checked, and only computes.
 *
 * Mixed precision: activations (x, y, gx, gy, relu_y), kernels (w) and pooling may be bfloat16; their
 * per-channel parameters and statistics (scale, shift, gamma, beta, mean, invstd, running stats, gb,
 * ggamma, gbeta) are then float32. The fronts take float32 weight gradients gw for bfloat16 inputs:
 * the kernel writes a fresh bfloat16 gw (beta 0 for bfloat16, always) and the front adds it. The
 * loss and optimizer kernels take float32/float64 only and refuse bfloat16.
 *
 * Gradients of parameters are accumulated: kernels named *_backward_filter take `beta`, and compute
 * gw = beta*gw + dL/dw (beta 0 overwrites, 1 accumulates). */
#ifndef FLOWER_NN_H
#define FLOWER_NN_H

#include "backend.h"

/* A sliding window over H and W: kernel size, strides, dilation and the padding resolved to four
 * numbers. TensorFlow's 'same' rule puts the extra row/column of an odd total at the bottom/right. */
typedef struct fl_window {
  int kh, kw;               /* window size */
  int sh, sw;               /* strides */
  int dh, dw;               /* dilation (1 = dense) */
  int pt, pb, pl, pr;       /* zero (or -inf / excluded) padding: top, bottom, left, right */
} fl_window;

/* Fills `win` for an input of H x W and gives the output size. padding: "valid" or "same"
 * (TensorFlow's rule: out = ceil(in/stride), pad = max((out-1)*stride + (k-1)*dil + 1 - in, 0),
 * before = pad/2, after = the rest). -1 with a message naming `op` if the window does not fit. */
int fl_window_init(fl_window *win, const char *op, int64_t H, int64_t W, int kh, int kw, int sh, int sw,
                   int dh, int dw, const char *padding, int64_t *OH, int64_t *OW);
/* Output size of an explicit window (pads already set); -1 with a message if it is empty. */
int fl_window_out(const fl_window *win, const char *op, int64_t H, int64_t W, int64_t *OH, int64_t *OW);

typedef enum { FL_POOL_MAX, FL_POOL_AVG } fl_pool_kind;
typedef enum { FL_ACT_RELU, FL_ACT_SIGMOID, FL_ACT_TANH, FL_ACT_SOFTMAX } fl_act_kind;

/* The kernels a backend provides. Shapes below: x (N,H,W,C), y/gy (N,OH,OW,F), w (KH,KW,C,F). */
struct fl_nn_ops {
  /* y = conv(x, w), then per output channel y = y*scale + shift (either may be NULL), then ReLU if
   * relu: the bias of a Conv2D is `shift`, and an inference BatchNorm(+ReLU) folds into scale/shift. */
  int (*conv2d_forward)(fl_tensor *y, const fl_tensor *x, const fl_tensor *w, const fl_tensor *scale,
                        const fl_tensor *shift, int relu, const fl_window *win);
  /* gx = dL/dx (overwritten) */
  int (*conv2d_backward_data)(fl_tensor *gx, const fl_tensor *gy, const fl_tensor *w, const fl_window *win);
  /* gw = beta*gw + dL/dw; gb (F) = beta*gb + sum of gy over N,OH,OW when not NULL */
  int (*conv2d_backward_filter)(fl_tensor *gw, fl_tensor *gb, const fl_tensor *x, const fl_tensor *gy,
                                const fl_window *win, double beta);
  /* depthwise: w (KH,KW,C,M), y (N,OH,OW,C*M) */
  int (*depthwise_forward)(fl_tensor *y, const fl_tensor *x, const fl_tensor *w, const fl_tensor *scale,
                           const fl_tensor *shift, int relu, const fl_window *win);
  int (*depthwise_backward_data)(fl_tensor *gx, const fl_tensor *gy, const fl_tensor *w, const fl_window *win);
  int (*depthwise_backward_filter)(fl_tensor *gw, fl_tensor *gb, const fl_tensor *x, const fl_tensor *gy,
                                   const fl_window *win, double beta);
  /* pooling over windows of x (N,H,W,C) -> y (N,OH,OW,C). Max ignores padding (as -inf); average
   * divides by the number of window elements inside the input (padding excluded, like TensorFlow).
   * argmax (int32, y's shape, or NULL; max pooling): where each maximum came from, as the offset
   * (h*W + w)*C + c within its image — the first maximum in row-major window order. */
  int (*pool2d_forward)(fl_tensor *y, fl_tensor *argmax, const fl_tensor *x, fl_pool_kind kind,
                        const fl_window *win);
  /* gx (overwritten; its shape is the input's). Max pooling routes each gy to its argmax (given, or
   * recomputed from x when argmax is NULL); average pooling gets x = argmax = NULL. */
  int (*pool2d_backward)(fl_tensor *gx, const fl_tensor *gy, const fl_tensor *x, const fl_tensor *argmax,
                         fl_pool_kind kind, const fl_window *win);
  /* Batch normalisation over all dims but the last (C). Training: mean/var of the batch (biased var),
   * y = (x-mean)*invstd*gamma + beta with invstd = 1/sqrt(var+eps); saves mean (C), invstd (C); when
   * running_mean/running_var are given, updates them as Keras does:
   * r = momentum*r + (1-momentum)*batch, the variance unbiased (times n/(n-1)) when `unbiased` (TF's
   * fused kernel, used by tf-keras for 4-d inputs), else biased. gamma/beta may be NULL
   * (scale=False / center=False). relu: a following ReLU fused into the output. */
  int (*batchnorm_forward_train)(fl_tensor *y, fl_tensor *mean, fl_tensor *invstd, const fl_tensor *x,
                                 const fl_tensor *gamma, const fl_tensor *beta, fl_tensor *running_mean,
                                 fl_tensor *running_var, double momentum, double eps, int unbiased, int relu);
  /* gx = dL/dx (overwritten; may be NULL); ggamma/gbeta = beta_acc*g + dL/d(gamma/beta) (either may be
   * NULL). training = 1: mean/invstd are the batch's and gx includes their dependence on x;
   * training = 0: mean/invstd are constants (moving statistics). relu_y: the output of a fused
   * ReLU (or NULL): gy counts only where relu_y > 0. */
  int (*batchnorm_backward)(fl_tensor *gx, fl_tensor *ggamma, fl_tensor *gbeta, const fl_tensor *x,
                            const fl_tensor *gy, const fl_tensor *mean, const fl_tensor *invstd,
                            const fl_tensor *gamma, int training, double beta_acc, const fl_tensor *relu_y);
  /* y = x*scale + shift per last-dim channel (either NULL), then ReLU if relu. y may be x (in place). */
  int (*channel_affine)(fl_tensor *y, const fl_tensor *x, const fl_tensor *scale, const fl_tensor *shift,
                        int relu);
  /* gx = gy * act'(.) expressed through the activation's output y (softmax over the last dim).
   * gx may be gy (in place). */
  int (*act_backward)(fl_act_kind act, fl_tensor *gx, const fl_tensor *gy, const fl_tensor *y);
  /* Softmax cross-entropy over the last dim of logits (N,K): target is int32/int64 class indices (N)
   * (0-based) or probabilities (N,K) of the logits' dtype. With label smoothing s the target becomes
   * (1-s)*t + s/K. loss (N) gets each row's loss; grad (N,K), when not NULL, gets
   * grad_scale * (softmax - target). */
  int (*softmax_xent)(fl_tensor *loss, fl_tensor *grad, const fl_tensor *logits, const fl_tensor *target,
                      double smoothing, double grad_scale);
  /* y = a + scale*b, then ReLU if relu (Add, InceptionResNet's scaled residual); y may be a or b */
  int (*add_act)(fl_tensor *y, const fl_tensor *a, const fl_tensor *b, double scale, int relu);
  /* ---- optimizer kernels: one pass over contiguous tensors of one shape, in place ---- */
  /* y = a*x + b*y */
  int (*axpby)(fl_tensor *y, double a, const fl_tensor *x, double b);
  /* *out = sum of x^2 (accumulated in double) */
  int (*sumsq)(const fl_tensor *x, double *out);
  /* Keras's SGD: without momentum w -= lr*g; with it m = momentum*m - lr*g, then w += m, or for
   * Nesterov w += momentum*m - lr*g. m may be NULL when momentum is 0. */
  int (*sgd_step)(fl_tensor *w, const fl_tensor *g, fl_tensor *m, double lr, double momentum, int nesterov);
  /* Keras's Adam: m += (g-m)*(1-beta1); v += (g^2-v)*(1-beta2); w -= alpha*m/(sqrt(v)+eps), where
   * the caller passes alpha = lr*sqrt(1-beta2^t)/(1-beta1^t) */
  int (*adam_step)(fl_tensor *w, const fl_tensor *g, fl_tensor *m, fl_tensor *v, double alpha, double beta1,
                   double beta2, double eps);
};

/* Every kernel of struct fl_nn_ops by name, for backends to declare and gather theirs: X(name) for
 * each, in the struct's order. */
#define FL_NN_KERNELS(X)                                                                            \
  X(conv2d_forward) X(conv2d_backward_data) X(conv2d_backward_filter) X(depthwise_forward)          \
  X(depthwise_backward_data) X(depthwise_backward_filter) X(pool2d_forward) X(pool2d_backward)      \
  X(batchnorm_forward_train) X(batchnorm_backward) X(channel_affine) X(act_backward) X(softmax_xent) \
  X(add_act) X(axpby) X(sumsq) X(sgd_step) X(adam_step)

/* Elements of the CPU convolutions' im2col chunk (default 2^20; <= 0 restores it). For tests. */
void fl_nn_cpu_set_chunk(int64_t elements);
/* Which code runs the CPU's float32 convolutions: FL_CONV_AUTO (the default) picks per operation
 * and kernel shape what measured faster (see core/cpu/nn_conv.c); FL_CONV_OWN forces our GEMM
 * kernels, FL_CONV_ONEDNN oneDNN wherever it accepts the case. float64 always uses our kernels. */
typedef enum { FL_CONV_AUTO, FL_CONV_OWN, FL_CONV_ONEDNN } fl_conv_engine;
void fl_nn_cpu_set_conv_engine(fl_conv_engine e);

/* ---- front functions: checked, contiguous, allocate their outputs ---- */
int fl_conv2d_forward(fl_tensor *y, const fl_tensor *x, const fl_tensor *w, const fl_tensor *scale,
                      const fl_tensor *shift, int relu, const fl_window *win);
/* xshape: the input's shape (N,H,W,C) */
int fl_conv2d_backward_data(fl_tensor *gx, const fl_tensor *gy, const fl_tensor *w, const int64_t *xshape,
                            const fl_window *win);
int fl_conv2d_backward_filter_into(fl_tensor *gw, fl_tensor *gb, const fl_tensor *x, const fl_tensor *gy,
                                   const fl_window *win, double beta);
int fl_depthwise_forward(fl_tensor *y, const fl_tensor *x, const fl_tensor *w, const fl_tensor *scale,
                         const fl_tensor *shift, int relu, const fl_window *win);
int fl_depthwise_backward_data(fl_tensor *gx, const fl_tensor *gy, const fl_tensor *w, const int64_t *xshape,
                               const fl_window *win);
int fl_depthwise_backward_filter_into(fl_tensor *gw, fl_tensor *gb, const fl_tensor *x, const fl_tensor *gy,
                                      const fl_window *win, double beta);
/* win->kh, kw give the pool size. argmax: NULL, or (max pooling) an empty struct that gets the
 * int32 positions of the maxima for the backward pass */
int fl_pool2d_forward(fl_tensor *y, fl_tensor *argmax, const fl_tensor *x, fl_pool_kind kind, const fl_window *win);
/* Max pooling needs the input x or the argmax of its forward (either may be NULL, not both); average
 * pooling needs neither. xshape (N,H,W,C) gives gx's shape. */
int fl_pool2d_backward(fl_tensor *gx, const fl_tensor *gy, const fl_tensor *x, const fl_tensor *argmax,
                       const int64_t *xshape, fl_pool_kind kind, const fl_window *win);
/* mean, invstd: empty structs, initialised to (C) */
int fl_batchnorm_forward_train(fl_tensor *y, fl_tensor *mean, fl_tensor *invstd, const fl_tensor *x,
                               const fl_tensor *gamma, const fl_tensor *beta, fl_tensor *running_mean,
                               fl_tensor *running_var, double momentum, double eps, int unbiased, int relu);
/* gx: empty struct to initialise, or NULL when the input gradient is not wanted */
int fl_batchnorm_backward(fl_tensor *gx, fl_tensor *ggamma, fl_tensor *gbeta, const fl_tensor *x,
                          const fl_tensor *gy, const fl_tensor *mean, const fl_tensor *invstd,
                          const fl_tensor *gamma, int training, double beta_acc, const fl_tensor *relu_y);
/* y: empty struct (a new tensor) or, with _into, an existing contiguous tensor that may be a or b */
int fl_add_act(fl_tensor *y, const fl_tensor *a, const fl_tensor *b, double scale, int relu);
int fl_add_act_into(fl_tensor *y, const fl_tensor *a, const fl_tensor *b, double scale, int relu);
int fl_channel_affine(fl_tensor *y, const fl_tensor *x, const fl_tensor *scale, const fl_tensor *shift, int relu);
int fl_channel_affine_into(fl_tensor *y, const fl_tensor *x, const fl_tensor *scale, const fl_tensor *shift,
                           int relu);      /* y has x's shape and is contiguous; may be x */
int fl_act_backward(fl_act_kind act, fl_tensor *gx, const fl_tensor *gy, const fl_tensor *y);
int fl_softmax_xent(fl_tensor *loss, fl_tensor *grad, const fl_tensor *logits, const fl_tensor *target,
                    double smoothing, double grad_scale);
/* optimizer kernels (see struct fl_nn_ops): all tensors contiguous, one float dtype, one shape */
int fl_axpby(fl_tensor *y, double a, const fl_tensor *x, double b);
int fl_sumsq(const fl_tensor *x, double *out);
int fl_sgd_step(fl_tensor *w, const fl_tensor *g, fl_tensor *m, double lr, double momentum, int nesterov);
int fl_adam_step(fl_tensor *w, const fl_tensor *g, fl_tensor *m, fl_tensor *v, double alpha, double beta1,
                 double beta2, double eps);

#endif
