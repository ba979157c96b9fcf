/* What the CPU's nn kernel families (nn_conv.c, nn_pool.c, nn_norm.c, nn_act.c, nn_loss.c,
 * nn_optim.c; the same names as core/cuda/'s) share. Each family file has two parts: its kernels
 * written once for a `real` type (the generic part, compiled for float and for double by
 * nn_generic.h: Torch7's generic/ idea), then the entries of struct fl_nn_ops that pick the
 * float32 or float64 kernel and run bfloat16 through float32 stand-ins. The entries are declared in
 * cpu.h and gathered into the table in cpu.c. All tensors are contiguous and checked by the front
 * (core/nn.c). Parallel loops use OpenMP; inner loops over channels carry SIMD (omp simd). */
#ifndef FLOWER_NN_CPU_H
#define FLOWER_NN_CPU_H

#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <omp.h>
#include <cblas.h>
#include "nn.h"
#include "ops.h"
#include "cpu.h"

/* inner loops over channels: no loop-carried dependences, vectorise them (GCC's -O2 would not,
 * for lack of a proof that outputs and inputs do not alias) */
#define SIMD _Pragma("omp simd")

/* For each tap (i, j) of the window at output position (oh, ow) that lands inside the H x W input,
 * with (ih, iw) its input position: FOR_TAPS(win, oh, ow, H, W) { ... }. The inner `for`s over ih and
 * iw run at most once (the bounds check); `continue` goes on to the next tap. */
#define FOR_TAPS(win, oh, ow, H, W)                                                                     \
  for (int i = 0; i < (win)->kh; i++)                                                                   \
    for (int64_t ih = (oh) * (win)->sh - (win)->pt + (int64_t)i * (win)->dh; ih >= 0 && ih < (H); ih = -1) \
      for (int j = 0; j < (win)->kw; j++)                                                               \
        for (int64_t iw = (ow) * (win)->sw - (win)->pl + (int64_t)j * (win)->dw; iw >= 0 && iw < (W); iw = -1)

/* an optional tensor's elements (NULL stays NULL), in the generic part */
#define OPT(t) ((t) ? (const real *)fl_tensor_data(t) : NULL)

/* y[r, f] = y[r, f]*scale[f] + shift[f], then max(., 0) if relu, for rows r in [0, rows); par = 0
 * inside an already parallel region (no nested team). nn_norm.c; the convolutions end with it. */
void epilogue_p_f32(float *y, int64_t rows, int64_t f, const float *scale, const float *shift, int relu, int par);
void epilogue_p_f64(double *y, int64_t rows, int64_t f, const double *scale, const double *shift, int relu,
                    int par);

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

#endif
