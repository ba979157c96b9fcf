/* The CPU backend: host memory, the strided iterator every kernel uses, copy/convert and fill.
 * Kernels live in elementwise.c, reduce.c, blas.c and random.c. */
#include "cpu.h"
#include "../ops.h"

#include <cblas.h>
#include <omp.h>
#include <stdlib.h>
#include <string.h>
#include <pthread.h>
#include <sys/mman.h>
#include <unistd.h>

/* ---------------------------------------------------------------- memory */

/* Physical memory: a request above it fails at once instead of being granted by overcommit and
 * killing the process later (or tripping the sanitizer's allocator). */
static size_t phys_bytes(void) {
  static size_t cached;
  if (!cached) {
    long pages = sysconf(_SC_PHYS_PAGES), psz = sysconf(_SC_PAGESIZE);
    cached = pages > 0 && psz > 0 ? (size_t)pages * (size_t)psz : (size_t)1 << 40;
  }
  return cached;
}

/* Host blocks carry a 64-byte header holding their size class, so that `free` knows it.
 *
 * Blocks of 1 MB and more are size-rounded to 64 KB, mapped with mmap of their own and, once freed,
 * kept in a cache for later requests: training loops and inference ask for the same sizes over and
 * over, and a fresh block costs a page fault per 4 KB page on first touch (the kernel zeroes it),
 * which for element-wise ops on new outputs took longer than the arithmetic.
 *
 * Cached blocks are resident memory, so the cache is shaped to keep the process's peak resident
 * size near the peak of what is live (ResNet50 inference at batch 32: 0.8x PyTorch's peak with an
 * exact-size cache that kept every size it had seen, about 0.4x with this one):
 * - A request takes the cached block of its own class, else the smallest cached one of at most
 *   twice its size (a layer with half the activations of the one before reuses that layer's
 *   blocks instead of mapping new memory while those sit idle).
 * - Before mapping a new block, cached blocks of at least the request's size are given back to
 *   the system (least recently cached first), so that the resident total (live + cached) grows
 *   only when what is live does.
 * - It holds at most CACHE_SLOTS blocks and an eighth of RAM (2 GB at most), is flushed when an
 *   allocation fails, and is off under AddressSanitizer (blocks then come from malloc) so that the
 *   sanitizer still sees use-after-free.
 * Own mappings rather than malloc's, because glibc serves blocks below its (rising, up to 32 MB)
 * mmap threshold from the heap, where a freed block stays resident. Blocks of 4 MB and more are
 * marked for transparent huge pages, as numpy does. */
#define HEADER 64
#define HUGE_PAGE ((size_t)2 << 20)
#define CACHE_MIN ((size_t)1 << 20)
#define GRANULE ((size_t)64 << 10)
#define CACHE_SLOTS 1024

#if defined(__SANITIZE_ADDRESS__)
#define CACHE_ON 0
#else
#define CACHE_ON 1
#endif

static struct { char *raw; size_t cls; } cache[CACHE_SLOTS];   /* least recently cached first */
static int ncache;
static size_t cached_bytes;
/* host bytes in blocks handed out (size classes), and the peak of those plus the cache: what the
 * allocator holds resident at most (flower.memory() reports them) */
static size_t used_bytes, peak_bytes;
static pthread_mutex_t cache_lock = PTHREAD_MUTEX_INITIALIZER;

static size_t cache_budget(void) {
  size_t b = phys_bytes() / 8;
  return b < ((size_t)2 << 30) ? b : (size_t)2 << 30;
}

static size_t size_class(size_t nbytes) {
  if (nbytes < CACHE_MIN) return (nbytes + 63) & ~(size_t)63;
  return (nbytes + GRANULE - 1) & ~(GRANULE - 1);
}

/* blocks of a cacheable class are their own mappings (with the cache on) */
static int is_mapped(size_t cls) { return CACHE_ON && cls >= CACHE_MIN; }
static size_t map_len(size_t cls) { return HEADER + cls; }

static void block_unmap(char *raw) { munmap(raw, map_len(*(size_t *)raw)); }

/* called with the lock held */
static void note_used(size_t cls, int sign) {
  if (sign > 0) used_bytes += cls; else used_bytes -= cls;
  if (used_bytes + cached_bytes > peak_bytes) peak_bytes = used_bytes + cached_bytes;
}

static void cache_remove(int i) {
  cached_bytes -= cache[i].cls;
  memmove(&cache[i], &cache[i + 1], sizeof cache[0] * (size_t)(ncache - 1 - i));
  ncache--;
}

