/* A second backend for tests on machines without a GPU: "fake". Its memory is mmap'ed pages kept
 * PROT_NONE except while one of its own functions runs, so host code that reads or writes a fake
 * tensor's elements directly crashes, as it would on a CUDA device pointer. Its kernels are the CPU
 * backend's, run with the pages opened. Allocations fail on request (fake_fail_mode), with a message
 * of the kind the CUDA allocator records, so the front's handling of backend messages is tested.
 * Single-threaded tests only (the block list is not locked). */
#ifndef FLOWER_TEST_FAKE_BACKEND_H
#define FLOWER_TEST_FAKE_BACKEND_H

#include <sys/mman.h>
#include <unistd.h>

#include "nn.h"

#define FAKE_MAXBLOCKS 4096
static struct { void *p; size_t len; } fake_blocks[FAKE_MAXBLOCKS];
static int fake_nblocks;
/* 0: allocations above fake_limit fail with an out-of-memory message (like CUDA's);
 * 1: they fail silently (the front must word the message); 2: every allocation fails with a
 * message that is not out-of-memory ("device does not exist") */
static int fake_fail_mode;
static size_t fake_limit = (size_t)1 << 30;

static void fake_protect(int prot) {
  for (int i = 0; i < fake_nblocks; i++) mprotect(fake_blocks[i].p, fake_blocks[i].len, prot);
}

