/* What the CUDA backend's nn kernel families (nn_conv.cu, nn_pool.cu, nn_norm.cu, nn_act.cu,
 * nn_loss.cu, nn_optim.cu; the same names as core/cpu/'s) share: rounding helpers, launch frames,
 * per-channel parameter checks and deterministic column sums. Their fl_nn_ops entries are declared
 * in cuda_internal.h and gathered into the table in cuda_device.cu.
 *
 * The kernels follow the CPU backend (core/cpu/nn_*.c) operation for operation: reductions accumulate
 * in double in a fixed order (deterministic), and products/sums that the CPU rounds separately are
 * spelled with __fmul_rn/__fadd_rn so nvcc does not fuse them into one FMA.
 *
 * bfloat16 activations (T = __nv_bfloat16): every kernel but the optimizer updates and the fused
 * loss takes them. Elements are loaded into A = cu_acc_t<T> (float), the float32 arithmetic runs
 * unchanged, each output is rounded once (cu_store). The per-channel tensors beside bfloat16
 * activations -- scale/shift, gamma/beta, batch statistics, bias and BN parameter gradients -- are
 * float32 (the front keeps them so): in the kernels they have type A, which is T itself for
 * float32/float64. */
#ifndef FLOWER_NN_CUDA_H
#define FLOWER_NN_CUDA_H

#include "cuda_internal.h"

#include <math.h>
#include <string.h>
#include <vector>

template <class T> __device__ inline T mul_rn(T a, T b) {
  if constexpr (std::is_same<T, float>::value) return __fmul_rn(a, b);
  else return __dmul_rn(a, b);
}
template <class T> __device__ inline T add_rn(T a, T b) {
  if constexpr (std::is_same<T, float>::value) return __fadd_rn(a, b);
  else return __dadd_rn(a, b);
}

static inline const void *opt_ptr(const fl_tensor *t) { return t ? (const void *)cu_ptr(t) : NULL; }

static inline int dev_of(const char *op, const fl_tensor *t, cu_dev **d) { return cu_enter(op, t->storage->device, d); }

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
static inline fl_dtype param_dtype(fl_dtype act) { return act == FL_BF16 ? FL_F32 : act; }

/* 0 when p is NULL or has param_dtype(act); else a message (a wrong dtype would be misread) */
static inline int check_param(const char *op, const char *what, const fl_tensor *p, fl_dtype act) {
  if (!p || p->dtype == param_dtype(act)) return 0;
  return fl_fail("%s: %s is %s, expected %s beside %s activations", op, what, fl_dtype_name(p->dtype),
                 fl_dtype_name(param_dtype(act)), fl_dtype_name(act));
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

/* y = x*scale[c] + shift[c] (either NULL), then max(., 0), per last-dim channel c; y may be x
 * (nn_norm.cu: channel_affine, and the epilogue of the convolutions) */
int affine_run(const char *op, fl_tensor *y, const fl_tensor *x, const fl_tensor *scale, const fl_tensor *shift,
               int relu);

#endif
