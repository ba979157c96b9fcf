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

/* Host memory.
 *
 * Blocks under 1 MB come from malloc. Larger ones (activations, gradients, big weights) are carved
 * out of one arena: a range of address space reserved once (MAP_NORESERVE, the size of RAM), handed
 * out in 64 KB granules, best fit, with freed ranges coalesced with their neighbours. A freed range
 * keeps its pages, so the next request of any size that fits reuses them: a fresh page costs a
 * fault on first touch (the kernel zeroes it), which for element-wise ops on new outputs took longer
 * than the arithmetic, and an inference that asks for the same sizes in the same order every batch
 * finds the same ranges every time and touches no new page after the first batch.
 *
 * Those free pages are resident memory, so the process's peak resident size is about the peak of
 * what is in use, not the sum of every size ever asked for (ResNet50 inference at batch 32 held
 * 0.8x PyTorch's peak with an exact-size block cache, and about 0.4x with the arena). Free pages
 * are given back (MADV_DONTNEED, highest addresses first, in whole 2 MB pieces so that huge pages
 * stay whole) only where in use + free resident would pass the peak in use by more than
 * 1/HEADROOM, and all of them by fl_cpu_release_cache() or when an allocation fails. (Inception V3
 * inference: its stem's 177 MB block cannot reuse the hole of the 91 MB one before it, so some
 * pages go back and are faulted in again every batch: 2% of its CPU time, in the kernel.)
 *
 * Each block carries a 64-byte header holding its length, so that `free` knows it. Where the
 * arena cannot be reserved (an address-space limit) or is full, blocks are mappings of their own,
 * unmapped when freed; a freed range with no slot left to track it gives its pages back and its
 * address range is not reused. Under AddressSanitizer everything
 * comes from malloc, so that the sanitizer still sees use-after-free. The arena is marked for
 * transparent huge pages, as numpy does for large arrays. */
#define HEADER 64
#define ARENA_MIN ((size_t)1 << 20)     /* smaller requests go to malloc */
#define GRANULE ((size_t)64 << 10)
#define HUGE ((size_t)2 << 20)          /* a transparent huge page */
#define HEADROOM 8
#define MAX_FREE 4096                   /* free ranges tracked */

#if defined(__SANITIZE_ADDRESS__)
#define ARENA_ON 0
#else
#define ARENA_ON 1
#endif

static pthread_mutex_t mem_lock = PTHREAD_MUTEX_INITIALIZER;
static char *arena;                     /* NULL until reserved */
static int arena_tried;
static size_t arena_cap, arena_top;     /* reserved bytes; nothing at or above top was handed out */
/* free ranges below arena_top, sorted by offset, never adjacent; `dirty` estimates how many of
 * their bytes are resident (all of a freed block; on the high side when a range is split) */
static struct { size_t off, len, dirty; } fr[MAX_FREE];
static int nfr;
static size_t free_dirty;               /* sum of fr[].dirty: the "cached" bytes */
static size_t used_bytes, used_peak, peak_bytes;   /* handed out; its peak; peak of used + free_dirty */

/* length of the block for a request of nbytes: header included, rounded to the granule above 1 MB */
static size_t block_len(size_t nbytes) {
  size_t n = HEADER + nbytes;
  if (nbytes < ARENA_MIN) return (n + 63) & ~(size_t)63;
  return (n + GRANULE - 1) & ~(GRANULE - 1);
}

static void note(void) {
  if (used_bytes > used_peak) used_peak = used_bytes;
  if (used_bytes + free_dirty > peak_bytes) peak_bytes = used_bytes + free_dirty;
}

static void fr_remove(int i) {
  memmove(&fr[i], &fr[i + 1], sizeof fr[0] * (size_t)(nfr - 1 - i));
  nfr--;
}

/* gives back the resident pages of free bytes [off, off+len), in whole 2 MB pieces inside it (the
 * arena starts 2 MB-aligned) so that transparent huge pages are not split: a later touch then
 * faults in 2 MB at a time */
static void release_pages(size_t off, size_t len) {
  size_t lo = (off + HUGE - 1) & ~(HUGE - 1), hi = (off + len) & ~(HUGE - 1);
  if (hi > lo) madvise(arena + lo, hi - lo, MADV_DONTNEED);
}

/* frees resident pages from the top down until used + free resident <= limit (all when limit 0) */
static void arena_trim(size_t limit) {
  for (int i = nfr - 1; i >= 0 && used_bytes + free_dirty > limit; i--) {
    if (!fr[i].dirty) continue;
    size_t over = used_bytes + free_dirty - limit;
    size_t cut = over < fr[i].len ? (over + 2 * HUGE - 1) & ~(HUGE - 1) : fr[i].len;
    if (cut > fr[i].len) cut = fr[i].len;
    release_pages(fr[i].off + fr[i].len - cut, cut);
    /* resident pages may all sit below the cut: count as gone only what cannot */
    size_t keep = fr[i].len - cut, d = fr[i].dirty > keep ? fr[i].dirty - keep : 0;
    fr[i].dirty -= d;
    free_dirty -= d;
    if (i == nfr - 1 && cut == fr[i].len && fr[i].off + fr[i].len == arena_top) {
      arena_top = fr[i].off;           /* the top range is all given back: lower the top */
      fr_remove(i);
    }
  }
}

