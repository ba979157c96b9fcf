/* The CUDA backend's face to C: plain C, no CUDA types, so bindings and tests include it without
 * nvcc. Exists only in a `make CUDA=1` build (FLOWER_CUDA defined); the implementation is in
 * the .cu files of core/cuda/.
 *
 * Tensors live on a device: storage->backend == fl_cuda_backend(), storage->device the device index.
 * Every kernel runs on one stream per device, so work is ordered and memory returned to the caching
 * allocator can be reused at once. Copies to the host wait for the stream; nothing else does.
 * Errors follow the core's rule: -1 and a message in fl_errmsg() naming the operation, e.g.
 * "cuda matmul: cublasSgemmStridedBatched failed: CUBLAS_STATUS_EXECUTION_FAILED". */
#ifndef FLOWER_CUDA_BACKEND_H
#define FLOWER_CUDA_BACKEND_H

#include <stddef.h>
#include <stdint.h>
#include "../backend.h"

#ifdef __cplusplus
extern "C" {
#endif

/* The backend table (the same pointer for the life of the process). Its `nn` field points at the
 * cuDNN-backed nn kernels. Using it with no device present gives errors, never crashes. */
const fl_backend *fl_cuda_backend(void);

/* Number of usable devices; 0 when there is no driver, no device, or the runtime fails to start
 * (never an error). fl_cuda_unavailable_reason() says why when it is 0. */
int fl_cuda_device_count(void);
const char *fl_cuda_unavailable_reason(void);
/* "NVIDIA H100 80GB HBM3 (sm_90, 79.1 GiB)"; -1 with a message for a bad index. */
int fl_cuda_device_name(int device, char *buf, size_t n);
/* -1 with a message naming `op` unless 0 <= device < fl_cuda_device_count(). */
int fl_cuda_check_device(const char *op, int device);

/* ---- caching allocator ----
 * Device memory comes in blocks (sizes rounded up to 512 bytes) carved out of cudaMalloc'd segments
 * (core/pool.h): best fit, split, and merged with free neighbours when freed, so a training loop
 * reaches a steady state with no cudaMalloc/cudaFree per step and memory freed by one size serves
 * others. When cudaMalloc fails the allocator returns every wholly free segment of that device to the
 * driver and tries once more; only then does allocation fail, with a message saying how much was
 * asked for and how much the device has free (the process stays usable). empty_cache returns the
 * wholly free segments: a segment holding any live block stays, with its free parts (`cached`). */
typedef struct fl_cuda_memstats {
  uint64_t allocated;        /* bytes in live blocks (rounded sizes) */
  uint64_t requested;        /* bytes asked for by live allocations (before rounding) */
  uint64_t reserved;         /* bytes obtained from cudaMalloc: live + cached */
  uint64_t cached;           /* reserved - allocated: free blocks kept for reuse */
  uint64_t peak_allocated;   /* highest `allocated` since start or fl_cuda_reset_peak */
  uint64_t peak_reserved;
  uint64_t device_free, device_total;   /* cudaMemGetInfo */
  uint64_t num_alloc, num_free;         /* allocator calls */
  uint64_t num_cache_hits;              /* allocations served from segments already held */
  uint64_t num_cuda_malloc, num_cuda_free;
  uint64_t num_oom;                     /* allocations that failed */
  uint64_t live_blocks;                 /* blocks in use */
  uint64_t segments;                    /* cudaMalloc'd segments held */
  uint64_t free_blocks, largest_free;   /* free parts of the segments (fragmentation), the largest */
} fl_cuda_memstats;

int fl_cuda_memory_stats(int device, fl_cuda_memstats *st);
void fl_cuda_reset_peak(int device);
/* Waits for every device's stream and returns all cached (free) blocks to the driver. */
int fl_cuda_empty_cache(void);
/* Waits until every queued kernel on the device has finished; reports asynchronous errors. */
int fl_cuda_synchronize(int device);

/* ---- settings (process-wide) ----
 * TF32: float32 GEMMs and convolutions may use TF32 tensor cores (10-bit mantissa inputs, float32
 * accumulation): results then differ from float32 by about 1e-3 relative. On by default, like
 * cuDNN's own default; tests comparing with the CPU at 1e-4 turn it off.
 * Benchmark: the first convolution of each shape times the candidate cuDNN engines and keeps the
 * fastest (cached per shape); off: the heuristic's first choice. Off by default.
 * Deterministic: skip cuDNN engines marked non-deterministic. Off by default. */
void fl_cuda_set_tf32(int allow);
int fl_cuda_get_tf32(void);
void fl_cuda_set_benchmark(int on);
int fl_cuda_get_benchmark(void);
void fl_cuda_set_deterministic(int on);
int fl_cuda_get_deterministic(void);
/* Number of cached cuDNN execution plans (one per convolution shape and direction), and of
 * convolution calls that found no cuDNN engine and ran the direct (slow) kernels instead. */
int fl_cuda_conv_plan_count(void);
int fl_cuda_conv_fallback_count(void);
/* The largest workspace (bytes) among the cached plans: allocated for the call's duration. */
int64_t fl_cuda_conv_max_workspace(void);

/* ---- fused optimizer steps over many tensors (one launch per 32 tensors) ----
 * Exactly the per-tensor kernels of core/nn.h (fl_nn_ops.adam_step / sgd_step, Keras's formulas),
 * applied to n parameters at once: w[i], g[i], m[i], v[i] contiguous, on one device, one float dtype,
 * equal element counts per i.
 *   Adam: m += (g-m)*(1-beta1); v += (g^2-v)*(1-beta2); w -= alpha*m/(sqrt(v)+eps)
 *         (the caller passes alpha = lr*sqrt(1-beta2^t)/(1-beta1^t))
 *   SGD:  without momentum (m NULL, or m[i] NULL) w -= lr*g; with it m = momentum*m - lr*g, then w += m,
 *         or for Nesterov w += momentum*m - lr*g. */
int fl_cuda_adam_step_multi(int n, fl_tensor *const *w, const fl_tensor *const *g, fl_tensor *const *m,
                            fl_tensor *const *v, double alpha, double beta1, double beta2, double eps);
int fl_cuda_sgd_step_multi(int n, fl_tensor *const *w, const fl_tensor *const *g, fl_tensor *const *m, double lr,
                           double momentum, int nesterov);

#ifdef __cplusplus
}
#endif

#endif
