/* CUDA devices: discovery, one context per device (stream, cuBLAS and cuDNN handles), status
 * messages, the caching allocator and its statistics, settings, and the backend table. */
#include "cuda_internal.h"

extern "C" {
#include "../pool.h"
}

#include <mutex>
#include <unordered_map>
#include <vector>
#include <stdio.h>
#include <string.h>

/* ---------------------------------------------------------------- settings */

int cu_allow_tf32 = 1, cu_benchmark = 0, cu_deterministic = 0;

extern "C" void fl_cuda_set_tf32(int allow) { cu_allow_tf32 = allow != 0; }
extern "C" int fl_cuda_get_tf32(void) { return cu_allow_tf32; }
extern "C" void fl_cuda_set_benchmark(int on) { cu_benchmark = on != 0; }
extern "C" int fl_cuda_get_benchmark(void) { return cu_benchmark; }
extern "C" void fl_cuda_set_deterministic(int on) { cu_deterministic = on != 0; }
extern "C" int fl_cuda_get_deterministic(void) { return cu_deterministic; }

/* ---------------------------------------------------------------- errors */

int cu_fail(const char *op, const char *what, cudaError_t e) {
  cudaGetLastError();   /* a non-sticky error must not resurface in the next, unrelated check */
  return fl_fail("%s: %s failed: %s (%s)", op, what, cudaGetErrorName(e), cudaGetErrorString(e));
}

static const char *blas_status_name(cublasStatus_t s) {
  switch (s) {
  case CUBLAS_STATUS_NOT_INITIALIZED: return "CUBLAS_STATUS_NOT_INITIALIZED";
  case CUBLAS_STATUS_ALLOC_FAILED: return "CUBLAS_STATUS_ALLOC_FAILED";
  case CUBLAS_STATUS_INVALID_VALUE: return "CUBLAS_STATUS_INVALID_VALUE";
  case CUBLAS_STATUS_ARCH_MISMATCH: return "CUBLAS_STATUS_ARCH_MISMATCH";
  case CUBLAS_STATUS_MAPPING_ERROR: return "CUBLAS_STATUS_MAPPING_ERROR";
  case CUBLAS_STATUS_EXECUTION_FAILED: return "CUBLAS_STATUS_EXECUTION_FAILED";
  case CUBLAS_STATUS_INTERNAL_ERROR: return "CUBLAS_STATUS_INTERNAL_ERROR";
  case CUBLAS_STATUS_NOT_SUPPORTED: return "CUBLAS_STATUS_NOT_SUPPORTED";
  case CUBLAS_STATUS_LICENSE_ERROR: return "CUBLAS_STATUS_LICENSE_ERROR";
  default: return "CUBLAS_STATUS_UNKNOWN";
  }
}

int cu_fail_blas(const char *op, const char *what, cublasStatus_t s) {
  cudaGetLastError();
  if (s == CUBLAS_STATUS_ALLOC_FAILED)
    return fl_fail_oom("%s: %s failed: %s (out of device memory for cuBLAS's workspace)", op, what,
                       blas_status_name(s));
  return fl_fail("%s: %s failed: %s", op, what, blas_status_name(s));
}

int cu_fail_dnn(const char *op, const char *what, cudnnStatus_t s) {
  cudaGetLastError();
  char detail[256];
  detail[0] = 0;
  cudnnGetLastErrorString(detail, sizeof detail);
  if (s == CUDNN_STATUS_ALLOC_FAILED)
    return fl_fail_oom("%s: %s failed: %s", op, what, cudnnGetErrorString(s));
  return fl_fail("%s: %s failed: %s%s%.200s", op, what, cudnnGetErrorString(s), detail[0] ? ": " : "", detail);
}

int cu_launched(const char *op) {
  cudaError_t e = cudaGetLastError();
  if (e != cudaSuccess) return fl_fail("%s: kernel launch failed: %s (%s)", op, cudaGetErrorName(e),
                                       cudaGetErrorString(e));
  return 0;
}

/* ---------------------------------------------------------------- devices */

static std::mutex dev_lock;
static cu_dev devs[CU_MAXDEV];
static int dev_count = -1;
static char dev_reason[256];

