/* Internals shared by the .cu files of core/cuda/: CUDA C++ only (never included by C files or bindings).
 * Device contexts (one stream, cuBLAS and cuDNN handle per device), status checks that become
 * fl_fail messages naming the operation, the strided iterator every element-wise kernel uses,
 * dtype dispatch and conversions that match the CPU backend bit for bit (core/cpu/cpu.h).
 *
 * bfloat16 (FL_BF16, __nv_bfloat16 here) is a storage type: a kernel loads each bf16 element into
 * its accumulation type cu_acc_t<T> (float), computes exactly as the float32 kernel does, and rounds
 * each output once (cu_store), as the CPU backend does (core/cpu/bf16.c). For every other dtype
 * cu_acc_t<T> is T and cu_load / cu_store are the identity, so one template serves all. */
#ifndef FLOWER_CUDA_INTERNAL_H
#define FLOWER_CUDA_INTERNAL_H

#ifndef __CUDACC__
#error "cuda_internal.h is for nvcc (.cu files); C code includes cuda_backend.h"
#endif

#include <cuda_runtime.h>
#include <cuda_bf16.h>
#include <cublas_v2.h>
#include <cudnn.h>
#include <stdint.h>
#include <string.h>
#include <type_traits>

extern "C" {
#include "../tensor.h"
#include "../backend.h"
#include "../nn.h"
}
#include "../rng.h"
#include "cuda_backend.h"

/* ---------------------------------------------------------------- devices */

#define CU_MAXDEV 16
#define CU_THREADS 256

typedef struct cu_dev {
  int index;
  int ready;
  cudaStream_t stream;
  cublasHandle_t blas;      /* created on first use (cu_blas) */
  cudnnHandle_t dnn;        /* created on first use (cu_dnn) */
  int sm_count;
  int cc_major, cc_minor;
} cu_dev;

/* Makes `device` current and returns its context, creating the stream on first use. -1 with a
 * message naming `op` if the device does not exist or the runtime fails. */
int cu_enter(const char *op, int device, cu_dev **out);
int cu_blas(const char *op, cu_dev *d);     /* creates d->blas if needed, bound to d->stream */
int cu_dnn(const char *op, cu_dev *d);      /* creates d->dnn if needed, bound to d->stream */

/* Process-wide settings (cuda_device.cu) */
extern int cu_allow_tf32, cu_benchmark, cu_deterministic;

/* ---------------------------------------------------------------- errors */

/* "op: what failed: cudaErrorX (description)"; clears the runtime's last-error slot. */
int cu_fail(const char *op, const char *what, cudaError_t e);
int cu_fail_blas(const char *op, const char *what, cublasStatus_t s);
int cu_fail_dnn(const char *op, const char *what, cudnnStatus_t s);
/* After a kernel launch: a launch error (bad configuration, no kernel image for this GPU) as a message. */
int cu_launched(const char *op);