static int arena_reserve(void) {
  if (arena_tried) return arena != NULL;
  arena_tried = 1;
  size_t cap = phys_bytes() & ~(HUGE - 1);
  /* HUGE more than asked, to start at a 2 MB boundary */
  void *p = mmap(NULL, cap + HUGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (p == MAP_FAILED) return 0;
  char *a = (char *)(((uintptr_t)p + HUGE - 1) & ~(uintptr_t)(HUGE - 1));
  madvise(a, cap, MADV_HUGEPAGE);
  arena = a;
  arena_cap = cap;
  return 1;
}

/* an offset for a block of len bytes, or (size_t)-1; lock held */
static size_t arena_take(size_t len) {
  if (!arena_reserve()) return (size_t)-1;
  int best = -1;
  for (int i = 0; i < nfr; i++)
    if (fr[i].len >= len && (best < 0 || fr[i].len < fr[best].len)) best = i;
  size_t off;
  if (best >= 0) {
    off = fr[best].off;
    /* which of its pages are resident is not known: count the block's as clean ones first, so that
     * the estimate of what stays resident in the range errs high (trims give back enough) */
    size_t clean = fr[best].len - fr[best].dirty;
    size_t d = len > clean ? len - clean : 0;
    free_dirty -= d;
    fr[best].dirty -= d;
    fr[best].off += len;
    fr[best].len -= len;
    if (fr[best].len == 0) fr_remove(best);
  } else if (nfr > 0 && fr[nfr - 1].off + fr[nfr - 1].len == arena_top) {
    /* the free range at the top, extended */
    size_t need = len - fr[nfr - 1].len;
    if (arena_top + need > arena_cap) return (size_t)-1;
    off = fr[nfr - 1].off;
    free_dirty -= fr[nfr - 1].dirty;
    fr_remove(nfr - 1);
    arena_top += need;
  } else {
    if (arena_top + len > arena_cap) return (size_t)-1;
    off = arena_top;
    arena_top += len;
  }
  return off;
}

/* returns [off, off+len) to the free ranges; 0, or -1 when no slot is left (the caller unmaps it) */
static int arena_give(size_t off, size_t len) {
  int i = 0;
  while (i < nfr && fr[i].off < off) i++;            /* fr[i] is the first range after the block */
  int prev = i > 0 && fr[i - 1].off + fr[i - 1].len == off;
  int next = i < nfr && off + len == fr[i].off;
  if (prev && next) {
    fr[i - 1].len += len + fr[i].len;
    fr[i - 1].dirty += len + fr[i].dirty;
    fr_remove(i);
  } else if (prev) {
    fr[i - 1].len += len;
    fr[i - 1].dirty += len;
  } else if (next) {
    fr[i].off = off;
    fr[i].len += len;
    fr[i].dirty += len;
  } else {
    if (nfr == MAX_FREE) return -1;
    memmove(&fr[i + 1], &fr[i], sizeof fr[0] * (size_t)(nfr - i));
    fr[i].off = off;
    fr[i].len = len;
    fr[i].dirty = len;
    nfr++;
  }
  free_dirty += len;
  return 0;
}

void fl_cpu_memory_stats(size_t *used, size_t *cached, size_t *peak, int reset_peak) {
  pthread_mutex_lock(&mem_lock);
  if (reset_peak) peak_bytes = used_bytes + free_dirty;
  if (used) *used = used_bytes;
  if (cached) *cached = free_dirty;
  if (peak) *peak = peak_bytes;
  pthread_mutex_unlock(&mem_lock);
}

/* Gives every free resident page back and starts the headroom's peak again from what is in use:
 * after a stage that needed much memory, the next one keeps free pages only up to its own peak,
 * so the resident size follows live memory instead of the largest stage so far. */
void fl_cpu_release_cache(void) {
  pthread_mutex_lock(&mem_lock);
  arena_trim(0);
  used_peak = used_bytes;
  pthread_mutex_unlock(&mem_lock);
}

static void *cpu_alloc(int device, size_t nbytes) {
  (void)device;
  if (nbytes > phys_bytes()) return NULL;
  size_t len = block_len(nbytes);
  char *raw = NULL;
  if (ARENA_ON && nbytes >= ARENA_MIN) {
    pthread_mutex_lock(&mem_lock);
    size_t off = arena_take(len);
    if (off == (size_t)-1) {
      arena_trim(0);                    /* a failure: give back what we keep, then a mapping */
    } else {
      raw = arena + off;
      used_bytes += len;
      if (used_bytes > used_peak) used_peak = used_bytes;
      /* handing out clean pages grows the resident total: free resident pages above the
       * headroom go back first */
      arena_trim(used_peak + used_peak / HEADROOM);
      note();
    }
    pthread_mutex_unlock(&mem_lock);
    if (!raw) {
      void *p = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
      if (p == MAP_FAILED) return NULL;
      raw = p;
      pthread_mutex_lock(&mem_lock);
      used_bytes += len;
      note();
      pthread_mutex_unlock(&mem_lock);
    }
  } else {
    void *p = NULL;
    if (posix_memalign(&p, 64, len)) {
      fl_cpu_release_cache();
      if (posix_memalign(&p, 64, len)) return NULL;
    }
    raw = p;
    pthread_mutex_lock(&mem_lock);
    used_bytes += len;
    note();
    pthread_mutex_unlock(&mem_lock);
  }
  *(size_t *)raw = len;
  return raw + HEADER;
}

static void cpu_free(int device, void *p) {
  (void)device;
  if (!p) return;
  char *raw = (char *)p - HEADER;
  size_t len = *(size_t *)raw;
  pthread_mutex_lock(&mem_lock);
  used_bytes -= len;
  int in_arena = arena && raw >= arena && raw < arena + arena_cap;
  if (in_arena && arena_give((size_t)(raw - arena), len) == 0) {
    arena_trim(used_peak + used_peak / HEADROOM);
    pthread_mutex_unlock(&mem_lock);
    return;
  }
  pthread_mutex_unlock(&mem_lock);
  if (in_arena) {                       /* no slot for the range: its pages go back, the range is lost */
    madvise(raw, len, MADV_DONTNEED);
    return;
  }
  if (ARENA_ON && len >= block_len(ARENA_MIN)) munmap(raw, len);
  else free(raw);
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

/* bfloat16 goes through float32: widening is exact, narrowing rounds to nearest even */
#define BF16_ROW(NAME, DT, ST, EXPR)                                                   \
  static void NAME(int64_t n, char **p, const int64_t *s, void *ctx) {                 \
    (void)ctx;                                                                         \
    DT *o = (DT *)p[0];                                                                \
    const ST *a = (const ST *)p[1];                                                    \
    int64_t so = s[0], sa = s[1];                                                      \
    for (int64_t i = 0; i < n; i++) { ST x = a[i * sa]; o[i * so] = (EXPR); }          \
  }
#define CVT_BF16(N, T, U, FLT)                                                         \
  BF16_ROW(cvt_bf16_##N, uint16_t, T, fl_bf16_from_float((float)x))                    \
  BF16_ROW(cvt_##N##_bf16, T, uint16_t, cpu_to_##N(fl_bf16_to_float(x)))
CPU_DTYPES(CVT_BF16)

#define CVT_ENTRY(SN, ST, SU, SFLT) {cvt_f32_##SN, cvt_f64_##SN, cvt_i32_##SN, cvt_i64_##SN, cvt_u8_##SN, cvt_bf16_##SN},
/* cvt_rows[src][dst] (bfloat16 to bfloat16 is a plain copy) */
static const cpu_rowfn cvt_rows[FL_NDTYPES][FL_NDTYPES] = {
  CPU_DTYPES(CVT_ENTRY)
  [FL_BF16] = {cvt_f32_bf16, cvt_f64_bf16, cvt_i32_bf16, cvt_i64_bf16, cvt_u8_bf16, NULL},
};

/* same dtype: contiguous rows are memcpy */
static void copy_row(int64_t n, char **p, const int64_t *s, void *ctx) {
  int64_t esz = *(const int64_t *)ctx;
  if (s[0] == 1 && s[1] == 1) { memcpy(p[0], p[1], (size_t)(n * esz)); return; }
  switch (esz) {
  case 1: for (int64_t i = 0; i < n; i++) ((uint8_t *)p[0])[i * s[0]] = ((const uint8_t *)p[1])[i * s[1]]; break;
  case 2: for (int64_t i = 0; i < n; i++) ((uint16_t *)p[0])[i * s[0]] = ((const uint16_t *)p[1])[i * s[1]]; break;
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
        case 2: for (int64_t c = c0; c < c1; c++) ((uint16_t *)dst)[r * d0 + c] = ((const uint16_t *)src)[r + c * s1]; break;
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
static inline uint16_t cpu_to_bf16(double v) { return fl_bf16_from_float((float)v); }
FILL_ROW(bf16, uint16_t, uint16_t, 1)
#define FILL_ENTRY(N, T, U, FLT) fill_##N,
static const cpu_rowfn fill_rows[FL_NDTYPES] = {CPU_DTYPES(FILL_ENTRY) fill_bf16};

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