/* A cached block for class `cls` (see above), or NULL; then `evict` gets the blocks to unmap before
 * mapping a new one (*nev of them). Called with the lock not held. */
static char *cache_take(size_t cls, char **evict, int *nev) {
  char *raw = NULL;
  *nev = 0;
  pthread_mutex_lock(&cache_lock);
  int best = -1;
  for (int i = ncache - 1; i >= 0; i--) {
    size_t c = cache[i].cls;
    if (c == cls) { best = i; break; }
    if (c > cls && c / 2 <= cls && (best < 0 || c < cache[best].cls)) best = i;
  }
  if (best >= 0) {
    raw = cache[best].raw;
    cache_remove(best);
    note_used(*(size_t *)raw, +1);
  } else {
    size_t freed = 0;
    while (ncache > 0 && freed < cls) {
      freed += cache[0].cls;
      evict[(*nev)++] = cache[0].raw;
      cache_remove(0);
    }
  }
  pthread_mutex_unlock(&cache_lock);
  return raw;
}

void fl_cpu_memory_stats(size_t *used, size_t *cached, size_t *peak, int reset_peak) {
  pthread_mutex_lock(&cache_lock);
  if (reset_peak) peak_bytes = used_bytes + cached_bytes;
  if (used) *used = used_bytes;
  if (cached) *cached = cached_bytes;
  if (peak) *peak = peak_bytes;
  pthread_mutex_unlock(&cache_lock);
}

void fl_cpu_release_cache(void) {
  pthread_mutex_lock(&cache_lock);
  for (int i = 0; i < ncache; i++) block_unmap(cache[i].raw);
  ncache = 0;
  cached_bytes = 0;
  pthread_mutex_unlock(&cache_lock);
}

