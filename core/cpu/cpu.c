/* The CPU backend: host memory, the strided iterator every kernel uses, copy/convert and fill.
 * Kernels live in elementwise.c, reduce.c, blas.c and random.c. */
#include "cpu.h"
#include "../ops.h"

#include <cblas.h>
#include <omp.h>
#include <stdlib.h>
#include <string.h>
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

static void *cpu_alloc(int device, size_t nbytes) {
  (void)device;
  if (nbytes > phys_bytes()) return NULL;
  /* 64-byte alignment: whole cache lines and aligned AVX-512 loads; size rounded as C11 requires */
  size_t n = (nbytes + 63) & ~(size_t)63;
  if (n < nbytes) return NULL;
  return aligned_alloc(64, n);
}

static void cpu_free(int device, void *p) {
  (void)device;
  free(p);
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

int cpu_copy(fl_tensor *dst, const fl_tensor *src) {
  const fl_tensor *t[2] = {dst, src};
  if (dst->dtype == src->dtype) {
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