extern "C" int fl_cuda_device_count(void) {
  std::lock_guard<std::mutex> g(dev_lock);
  if (dev_count >= 0) return dev_count;
  int n = 0;
  cudaError_t e = cudaGetDeviceCount(&n);
  if (e == cudaErrorNoDevice) {
    snprintf(dev_reason, sizeof dev_reason, "no CUDA device: the driver reports none (cudaErrorNoDevice)");
    cudaGetLastError();
    n = 0;
  } else if (e == cudaErrorInsufficientDriver) {
    int rt = 0, drv = 0;
    cudaRuntimeGetVersion(&rt);
    cudaDriverGetVersion(&drv);
    if (drv == 0)
      snprintf(dev_reason, sizeof dev_reason, "no CUDA device: no NVIDIA driver is installed or loadable "
               "(cudaErrorInsufficientDriver)");
    else
      snprintf(dev_reason, sizeof dev_reason, "no CUDA device: the NVIDIA driver supports CUDA %d.%d, this build "
               "needs %d.%d (cudaErrorInsufficientDriver)", drv / 1000, drv % 1000 / 10, rt / 1000, rt % 1000 / 10);
    cudaGetLastError();
    n = 0;
  } else if (e != cudaSuccess) {
    snprintf(dev_reason, sizeof dev_reason, "no CUDA device: cudaGetDeviceCount: %s (%s)", cudaGetErrorName(e),
             cudaGetErrorString(e));
    cudaGetLastError();
    n = 0;
  } else if (n == 0) {
    snprintf(dev_reason, sizeof dev_reason, "no CUDA device: the driver reports 0 devices");
  }
  if (n > CU_MAXDEV) n = CU_MAXDEV;
  dev_count = n;
  return n;
}

extern "C" const char *fl_cuda_unavailable_reason(void) {
  if (fl_cuda_device_count() > 0) return "";
  return dev_reason;
}

extern "C" int fl_cuda_check_device(const char *op, int device) {
  int n = fl_cuda_device_count();
  if (n == 0) return fl_fail("%s: %s", op, dev_reason);
  if (device < 0 || device >= n)
    return fl_fail("%s: device %d does not exist (%d device%s: 0..%d)", op, device, n, n == 1 ? "" : "s", n - 1);
  return 0;
}

int cu_enter(const char *op, int device, cu_dev **out) {
  if (fl_cuda_check_device(op, device)) return -1;
  cu_dev *d = &devs[device];
  CU_TRY(op, cudaSetDevice(device));
  if (!d->ready) {
    std::lock_guard<std::mutex> g(dev_lock);
    if (!d->ready) {
      cudaDeviceProp p;
      CU_TRY(op, cudaGetDeviceProperties(&p, device));
      CU_TRY(op, cudaStreamCreateWithFlags(&d->stream, cudaStreamNonBlocking));
      d->index = device;
      d->sm_count = p.multiProcessorCount > 0 ? p.multiProcessorCount : 1;
      d->cc_major = p.major;
      d->cc_minor = p.minor;
      d->ready = 1;
    }
  }
  *out = d;
  return 0;
}

int cu_blas(const char *op, cu_dev *d) {
  if (d->blas) return 0;
  std::lock_guard<std::mutex> g(dev_lock);
  if (d->blas) return 0;
  cublasHandle_t h;
  CUBLAS_TRY(op, cublasCreate(&h));
  cublasStatus_t s = cublasSetStream(h, d->stream);
  if (s != CUBLAS_STATUS_SUCCESS) { cublasDestroy(h); return cu_fail_blas(op, "cublasSetStream", s); }
  d->blas = h;
  return 0;
}

int cu_dnn(const char *op, cu_dev *d) {
  if (d->dnn) return 0;
  std::lock_guard<std::mutex> g(dev_lock);
  if (d->dnn) return 0;
  cudnnHandle_t h;
  CUDNN_TRY(op, cudnnCreate(&h));
  cudnnStatus_t s = cudnnSetStream(h, d->stream);
  if (s != CUDNN_STATUS_SUCCESS) { cudnnDestroy(h); return cu_fail_dnn(op, "cudnnSetStream", s); }
  d->dnn = h;
  return 0;
}

extern "C" int fl_cuda_device_name(int device, char *buf, size_t n) {
  if (fl_cuda_check_device("cuda.device_name", device)) return -1;
  cudaDeviceProp p;
  CU_TRY("cuda.device_name", cudaGetDeviceProperties(&p, device));
  snprintf(buf, n, "%s (sm_%d%d, %.1f GiB)", p.name, p.major, p.minor, (double)p.totalGlobalMem / (1 << 30));
  return 0;
}