static char *block_new(size_t cls) {
  if (!is_mapped(cls)) {
    void *p = NULL;
    return posix_memalign(&p, 64, HEADER + cls) ? NULL : p;
  }
  void *p = mmap(NULL, map_len(cls), PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (p == MAP_FAILED) return NULL;
  char *raw = p;
  if (cls >= 2 * HUGE_PAGE) {   /* the 2 MB-aligned interior */
    uintptr_t lo = ((uintptr_t)raw + HUGE_PAGE - 1) & ~(uintptr_t)(HUGE_PAGE - 1);
    uintptr_t hi = ((uintptr_t)raw + HEADER + cls) & ~(uintptr_t)(HUGE_PAGE - 1);
    if (hi > lo) madvise((void *)lo, hi - lo, MADV_HUGEPAGE);
  }
  return raw;
}

static void *cpu_alloc(int device, size_t nbytes) {
  (void)device;
  if (nbytes > phys_bytes()) return NULL;
  size_t cls = size_class(nbytes);
  char *raw = NULL;
  if (is_mapped(cls)) {
    char *evict[CACHE_SLOTS];
    int nev;
    raw = cache_take(cls, evict, &nev);
    for (int i = 0; i < nev; i++) block_unmap(evict[i]);
    if (raw) return raw + HEADER;   /* its header keeps its own class */
  }
  raw = block_new(cls);
  if (!raw) {
    fl_cpu_release_cache();     /* the cache may hold what we need */
    if (!(raw = block_new(cls))) return NULL;
  }
  *(size_t *)raw = cls;
  pthread_mutex_lock(&cache_lock);
  note_used(cls, +1);
  pthread_mutex_unlock(&cache_lock);
  return raw + HEADER;
}

static void cpu_free(int device, void *p) {
  (void)device;
  if (!p) return;
  char *raw = (char *)p - HEADER;
  size_t cls = *(size_t *)raw;
  size_t budget = cache_budget();
  pthread_mutex_lock(&cache_lock);
  note_used(cls, -1);
  if (!is_mapped(cls) || cls > budget / 4) {
    pthread_mutex_unlock(&cache_lock);
    if (is_mapped(cls)) block_unmap(raw); else free(raw);
    return;
  }
  char *evict[CACHE_SLOTS];
  int nev = 0;
  while (ncache > 0 && (ncache == CACHE_SLOTS || cached_bytes + cls > budget)) {
    evict[nev++] = cache[0].raw;
    cache_remove(0);
  }
  cache[ncache].raw = raw;
  cache[ncache].cls = cls;
  ncache++;
  cached_bytes += cls;
  pthread_mutex_unlock(&cache_lock);
  for (int i = 0; i < nev; i++) block_unmap(evict[i]);
}

/* ---------------------------------------------------------------- threads */

static int num_threads;   /* 0 until first asked: then OpenMP's default (OMP_NUM_THREADS or cores) */

void fl_set_num_threads(int n) {
  if (n < 1) n = 1;
  num_threads = n;
  omp_set_num_threads(n);
  openblas_set_num_threads(n);
}

int fl_get_num_threads(void) {
  if (num_threads == 0) num_threads = omp_get_max_threads();
  return num_threads;
}

int cpu_nthreads(int64_t work, int64_t grain) {
  int n = fl_get_num_threads();
  if (n <= 1 || work < grain || omp_in_parallel()) return 1;
  int64_t chunks = work / grain;
  return chunks < n ? (int)chunks : n;
}

/* ---------------------------------------------------------------- iterator */

void cpu_iter_init(cpu_iter *it, int nop, const fl_tensor *const *t) {
  const fl_tensor *t0 = t[0];
  it->nop = nop;
  it->numel = fl_tensor_numel(t0);
  for (int k = 0; k < nop; k++) {
    it->base[k] = fl_tensor_data(t[k]);
    it->esz[k] = (int64_t)fl_dtype_size(t[k]->dtype);
  }
  /* drop size-1 dims */
  int nd = 0;
  for (int i = 0; i < t0->ndim; i++) {
    if (t0->shape[i] == 1) continue;
    it->shape[nd] = t0->shape[i];
    for (int k = 0; k < nop; k++) it->st[k][nd] = t[k]->stride[i];
    nd++;
  }
  if (nd == 0) {   /* a single element */
    it->shape[0] = 1;
    for (int k = 0; k < nop; k++) it->st[k][0] = 0;
    nd = 1;
  }
  /* merge dim i into i+1 when every operand steps through them as one: right to left */
  int out = nd - 1;
  for (int i = nd - 2; i >= 0; i--) {
    int ok = 1;
    for (int k = 0; k < nop; k++)
      if (it->st[k][i] != it->st[k][out] * it->shape[out]) { ok = 0; break; }
    if (ok) {
      it->shape[out] *= it->shape[i];
    } else {
      out--;
      it->shape[out] = it->shape[i];
      for (int k = 0; k < nop; k++) it->st[k][out] = it->st[k][i];
    }
  }
  /* shift the merged dims [out, nd) down to [0, nd - out) */
  int m = nd - out;
  for (int i = 0; i < m; i++) {
    it->shape[i] = it->shape[out + i];
    for (int k = 0; k < nop; k++) it->st[k][i] = it->st[k][out + i];
  }
  it->nd = m;
}

void cpu_iter_range(const cpu_iter *it, int64_t start, int64_t end, cpu_rowfn fn, void *ctx) {
  if (start >= end) return;
  int nd = it->nd, nop = it->nop;
  int64_t idx[FL_MAXDIM];
  char *p[CPU_MAXOP];
  int64_t s[CPU_MAXOP];
  /* decompose `start` into a multi-index and operand addresses */
  int64_t r = start;
  for (int d = nd - 1; d >= 0; d--) {
    idx[d] = r % it->shape[d];
    r /= it->shape[d];
  }
  for (int k = 0; k < nop; k++) {
    int64_t off = 0;
    for (int d = 0; d < nd; d++) off += idx[d] * it->st[k][d];
    p[k] = it->base[k] + off * it->esz[k];
    s[k] = it->st[k][nd - 1];
  }
  int64_t inner = it->shape[nd - 1];
  int64_t pos = start;
  while (pos < end) {
    int64_t n = inner - idx[nd - 1];
    if (n > end - pos) n = end - pos;
    fn(n, p, s, ctx);
    pos += n;
    if (pos >= end) break;
    /* advance to the next row (n always reaches the row's end here) */
    for (int k = 0; k < nop; k++) p[k] -= idx[nd - 1] * s[k] * it->esz[k];
    idx[nd - 1] = 0;
    for (int d = nd - 2; d >= 0; d--) {
      idx[d]++;
      for (int k = 0; k < nop; k++) p[k] += it->st[k][d] * it->esz[k];
      if (idx[d] < it->shape[d]) break;
      for (int k = 0; k < nop; k++) p[k] -= it->shape[d] * it->st[k][d] * it->esz[k];
      idx[d] = 0;
    }
  }
}

void cpu_foreach(int nop, const fl_tensor *const *t, cpu_rowfn fn, void *ctx, int64_t grain) {
  cpu_iter it;
  cpu_iter_init(&it, nop, t);
  if (it.numel == 0) return;
  int nt = cpu_nthreads(it.numel, grain);
  if (nt <= 1) {
    cpu_iter_range(&it, 0, it.numel, fn, ctx);
    return;
  }
#pragma omp parallel num_threads(nt)
  {
    int tid = omp_get_thread_num(), n = omp_get_num_threads();
    /* chunks rounded to 16 elements keep each thread's stores on its own cache lines */
    int64_t chunk = ((it.numel + n - 1) / n + 15) & ~(int64_t)15;
    int64_t lo = chunk * tid, hi = lo + chunk;
    if (hi > it.numel) hi = it.numel;
    cpu_iter_range(&it, lo, hi, fn, ctx);
  }
}

/* ---------------------------------------------------------------- copy and convert */

/* to_<dst>(x) from a source of type `ST`: integers convert plainly (wrapping like numpy's astype),
 * floats saturate into integer ranges. */
#define CVT_ROW(DN, DT, SN, ST, SFLT)                                                   \
  static void cvt_##DN##_##SN(int64_t n, char **p, const int64_t *s, void *ctx) {      \
    (void)ctx;                                                                         \
    DT *o = (DT *)p[0];                                                                \
    const ST *a = (const ST *)p[1];                                                    \
    int64_t so = s[0], sa = s[1];                                                      \
    if (so == 1 && sa == 1) {                                                          \
      _Pragma("omp simd") for (int64_t i = 0; i < n; i++) o[i] = CVT1(DN, DT, SFLT, a[i]); \
    } else {                                                                           \
      for (int64_t i = 0; i < n; i++) o[i * so] = CVT1(DN, DT, SFLT, a[i * sa]);       \
    }                                                                                  \
  }