static void *fake_alloc(int device, size_t nbytes) {
  if (fake_fail_mode == 2) {
    fl_fail("fake: device %d does not exist", device);
    return NULL;
  }
  if (nbytes > fake_limit || fake_nblocks == FAKE_MAXBLOCKS) {
    if (fake_fail_mode == 0)
      fl_fail_oom("fake: out of memory on fake:%d: asked for %zu bytes, %zu free", device, nbytes, fake_limit);
    return NULL;
  }
  size_t pg = (size_t)sysconf(_SC_PAGESIZE), len = (nbytes + pg - 1) / pg * pg;
  void *p = mmap(NULL, len, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (p == MAP_FAILED) return NULL;
  fake_blocks[fake_nblocks].p = p;
  fake_blocks[fake_nblocks].len = len;
  fake_nblocks++;
  return p;
}

static void fake_free(int device, void *p) {
  (void)device;
  for (int i = 0; i < fake_nblocks; i++)
    if (fake_blocks[i].p == p) {
      munmap(p, fake_blocks[i].len);
      fake_blocks[i] = fake_blocks[--fake_nblocks];
      return;
    }
}

/* each kernel: open every block, run the CPU's, close again */
#define FAKE_RUN(call)                                    \
  do {                                                    \
    fake_protect(PROT_READ | PROT_WRITE);                 \
    int rc_ = (call);                                     \
    fake_protect(PROT_NONE);                              \
    return rc_;                                           \
  } while (0)

static int fake_copy(fl_tensor *d, const fl_tensor *s) { FAKE_RUN(fl_cpu_backend.copy(d, s)); }
static int fake_fill(fl_tensor *t, double v) { FAKE_RUN(fl_cpu_backend.fill(t, v)); }
static int fake_binary(fl_binop op, fl_tensor *o, const fl_tensor *a, const fl_tensor *b) {
  FAKE_RUN(fl_cpu_backend.binary(op, o, a, b));
}
static int fake_unary(fl_unop op, fl_tensor *o, const fl_tensor *a, double p0, double p1) {
  FAKE_RUN(fl_cpu_backend.unary(op, o, a, p0, p1));
}
static int fake_reduce(fl_redop op, fl_tensor *o, const fl_tensor *a, int dim, int corr) {
  FAKE_RUN(fl_cpu_backend.reduce(op, o, a, dim, corr));
}
static int fake_where(fl_tensor *o, const fl_tensor *m, const fl_tensor *a, const fl_tensor *b) {
  FAKE_RUN(fl_cpu_backend.where(o, m, a, b));
}
static int fake_matmul(fl_tensor *o, const fl_tensor *a, const fl_tensor *b, double alpha, double beta) {
  FAKE_RUN(fl_cpu_backend.matmul(o, a, b, alpha, beta));
}
static int fake_softmax(fl_tensor *o, const fl_tensor *a, int dim, int lg) { FAKE_RUN(fl_cpu_backend.softmax(o, a, dim, lg)); }
static int fake_rng(fl_tensor *o, fl_rngkind k, uint64_t seed, uint64_t off, double p0, double p1) {
  FAKE_RUN(fl_cpu_backend.rng(o, k, seed, off, p0, p1));
}

/* the nn kernels: the CPU's, each run with the pages opened */
#define CPU_NN fl_cpu_backend.nn
static int fake_conv2d_forward(fl_tensor *y, const fl_tensor *x, const fl_tensor *w, const fl_tensor *scale,
                               const fl_tensor *shift, int relu, const fl_window *win) {
  FAKE_RUN(CPU_NN->conv2d_forward(y, x, w, scale, shift, relu, win));
}
static int fake_conv2d_backward_data(fl_tensor *gx, const fl_tensor *gy, const fl_tensor *w, const fl_window *win) {
  FAKE_RUN(CPU_NN->conv2d_backward_data(gx, gy, w, win));
}
static int fake_conv2d_backward_filter(fl_tensor *gw, fl_tensor *gb, const fl_tensor *x, const fl_tensor *gy,
                                       const fl_window *win, double beta) {
  FAKE_RUN(CPU_NN->conv2d_backward_filter(gw, gb, x, gy, win, beta));
}
static int fake_depthwise_forward(fl_tensor *y, const fl_tensor *x, const fl_tensor *w, const fl_tensor *scale,
                                  const fl_tensor *shift, int relu, const fl_window *win) {
  FAKE_RUN(CPU_NN->depthwise_forward(y, x, w, scale, shift, relu, win));
}
static int fake_depthwise_backward_data(fl_tensor *gx, const fl_tensor *gy, const fl_tensor *w, const fl_window *win) {
  FAKE_RUN(CPU_NN->depthwise_backward_data(gx, gy, w, win));
}
static int fake_depthwise_backward_filter(fl_tensor *gw, fl_tensor *gb, const fl_tensor *x, const fl_tensor *gy,
                                          const fl_window *win, double beta) {
  FAKE_RUN(CPU_NN->depthwise_backward_filter(gw, gb, x, gy, win, beta));
}
static int fake_pool2d_forward(fl_tensor *y, fl_tensor *argmax, const fl_tensor *x, fl_pool_kind kind,
                               const fl_window *win) {
  FAKE_RUN(CPU_NN->pool2d_forward(y, argmax, x, kind, win));
}
static int fake_pool2d_backward(fl_tensor *gx, const fl_tensor *gy, const fl_tensor *x, const fl_tensor *argmax,
                                fl_pool_kind kind, const fl_window *win) {
  FAKE_RUN(CPU_NN->pool2d_backward(gx, gy, x, argmax, kind, win));
}
static int fake_batchnorm_forward_train(fl_tensor *y, fl_tensor *mean, fl_tensor *invstd, const fl_tensor *x,
                                        const fl_tensor *gamma, const fl_tensor *beta, fl_tensor *rm,
                                        fl_tensor *rv, double momentum, double eps, int unbiased, int relu) {
  FAKE_RUN(CPU_NN->batchnorm_forward_train(y, mean, invstd, x, gamma, beta, rm, rv, momentum, eps, unbiased, relu));
}
static int fake_batchnorm_backward(fl_tensor *gx, fl_tensor *ggamma, fl_tensor *gbeta, const fl_tensor *x,
                                   const fl_tensor *gy, const fl_tensor *mean, const fl_tensor *invstd,
                                   const fl_tensor *gamma, int training, double beta_acc, const fl_tensor *relu_y) {
  FAKE_RUN(CPU_NN->batchnorm_backward(gx, ggamma, gbeta, x, gy, mean, invstd, gamma, training, beta_acc, relu_y));
}
static int fake_channel_affine(fl_tensor *y, const fl_tensor *x, const fl_tensor *scale, const fl_tensor *shift,
                               int relu) {
  FAKE_RUN(CPU_NN->channel_affine(y, x, scale, shift, relu));
}
static int fake_act_backward(fl_act_kind act, fl_tensor *gx, const fl_tensor *gy, const fl_tensor *y) {
  FAKE_RUN(CPU_NN->act_backward(act, gx, gy, y));
}
static int fake_softmax_xent(fl_tensor *loss, fl_tensor *grad, const fl_tensor *logits, const fl_tensor *target,
                             double smoothing, double grad_scale) {
  FAKE_RUN(CPU_NN->softmax_xent(loss, grad, logits, target, smoothing, grad_scale));
}
static int fake_add_act(fl_tensor *y, const fl_tensor *a, const fl_tensor *b, double scale, int relu) {
  FAKE_RUN(CPU_NN->add_act(y, a, b, scale, relu));
}
static int fake_axpby(fl_tensor *y, double a, const fl_tensor *x, double b) { FAKE_RUN(CPU_NN->axpby(y, a, x, b)); }
static int fake_sumsq(const fl_tensor *x, double *out) { FAKE_RUN(CPU_NN->sumsq(x, out)); }
static int fake_sgd_step(fl_tensor *w, const fl_tensor *g, fl_tensor *m, double lr, double momentum, int nesterov) {
  FAKE_RUN(CPU_NN->sgd_step(w, g, m, lr, momentum, nesterov));
}
static int fake_adam_step(fl_tensor *w, const fl_tensor *g, fl_tensor *m, fl_tensor *v, double alpha, double beta1,
                          double beta2, double eps) {
  FAKE_RUN(CPU_NN->adam_step(w, g, m, v, alpha, beta1, beta2, eps));
}
#undef CPU_NN

/* not const: a test may take a kernel out to see that the cross-backend test reports it */
static struct fl_nn_ops fake_nn_ops = {
  .conv2d_forward = fake_conv2d_forward, .conv2d_backward_data = fake_conv2d_backward_data,
  .conv2d_backward_filter = fake_conv2d_backward_filter, .depthwise_forward = fake_depthwise_forward,
  .depthwise_backward_data = fake_depthwise_backward_data,
  .depthwise_backward_filter = fake_depthwise_backward_filter, .pool2d_forward = fake_pool2d_forward,
  .pool2d_backward = fake_pool2d_backward, .batchnorm_forward_train = fake_batchnorm_forward_train,
  .batchnorm_backward = fake_batchnorm_backward, .channel_affine = fake_channel_affine,
  .act_backward = fake_act_backward, .softmax_xent = fake_softmax_xent, .add_act = fake_add_act,
  .axpby = fake_axpby, .sumsq = fake_sumsq, .sgd_step = fake_sgd_step, .adam_step = fake_adam_step,
};

static int fake_device_count(void) { return 2; }   /* fake:0 and fake:1 */

static const fl_backend fake_backend = {
  .name = "fake", .device_count = fake_device_count, .alloc = fake_alloc, .free = fake_free, .copy = fake_copy, .fill = fake_fill,
  .binary = fake_binary, .unary = fake_unary, .reduce = fake_reduce, .where = fake_where,
  .matmul = fake_matmul, .softmax = fake_softmax, .rng = fake_rng, .nn = &fake_nn_ops,
};

#endif