extern "C" int fl_cuda_synchronize(int device) {
  cu_dev *d;
  if (cu_enter("cuda.synchronize", device, &d)) return -1;
  CU_TRY("cuda.synchronize", cudaStreamSynchronize(d->stream));
  return 0;
}

/* ---------------------------------------------------------------- caching allocator */

/* Device memory comes from a pool per device (core/pool.h): blocks carved out of cudaMalloc'd
 * segments, best fit, split and merged, so memory freed by one size serves others. (Caching exact
 * sizes instead, ResNet50's training at batch 128 reserved 19.6 GB for a peak of 10.4 GB in use:
 * every size in flight kept blocks of its own.) All work is queued on the device's one compute
 * stream, so a block freed while kernels still read it can be handed out again at once: the next
 * user's kernels are queued behind them. Segments go back to the driver only after the device has
 * finished (empty_cache, or an allocation that failed and is retried). */
typedef struct {
  std::mutex lock;
  int device;
  fl_pool *blocks;            /* NULL until the first allocation; it counts the bytes (fl_pool_stats) */
  cudaError_t seg_error;      /* why the last cudaMalloc failed */
  fl_cuda_memstats st = {};   /* the call counts. `new cu_pool[n]` would leave a plain member
                                 uninitialized: the statistics then started from heap garbage */
} cu_pool;

/* Allocated once and never destroyed: tensors collected by a Lua state closed late in process exit
 * still find their pool (a static object's destructor might already have run). */
static cu_pool *pool_of(int device) {
  static cu_pool *pools = [] {
    cu_pool *a = new cu_pool[CU_MAXDEV];
    for (int i = 0; i < CU_MAXDEV; i++) { a[i].device = i; a[i].blocks = NULL; a[i].seg_error = cudaSuccess; }
    return a;
  }();
  return &pools[device];
}

/* the pool's segments: cudaMalloc / cudaFree on the pool's device (its lock held) */
static void *seg_alloc(void *ctx, size_t bytes) {
  cu_pool *p = (cu_pool *)ctx;
  void *ptr = NULL;
  cudaError_t e = cudaSetDevice(p->device);
  if (e == cudaSuccess) e = cudaMalloc(&ptr, bytes);
  if (e != cudaSuccess) {
    cudaGetLastError();
    p->seg_error = e;
    return NULL;
  }
  p->st.num_cuda_malloc++;
  return ptr;
}

static void seg_free(void *ctx, void *base, size_t bytes) {
  cu_pool *p = (cu_pool *)ctx;
  cudaSetDevice(p->device);
  cudaFree(base);
  cudaGetLastError();
  p->st.num_cuda_free++;
  (void)bytes;
}

/* Returns the wholly free segments of pool p to the driver. Caller holds p->lock. A block freed by
 * a tensor may still be read by a kernel queued before the free: wait for the device first. */
static void pool_release_cached(cu_pool *p) {
  if (!p->blocks) return;
  cudaSetDevice(p->device);
  cudaDeviceSynchronize();
  fl_pool_release(p->blocks);
  cudaGetLastError();
}

static void fmt_bytes(char *buf, size_t n, double b) {
  if (b >= (double)(1 << 30)) snprintf(buf, n, "%.2f GiB", b / (1 << 30));
  else if (b >= (double)(1 << 20)) snprintf(buf, n, "%.1f MiB", b / (1 << 20));
  else snprintf(buf, n, "%.0f bytes", b);
}

static void alloc_failed(const char *op, cu_pool *p, size_t nbytes) {
  p->st.num_oom++;
  cudaError_t e = p->seg_error;
  size_t fr = 0, tot = 0;
  cudaMemGetInfo(&fr, &tot);
  cudaGetLastError();
  char a[32], f[32], t[32], l[32];
  fmt_bytes(a, sizeof a, (double)nbytes);
  fmt_bytes(f, sizeof f, (double)fr);
  fmt_bytes(t, sizeof t, (double)tot);
  fl_pool_stats ps = {};
  if (p->blocks) fl_pool_get_stats(p->blocks, &ps);
  fmt_bytes(l, sizeof l, (double)ps.allocated);
  if (e == cudaErrorMemoryAllocation)
    fl_fail_oom("%s: out of memory on cuda:%d: asked for %s, the device has %s free of %s "
                "(%s held by live tensors; the cache was emptied and the allocation retried)",
                op, p->device, a, f, t, l);
  else if (e != cudaSuccess)
    fl_fail("%s: cudaMalloc of %s on cuda:%d failed: %s (%s)", op, a, p->device, cudaGetErrorName(e),
            cudaGetErrorString(e));
  else
    fl_fail_oom("%s: out of host memory for the allocator's bookkeeping (asked for %s on cuda:%d)", op, a,
                p->device);
}