#define CVT1(DN, DT, SFLT, x) ((SFLT) ? cpu_to_##DN((double)(x)) : (DT)(x))

#define CVT_FROM(SN, ST, SU, SFLT) \
  CVT_ROW(f32, float, SN, ST, SFLT) CVT_ROW(f64, double, SN, ST, SFLT) \
  CVT_ROW(i32, int32_t, SN, ST, SFLT) CVT_ROW(i64, int64_t, SN, ST, SFLT) CVT_ROW(u8, uint8_t, SN, ST, SFLT)
CPU_DTYPES(CVT_FROM)

#define CVT_ENTRY(SN, ST, SU, SFLT) {cvt_f32_##SN, cvt_f64_##SN, cvt_i32_##SN, cvt_i64_##SN, cvt_u8_##SN},
/* cvt_rows[src][dst] */
static const cpu_rowfn cvt_rows[FL_NDTYPES][FL_NDTYPES] = {CPU_DTYPES(CVT_ENTRY)};

/* same dtype: contiguous rows are memcpy */
static void copy_row(int64_t n, char **p, const int64_t *s, void *ctx) {
  int64_t esz = *(const int64_t *)ctx;
  if (s[0] == 1 && s[1] == 1) { memcpy(p[0], p[1], (size_t)(n * esz)); return; }
  switch (esz) {
  case 1: for (int64_t i = 0; i < n; i++) ((uint8_t *)p[0])[i * s[0]] = ((const uint8_t *)p[1])[i * s[1]]; break;
  case 4: for (int64_t i = 0; i < n; i++) ((uint32_t *)p[0])[i * s[0]] = ((const uint32_t *)p[1])[i * s[1]]; break;
  default: for (int64_t i = 0; i < n; i++) ((uint64_t *)p[0])[i * s[0]] = ((const uint64_t *)p[1])[i * s[1]]; break;
  }
}

/* A same-dtype copy whose destination runs along the last dim while the source runs along the
 * one before (a transpose made contiguous, NCHW <-> NHWC permutes): done in TILE x TILE blocks so
 * both sides stay in cache, instead of reading a new cache line for every element. */
#define TILE 32