#define CU_TRY(op, call) do { cudaError_t e_ = (call); if (e_ != cudaSuccess) return cu_fail(op, #call, e_); } while (0)
#define CUBLAS_TRY(op, call) do { cublasStatus_t s_ = (call); \
  if (s_ != CUBLAS_STATUS_SUCCESS) return cu_fail_blas(op, #call, s_); } while (0)
#define CUDNN_TRY(op, call) do { cudnnStatus_t s_ = (call); \
  if (s_ != CUDNN_STATUS_SUCCESS) return cu_fail_dnn(op, #call, s_); } while (0)

/* ---------------------------------------------------------------- memory */

/* The caching allocator (cuda_device.cu). cu_malloc records an out-of-memory message (naming `op`)
 * and returns NULL on failure; cu_free never fails. */
void *cu_malloc(const char *op, int device, size_t nbytes);
void cu_free(int device, void *p);

/* Page-locked host blocks (cuda_device.cu): backend host_alloc/host_free/host_wait. After queueing
 * an asynchronous copy that reads the block starting at p on stream s of device d, cu_host_record
 * marks it busy until that copy is done; 0 with *known = 0 when p is not such a block (pageable). */
int cu_host_record(const char *op, const void *p, cu_dev *d, cudaStream_t s, int *known);
/* Waits for device's asynchronous copies and gives their landing buffers back (cuda_copy.cu). */
int cu_async_release(int device);

/* Device scratch released at scope exit (back to the cache: stream order makes reuse safe). */
struct cu_buf {
  int dev = 0;
  void *p = nullptr;
  cu_buf() = default;
  cu_buf(const cu_buf &) = delete;
  cu_buf &operator=(const cu_buf &) = delete;
  ~cu_buf() { if (p) cu_free(dev, p); }
  int get(const char *op, int device, size_t nbytes) {
    if (p) cu_free(dev, p);
    dev = device;
    p = cu_malloc(op, device, nbytes ? nbytes : 1);
    return p ? 0 : -1;
  }
};

/* A temporary contiguous tensor on device `dev` backed by scratch memory: a stack storage that nothing
 * retains or releases (only kernels in this backend see it). */
struct cu_tmp {
  fl_storage st;
  fl_tensor t;
  cu_buf buf;
  int init(const char *op, int dev, fl_dtype dt, int ndim, const int64_t *shape);
};

static inline char *cu_ptr(const fl_tensor *t) {
  return (char *)t->storage->data + t->offset * (int64_t)fl_dtype_size(t->dtype);
}
static inline int cu_is_dev(const fl_tensor *t) { return t->storage && t->storage->backend == fl_cuda_backend(); }

/* ---------------------------------------------------------------- dtypes */

template <class T> struct cu_tag { typedef T type; };

typedef __nv_bfloat16 cu_bf16;

/* Calls f(cu_tag<T>()) for the C type of dt (all six dtypes). */
template <class F> static inline int cu_visit(fl_dtype dt, F &&f) {
  switch (dt) {
  case FL_F32: return f(cu_tag<float>());
  case FL_F64: return f(cu_tag<double>());
  case FL_I32: return f(cu_tag<int32_t>());
  case FL_I64: return f(cu_tag<int64_t>());
  case FL_U8: return f(cu_tag<uint8_t>());
  case FL_BF16: return f(cu_tag<cu_bf16>());
  default: return fl_fail("cuda: invalid dtype %d", (int)dt);
  }
}
/* Only float32 / float64: kernels that have no bfloat16 form (the optimizer updates, the fused
 * loss: the front keeps their tensors float32). */
template <class F> static inline int cu_visit_float(const char *op, fl_dtype dt, F &&f) {
  switch (dt) {
  case FL_F32: return f(cu_tag<float>());
  case FL_F64: return f(cu_tag<double>());
  case FL_BF16: return fl_fail("%s: bfloat16 is not supported by this CUDA kernel (float32 or float64 only)", op);
  default: return fl_fail("%s: expected float32 or float64, got %s", op, fl_dtype_name(dt));
  }
}
/* float32 / float64 / bfloat16: kernels that compute in cu_acc_t<T> (activations, nn kernels). */
template <class F> static inline int cu_visit_act(const char *op, fl_dtype dt, F &&f) {
  switch (dt) {
  case FL_F32: return f(cu_tag<float>());
  case FL_F64: return f(cu_tag<double>());
  case FL_BF16: return f(cu_tag<cu_bf16>());
  default: return fl_fail("%s: expected float32, float64 or bfloat16, got %s", op, fl_dtype_name(dt));
  }
}

/* Runs f(I{}) with I = int32_t when indices below n (plus a grid's stride) fit in 32 bits, else int64_t.
 * The per-element index arithmetic of NHWC kernels is mostly division and modulo, several times
 * dearer in 64 bits on the GPU: ResNet50's max-pooling backward ran 5x slower with 64-bit indices. */
template <class F> static inline int cu_visit_index(int64_t n, F &&f) {
  if (n <= (int64_t)INT32_MAX - ((int64_t)1 << 26)) return f(int32_t{0});
  return f(int64_t{0});
}

/* ---- bfloat16: accumulation type, loads and stores ---- */

/* The type a kernel computes in: float for bfloat16, T itself otherwise. Parameters that the
 * front keeps in float32 beside bfloat16 activations (scale/shift, batch-norm statistics, gamma,
 * bias gradients) have this type too. */
template <class T> struct cu_acc { typedef T type; };
template <> struct cu_acc<cu_bf16> { typedef float type; };
template <class T> using cu_acc_t = typename cu_acc<T>::type;

/* float, double and bfloat16 (std::is_floating_point does not know __nv_bfloat16) */
template <class T> constexpr bool cu_is_float = std::is_floating_point<T>::value || std::is_same<T, cu_bf16>::value;
template <class T> constexpr bool cu_is_bf16 = std::is_same<T, cu_bf16>::value;

/* float -> bfloat16, rounding to nearest even: the intrinsic (one cvt instruction on sm_80+), except
 * for NaN, which keeps its sign and payload with the quiet bit set like the CPU's fl_bf16_from_float
 * (the intrinsic gives one canonical NaN), so device and host conversions agree bit for bit. */
__host__ __device__ inline cu_bf16 cu_f2bf(float f) {
  if (f != f) {
#ifdef __CUDA_ARCH__
    uint32_t u = __float_as_uint(f);
#else
    uint32_t u;
    memcpy(&u, &f, sizeof u);
#endif
    __nv_bfloat16_raw r;
    r.x = (unsigned short)((u >> 16) | 0x40);
    return cu_bf16(r);
  }
  return __float2bfloat16_rn(f);
}

template <class T> __host__ __device__ inline cu_acc_t<T> cu_load(T x) {
  if constexpr (cu_is_bf16<T>) return __bfloat162float(x);
  else return x;
}
template <class T> __host__ __device__ inline T cu_store(cu_acc_t<T> v) {
  if constexpr (cu_is_bf16<T>) return cu_f2bf(v);
  else return v;
}

/* Saturating conversion from double, as the CPU's cpu_to_* (a plain cast of an out-of-range value
 * is undefined behaviour in C and C++). bfloat16 goes through float32, as everywhere (the front's
 * fl_tensor_set does the same). */
template <class T> __host__ __device__ inline T cu_from_double(double v);
template <> __host__ __device__ inline float cu_from_double<float>(double v) { return (float)v; }
template <> __host__ __device__ inline double cu_from_double<double>(double v) { return v; }
template <> __host__ __device__ inline cu_bf16 cu_from_double<cu_bf16>(double v) { return cu_f2bf((float)v); }
template <> __host__ __device__ inline int32_t cu_from_double<int32_t>(double v) {
  return v != v ? 0 : v >= 2147483647.0 ? INT32_MAX : v <= -2147483648.0 ? INT32_MIN : (int32_t)v;
}
template <> __host__ __device__ inline int64_t cu_from_double<int64_t>(double v) {
  return v != v ? 0 : v >= 9223372036854775807.0 ? INT64_MAX
       : v <= -9223372036854775808.0 ? INT64_MIN : (int64_t)v;
}
template <> __host__ __device__ inline uint8_t cu_from_double<uint8_t>(double v) {
  return v != v ? 0 : v >= 255.0 ? 255 : v <= 0 ? 0 : (uint8_t)v;
}

/* dtype conversion of copies (cpu.c's CVT1): floats saturate into integers, integers convert
 * plainly (wrapping like numpy's astype). bfloat16 goes through float32 both ways: from it exactly,
 * into it as float(x) rounded to nearest even (so int64 and float64 round twice, as on the CPU). */
template <class D, class S> __device__ inline D cu_cvt(S x) {
  if constexpr (std::is_same<D, S>::value) return x;   /* bits kept (a NaN's payload too) */
  else if constexpr (cu_is_bf16<S>) return cu_cvt<D, float>(__bfloat162float(x));
  else if constexpr (cu_is_bf16<D>) return cu_f2bf((float)x);
  else if constexpr (std::is_floating_point<S>::value) return cu_from_double<D>((double)x);
  else return (D)x;
}

/* ---------------------------------------------------------------- strided iteration */

/* Up to 4 tensors of one shape: size-1 dims dropped and dims that are contiguous in every operand
 * merged (like cpu_iter), so a contiguous case is one dim. Passed to kernels by value. */
template <int NOP> struct cu_iter {
  int nd;
  int contig;                  /* nd == 1 and every stride 1: offsets equal the index */
  int64_t numel;
  int64_t shape[FL_MAXDIM];
  int64_t st[NOP][FL_MAXDIM];
};

template <int NOP> static void cu_iter_init(cu_iter<NOP> *it, const fl_tensor *const *t) {
  const fl_tensor *t0 = t[0];
  it->numel = fl_tensor_numel(t0);
  int m = it->nd = fl_iter_shape(NOP, t, it->shape, it->st);
  it->contig = m == 1;
  for (int k = 0; k < NOP; k++)
    if (it->st[k][0] != 1) it->contig = 0;
}

/* Element offsets (in elements, from each operand's element 0) of flat index i, row-major.
 * IDX is uint32_t when numel fits (32-bit division is several times cheaper). */
template <class IDX, int NOP> __device__ inline void cu_offsets(const cu_iter<NOP> &it, IDX i, int64_t *off) {
#pragma unroll
  for (int k = 0; k < NOP; k++) off[k] = 0;
#pragma unroll
  for (int d = FL_MAXDIM - 1; d >= 0; d--) {
    if (d >= it.nd) continue;
    IDX s = (IDX)it.shape[d];
    IDX c = i % s;
    i /= s;
#pragma unroll
    for (int k = 0; k < NOP; k++) off[k] += (int64_t)c * it.st[k][d];
  }
}

template <int NOP, class IDX, class F> __global__ void cu_foreach_kernel(cu_iter<NOP> it, F f) {
  IDX n = (IDX)it.numel;
  IDX step = (IDX)gridDim.x * blockDim.x;
  IDX i = (IDX)blockIdx.x * blockDim.x + threadIdx.x;
  int64_t off[NOP];
  if (it.contig) {
    for (; i < n; i += step) {
#pragma unroll
      for (int k = 0; k < NOP; k++) off[k] = (int64_t)i;
      f(off);
    }
  } else {
    for (; i < n; i += step) {
      cu_offsets<IDX, NOP>(it, i, off);
      f(off);
    }
  }
}

/* Blocks for n work items: enough to fill the GPU several times, not more (grid-stride loops). */
static inline unsigned cu_grid(const cu_dev *d, int64_t n, int threads) {
  int64_t b = (n + threads - 1) / threads, cap = (int64_t)d->sm_count * 32;
  if (b > cap) b = cap;
  if (b < 1) b = 1;
  return (unsigned)b;
}

/* Runs f(off) for every element of the NOP tensors t (equal shapes) on t[0]'s device. */
template <int NOP, class F> static int cu_foreach(const char *op, const fl_tensor *const *t, F f) {
  cu_iter<NOP> it;
  cu_iter_init<NOP>(&it, t);
  if (it.numel == 0) return 0;
  cu_dev *d;
  if (cu_enter(op, t[0]->storage->device, &d)) return -1;
  unsigned g = cu_grid(d, it.numel, CU_THREADS);
  /* 32-bit indices need i + step to stay below 2^32 as well */
  if (it.numel + (int64_t)g * CU_THREADS < ((int64_t)1 << 32))
    cu_foreach_kernel<NOP, uint32_t, F><<<g, CU_THREADS, 0, d->stream>>>(it, f);
  else
    cu_foreach_kernel<NOP, uint64_t, F><<<g, CU_THREADS, 0, d->stream>>>(it, f);
  return cu_launched(op);
}

/* ---------------------------------------------------------------- shared kernels */

/* out[i] = alpha*out[i] + beta*src[i] over equal shapes (either strided; same device, same dtype:
 * float32, float64, or bfloat16 computed in float). Used to accumulate gradients into parameters'
 * layouts. */
int cu_axpby(const char *op, fl_tensor *out, double alpha, const fl_tensor *src, double beta);
/* dst = src (equal shapes; both on this backend and the same device; dtype converted) */
int cu_copy_dev(const char *op, fl_tensor *dst, const fl_tensor *src);
int cu_fill_dev(const char *op, fl_tensor *t, double v);

/* The nn kernels (struct fl_nn_ops of core/nn.h, gathered in cuda_device.cu), by family: nn_conv.cu,
 * nn_pool.cu, nn_norm.cu, nn_act.cu, nn_loss.cu, nn_optim.cu (shared helpers: nn_cuda.h).
 * nn_<name> has the type of the table's slot <name>. */
#define CU_NN_DECLARE(name) std::remove_pointer<decltype(fl_nn_ops::name)>::type nn_##name;
FL_NN_KERNELS(CU_NN_DECLARE)
/* cuDNN convolutions (conv_cudnn.cu): groups 1 for conv2d, C for depthwise. w_krsc is the filter in
 * cuDNN's KRSC order (K, R, S, C/groups) contiguous. */
int cu_conv_forward(const char *op, fl_tensor *y, const fl_tensor *x, const fl_tensor *w_krsc, int groups,
                    const fl_window *win);
int cu_conv_backward_data(const char *op, fl_tensor *gx, const fl_tensor *gy, const fl_tensor *w_krsc,
                          int groups, const fl_window *win);
int cu_conv_backward_filter(const char *op, fl_tensor *gw_krsc, const fl_tensor *x, const fl_tensor *gy,
                            int groups, const fl_window *win);

#endif