void *cu_malloc(const char *op, int device, size_t nbytes) {
  if (fl_cuda_check_device(op, device)) return NULL;
  if (!fl_pool_round(nbytes)) {
    fl_fail_oom("%s: cannot allocate %zu bytes on cuda:%d (too large)", op, nbytes, device);
    return NULL;
  }
  cu_pool *p = pool_of(device);
  std::lock_guard<std::mutex> g(p->lock);
  p->st.num_alloc++;
  if (!p->blocks && !(p->blocks = fl_pool_new(seg_alloc, seg_free, p))) {
    p->seg_error = cudaSuccess;
    alloc_failed(op, p, nbytes);
    return NULL;
  }
  int fresh = 0;
  p->seg_error = cudaSuccess;
  void *ptr = fl_pool_alloc(p->blocks, nbytes, NULL, &fresh);
  if (!ptr) {
    /* free segments the request did not fit may be what is missing: give them back, try once more */
    pool_release_cached(p);
    ptr = fl_pool_alloc(p->blocks, nbytes, NULL, &fresh);
  }
  if (!ptr) {
    alloc_failed(op, p, nbytes);
    return NULL;
  }
  if (!fresh) p->st.num_cache_hits++;
  return ptr;
}

void cu_free(int device, void *ptr) {
  if (!ptr || device < 0 || device >= CU_MAXDEV) return;
  cu_pool *p = pool_of(device);
  std::lock_guard<std::mutex> g(p->lock);
  /* the pool ignores a pointer that is not one of its blocks in use */
  if (p->blocks && fl_pool_free(p->blocks, ptr)) p->st.num_free++;
}

/* ---------------------------------------------------------------- page-locked host memory */

/* Blocks from cudaHostAlloc (portable: any device may read them), each with the event of the last
 * asynchronous copy that reads it (cu_host_record, from copy_async). The loader decodes batches
 * into such blocks; before a block is refilled (host_wait) or handed out again from the cache
 * (host_alloc) that event is waited for, so a batch still being copied is never overwritten. The
 * tables are allocated once and never destroyed, as the pools. */
typedef struct {
  size_t size;
  cudaEvent_t ev;       /* NULL until the first copy */
  int ev_dev;           /* the device ev belongs to (an event is recorded on its own device's streams) */
} cu_pinned;

static std::mutex pin_lock;
static std::unordered_map<const void *, cu_pinned> &pinned_blocks(void) {
  static auto *m = new std::unordered_map<const void *, cu_pinned>;
  return *m;
}

/* Freed blocks wait here, by size, for the next batch of that size: cudaHostAlloc and cudaFreeHost
 * each synchronize the device, so a loader that allocated and freed a pinned batch per step made
 * train.fit slower than with pageable batches (1506 against 2191 img/s, ResNet50 on an H100).
 * flower.cuda.empty_cache() gives them back. */
static std::unordered_map<size_t, std::vector<void *>> &pinned_free(void) {
  static auto *m = new std::unordered_map<size_t, std::vector<void *>>;
  return *m;
}

static int host_wait(const void *p) {
  cudaEvent_t ev = nullptr;
  {
    std::lock_guard<std::mutex> g(pin_lock);
    auto it = pinned_blocks().find(p);
    if (it == pinned_blocks().end()) return 0;
    ev = it->second.ev;
  }
  if (ev) CU_TRY("cuda pinned host memory (waiting for its copy)", cudaEventSynchronize(ev));
  return 0;
}