static int copy_tiled(const cpu_iter *it) {
  int nd = it->nd;
  if (nd < 2 || it->esz[0] != it->esz[1]) return 0;
  int64_t R = it->shape[nd - 2], C = it->shape[nd - 1];
  int64_t d0 = it->st[0][nd - 2], d1 = it->st[0][nd - 1], s0 = it->st[1][nd - 2], s1 = it->st[1][nd - 1];
  if (d1 != 1 || s0 != 1 || s1 <= TILE || R < TILE || C < TILE) return 0;
  int64_t esz = it->esz[0];
  int64_t outer = it->numel / (R * C), rt = (R + TILE - 1) / TILE, ct = (C + TILE - 1) / TILE;
  int64_t jobs = outer * rt;
  int nt = cpu_nthreads(it->numel, CPU_GRAIN * 4);
#pragma omp parallel for num_threads(nt) if (nt > 1) schedule(static)
  for (int64_t job = 0; job < jobs; job++) {
    int64_t o = job / rt, r0 = (job % rt) * TILE;
    /* offsets of outer index o over dims 0..nd-3 */
    int64_t rem = o, od = 0, os = 0;
    for (int d = nd - 3; d >= 0; d--) {
      int64_t i = rem % it->shape[d];
      rem /= it->shape[d];
      od += i * it->st[0][d];
      os += i * it->st[1][d];
    }
    char *dst = it->base[0] + od * esz;
    const char *src = it->base[1] + os * esz;
    int64_t r1 = r0 + TILE < R ? r0 + TILE : R;
    for (int64_t cb = 0; cb < ct; cb++) {
      int64_t c0 = cb * TILE, c1 = c0 + TILE < C ? c0 + TILE : C;
      for (int64_t r = r0; r < r1; r++) {
        switch (esz) {
        case 1: for (int64_t c = c0; c < c1; c++) ((uint8_t *)dst)[r * d0 + c] = ((const uint8_t *)src)[r + c * s1]; break;
        case 4: for (int64_t c = c0; c < c1; c++) ((uint32_t *)dst)[r * d0 + c] = ((const uint32_t *)src)[r + c * s1]; break;
        default: for (int64_t c = c0; c < c1; c++) ((uint64_t *)dst)[r * d0 + c] = ((const uint64_t *)src)[r + c * s1]; break;
        }
      }
    }
  }
  return 1;
}

int cpu_copy(fl_tensor *dst, const fl_tensor *src) {
  const fl_tensor *t[2] = {dst, src};
  if (dst->dtype == src->dtype) {
    cpu_iter it;
    cpu_iter_init(&it, 2, t);
    if (copy_tiled(&it)) return 0;
    int64_t esz = (int64_t)fl_dtype_size(dst->dtype);
    cpu_foreach(2, t, copy_row, &esz, CPU_GRAIN * 4);
  } else {
    cpu_foreach(2, t, cvt_rows[src->dtype][dst->dtype], NULL, CPU_GRAIN);
  }
  return 0;
}

/* ---------------------------------------------------------------- fill */

#define FILL_ROW(N, T, U, FLT)                                                 \
  static void fill_##N(int64_t n, char **p, const int64_t *s, void *ctx) {    \
    T v = cpu_to_##N(*(const double *)ctx);                                    \
    T *o = (T *)p[0];                                                          \
    if (s[0] == 1) {                                                           \
      _Pragma("omp simd") for (int64_t i = 0; i < n; i++) o[i] = v;            \
    } else {                                                                   \
      for (int64_t i = 0; i < n; i++) o[i * s[0]] = v;                         \
    }                                                                          \
  }
CPU_DTYPES(FILL_ROW)
#define FILL_ENTRY(N, T, U, FLT) fill_##N,
static const cpu_rowfn fill_rows[FL_NDTYPES] = {CPU_DTYPES(FILL_ENTRY)};

int cpu_fill(fl_tensor *t, double value) {
  const fl_tensor *ts[1] = {t};
  cpu_foreach(1, ts, fill_rows[t->dtype], &value, CPU_GRAIN * 4);
  return 0;
}

/* ---------------------------------------------------------------- the table */

/* The NN owner defines fl_cpu_nn_ops in core/cpu/nn_*.c; until then the weak reference is NULL. */
extern const struct fl_nn_ops fl_cpu_nn_ops __attribute__((weak));

const fl_backend fl_cpu_backend = {
  .name = "cpu",
  .alloc = cpu_alloc,
  .free = cpu_free,
  .copy = cpu_copy,
  .fill = cpu_fill,
  .binary = cpu_binary,
  .unary = cpu_unary,
  .reduce = cpu_reduce,
  .where = cpu_where,
  .matmul = cpu_matmul,
  .softmax = cpu_softmax,
  .rng = cpu_rng,
  .nn = &fl_cpu_nn_ops,
};