static void *host_alloc(size_t nbytes) {
  const char *op = "cuda pinned host memory";
  void *p = NULL;
  {
    std::lock_guard<std::mutex> g(pin_lock);
    auto it = pinned_free().find(nbytes);
    if (it != pinned_free().end() && !it->second.empty()) {
      p = it->second.back();
      it->second.pop_back();
    }
  }
  if (p) {   /* its last upload may still be reading it */
    if (host_wait(p) == 0) return p;
    std::lock_guard<std::mutex> g(pin_lock);
    pinned_free()[nbytes].push_back(p);
    return NULL;
  }
  if (fl_cuda_check_device(op, 0)) return NULL;
  cudaError_t e = cudaHostAlloc(&p, nbytes, cudaHostAllocPortable);
  if (e != cudaSuccess) {
    if (e == cudaErrorMemoryAllocation) {
      cudaGetLastError();
      fl_fail_oom("%s: cudaHostAlloc of %zu bytes failed (page-locked memory is limited)", op, nbytes);
    } else {
      cu_fail(op, "cudaHostAlloc", e);
    }
    return NULL;
  }
  std::lock_guard<std::mutex> g(pin_lock);
  pinned_blocks()[p] = cu_pinned{nbytes, nullptr, -1};
  return p;
}

/* to the cache; host_alloc waits for the block's last upload before handing it out again */
static void host_free(void *p) {
  std::lock_guard<std::mutex> g(pin_lock);
  auto it = pinned_blocks().find(p);
  if (it == pinned_blocks().end()) return;   /* not ours: never hand it to cudaFreeHost blindly */
  pinned_free()[it->second.size].push_back(p);
}

/* every cached pinned block back to the driver (flower.cuda.empty_cache) */
static void host_release_cached(void) {
  std::lock_guard<std::mutex> g(pin_lock);
  for (auto &kv : pinned_free()) {
    for (void *p : kv.second) {
      auto it = pinned_blocks().find(p);
      if (it != pinned_blocks().end()) {
        if (it->second.ev) {
          cudaEventSynchronize(it->second.ev);   /* a copy may still read the block */
          cudaEventDestroy(it->second.ev);
        }
        pinned_blocks().erase(it);
      }
      cudaFreeHost(p);
    }
    kv.second.clear();
  }
  pinned_free().clear();
  cudaGetLastError();   /* nothing to report; the next checked call must not see this */
}

int cu_host_record(const char *op, const void *p, cu_dev *d, cudaStream_t s, int *known) {
  std::lock_guard<std::mutex> g(pin_lock);
  *known = 0;
  auto it = pinned_blocks().find(p);
  if (it == pinned_blocks().end()) return 0;
  cu_pinned &b = it->second;
  if (b.ev && b.ev_dev != d->index) {   /* last read by another device: wait, then start over here */
    CU_TRY(op, cudaEventSynchronize(b.ev));
    cudaEventDestroy(b.ev);
    b.ev = nullptr;
  }
  if (!b.ev) {
    CU_TRY(op, cudaEventCreateWithFlags(&b.ev, cudaEventDisableTiming));
    b.ev_dev = d->index;
  }
  CU_TRY(op, cudaEventRecord(b.ev, s));
  *known = 1;
  return 0;
}

static void *backend_alloc(int device, size_t nbytes) { return cu_malloc("cuda", device, nbytes); }
static void backend_free(int device, void *p) { cu_free(device, p); }

extern "C" int fl_cuda_memory_stats(int device, fl_cuda_memstats *out) {
  if (fl_cuda_check_device("cuda.memory_stats", device)) return -1;
  cu_pool *p = pool_of(device);
  {
    std::lock_guard<std::mutex> g(p->lock);
    *out = p->st;
    fl_pool_stats ps = {};
    if (p->blocks) fl_pool_get_stats(p->blocks, &ps);
    out->allocated = ps.allocated;
    out->requested = ps.requested;
    out->reserved = ps.reserved;
    out->peak_allocated = ps.peak_allocated;
    out->peak_reserved = ps.peak_reserved;
    out->live_blocks = ps.live_blocks;
    out->segments = ps.segments;
    out->free_blocks = ps.free_blocks;
    out->largest_free = ps.largest_free;
  }
  out->cached = out->reserved - out->allocated;
  size_t fr = 0, tot = 0;
  CU_TRY("cuda.memory_stats", cudaSetDevice(device));
  CU_TRY("cuda.memory_stats", cudaMemGetInfo(&fr, &tot));
  out->device_free = fr;
  out->device_total = tot;
  return 0;
}

extern "C" void fl_cuda_reset_peak(int device) {
  if (device < 0 || device >= CU_MAXDEV) return;
  cu_pool *p = pool_of(device);
  std::lock_guard<std::mutex> g(p->lock);
  if (p->blocks) fl_pool_reset_peak(p->blocks);
}

extern "C" int fl_cuda_empty_cache(void) {
  int n = fl_cuda_device_count();
  for (int i = 0; i < n; i++)
    if (cu_async_release(i)) return -1;   /* the landing buffers of asynchronous copies go back too */
  host_release_cached();
  for (int i = 0; i < n; i++) {
    cu_pool *p = pool_of(i);
    std::lock_guard<std::mutex> g(p->lock);
    if (!p->blocks) continue;
    CU_TRY("cuda.empty_cache", cudaSetDevice(i));
    CU_TRY("cuda.empty_cache", cudaDeviceSynchronize());
    pool_release_cached(p);
  }
  return 0;
}

int cu_tmp::init(const char *op, int dev, fl_dtype dt, int ndim, const int64_t *shape) {
  int64_t n = 1;
  for (int i = 0; i < ndim; i++) n *= shape[i];
  size_t nbytes = (size_t)n * fl_dtype_size(dt);
  if (buf.get(op, dev, nbytes)) return -1;
  memset(&st, 0, sizeof st);
  st.refcount = 1;
  st.data = buf.p;
  st.nbytes = nbytes;
  st.backend = fl_cuda_backend();
  st.device = dev;
  memset(&t, 0, sizeof t);
  t.storage = &st;
  t.ndim = ndim;
  t.dtype = dt;
  for (int i = 0; i < ndim; i++) t.shape[i] = shape[i];
  fl_contiguous_strides(ndim, t.shape, t.stride);
  return 0;
}

/* ---------------------------------------------------------------- the table */

int cu_backend_copy(fl_tensor *dst, const fl_tensor *src);
int cu_backend_copy_async(fl_tensor *dst, const fl_tensor *src);
int cu_backend_fill(fl_tensor *t, double value);
int cu_backend_binary(fl_binop op, fl_tensor *out, const fl_tensor *a, const fl_tensor *b);
int cu_backend_unary(fl_unop op, fl_tensor *out, const fl_tensor *a, double p0, double p1);
int cu_backend_reduce(fl_redop op, fl_tensor *out, const fl_tensor *a, int dim, int correction);
int cu_backend_where(fl_tensor *out, const fl_tensor *mask, const fl_tensor *a, const fl_tensor *b);
int cu_backend_matmul(fl_tensor *out, const fl_tensor *a, const fl_tensor *b, double alpha, double beta);
int cu_backend_softmax(fl_tensor *out, const fl_tensor *a, int dim, int log);
int cu_backend_rng(fl_tensor *out, fl_rngkind kind, uint64_t seed, uint64_t offset, double p0, double p1);

/* Filled by field name so a reordered or extended table still builds correctly. */
static struct fl_nn_ops make_nn(void) {
  struct fl_nn_ops t;
  memset(&t, 0, sizeof t);
#define CU_NN_SLOT(name) t.name = nn_##name;
  FL_NN_KERNELS(CU_NN_SLOT)
#undef CU_NN_SLOT
  return t;
}

static fl_backend make_backend(void) {
  fl_backend b;
  memset(&b, 0, sizeof b);
  b.name = "cuda";
  b.device_count = fl_cuda_device_count;
  b.unavailable_reason = fl_cuda_unavailable_reason;
  b.alloc = backend_alloc;
  b.free = backend_free;
  b.copy = cu_backend_copy;
  b.fill = cu_backend_fill;
  b.binary = cu_backend_binary;
  b.unary = cu_backend_unary;
  b.reduce = cu_backend_reduce;
  b.where = cu_backend_where;
  b.matmul = cu_backend_matmul;
  b.softmax = cu_backend_softmax;
  b.rng = cu_backend_rng;
  static const struct fl_nn_ops nn = make_nn();
  b.nn = &nn;
  b.host_alloc = host_alloc;
  b.host_free = host_free;
  b.host_wait = host_wait;
  b.copy_async = cu_backend_copy_async;
  return b;
}

extern "C" const fl_backend *fl_cuda_backend(void) {
  static const fl_backend table = make_backend();
  return &table;
}
