/* Reductions (sum mean var std max min argmax argmin) and softmax. Floats accumulate in double,
 * integers sum in 64-bit wrap-around arithmetic. A reduction over one dim walks either
 * "horizontally" (the reduced dim has the smallest stride: one line per output) or "vertically"
 * (outputs are adjacent: a block of up to 64 outputs is updated row by row, so memory is read
 * in order). */
#include "cpu.h"

#include <math.h>
#include <omp.h>
#include <stdlib.h>
#include <string.h>

#define BLK 64

typedef struct {
  fl_redop op;
  int64_t R, rs;        /* reduced length and its stride in elements */
  int correction;
  fl_dtype odt;
} red_ctx;

static void store_d(char *o, fl_dtype odt, double v) {
  if (odt == FL_F32) *(float *)o = (float)v;
  else *(double *)o = v;
}

static double var_of(double sqdev, int64_t R, int corr, int is_std) {
  double v = R - corr > 0 ? sqdev / (double)(R - corr) : NAN;
  return is_std ? sqrt(v) : v;
}

/* Per dtype: line primitives (R values at stride rs) and the row function for dim reductions. */
/* Contiguous max/min: a vectorised pass for the value and a NaN flag, then a scan for the first
 * index holding it (the first NaN if there is one). */
#define BEST_CONTIG(N, T, U, FLT)                                                            \
  static int64_t best_contig_##N(const T *a, int64_t R, int ismax, T *val) {                  \
    T m = a[0];                                                                               \
    int nan = 0;                                                                              \
    if (ismax) {                                                                              \
      _Pragma("omp simd reduction(max:m) reduction(|:nan)")                                   \
      for (int64_t k = 0; k < R; k++) { T x = a[k]; m = x > m ? x : m; nan |= x != x; }       \
    } else {                                                                                  \
      _Pragma("omp simd reduction(min:m) reduction(|:nan)")                                   \
      for (int64_t k = 0; k < R; k++) { T x = a[k]; m = x < m ? x : m; nan |= x != x; }       \
    }                                                                                         \
    if (nan) {                                                                                \
      for (int64_t k = 0; k < R; k++) if (a[k] != a[k]) { *val = a[k]; return k; }            \
    }                                                                                         \
    for (int64_t k = 0; k < R; k++) if (a[k] == m) { *val = m; return k; }                    \
    *val = m;                                                                                 \
    return 0;                                                                                 \
  }
CPU_DTYPES(BEST_CONTIG)

#define RED_DTYPE(N, T, U, FLT)                                                              \
  static double dsum_##N(const T *a, int64_t R, int64_t rs) {                                 \
    double acc = 0;                                                                           \
    if (rs == 1) { _Pragma("omp simd reduction(+:acc)") for (int64_t k = 0; k < R; k++) acc += (double)a[k]; } \
    else for (int64_t k = 0; k < R; k++) acc += (double)a[k * rs];                            \
    return acc;                                                                               \
  }                                                                                           \
  static uint64_t usum_##N(const T *a, int64_t R, int64_t rs) {                               \
    uint64_t acc = 0;                                                                         \
    for (int64_t k = 0; k < R; k++) acc += (uint64_t)(int64_t)a[k * rs];                      \
    return acc;                                                                               \
  }                                                                                           \
  static double sqdev_##N(const T *a, int64_t R, int64_t rs, double m) {                      \
    double acc = 0;                                                                           \
    for (int64_t k = 0; k < R; k++) { double d = (double)a[k * rs] - m; acc += d * d; }       \
    return acc;                                                                               \
  }                                                                                           \
  /* first index of the max (ismax) or min; a NaN wins over numbers and the first NaN stays */ \
  static int64_t best_##N(const T *a, int64_t R, int64_t rs, int ismax, T *val) {             \
    if (rs == 1) return best_contig_##N(a, R, ismax, val);                                   \
    T b = a[0];                                                                               \
    int64_t bi = 0;                                                                           \
    for (int64_t k = 1; k < R; k++) {                                                         \
      T x = a[k * rs];                                                                        \
      int better = ismax ? x > b : x < b;                                                     \
      if (better || (x != x && b == b)) { b = x; bi = k; }                                    \
    }                                                                                         \
    *val = b;                                                                                 \
    return bi;                                                                                \
  }                                                                                           \
  static void line_##N(const red_ctx *c, const T *a, char *o) {                               \
    int64_t R = c->R, rs = c->rs;                                                             \
    switch (c->op) {                                                                          \
    case FL_SUM:                                                                              \
      if (FLT) store_d(o, c->odt, dsum_##N(a, R, rs));                                        \
      else *(int64_t *)o = (int64_t)usum_##N(a, R, rs);                                       \
      break;                                                                                  \
    case FL_MEAN: store_d(o, c->odt, dsum_##N(a, R, rs) / (double)R); break;                  \
    case FL_VAR: case FL_STD: {                                                               \
      double m = dsum_##N(a, R, rs) / (double)R;                                              \
      store_d(o, c->odt, var_of(sqdev_##N(a, R, rs, m), R, c->correction, c->op == FL_STD));  \
      break;                                                                                  \
    }                                                                                         \
    case FL_MAX: case FL_MIN: { T v; best_##N(a, R, rs, c->op == FL_MAX, &v); *(T *)o = v; break; } \
    case FL_ARGMAX: case FL_ARGMIN: { T v; *(int64_t *)o = best_##N(a, R, rs, c->op == FL_ARGMAX, &v); break; } \
    default: break;                                                                           \
    }                                                                                         \
  }                                                                                           \
  /* B adjacent outputs (input stride sa between them), reduced row by row */                 \
  static void block_##N(const red_ctx *c, const T *a, int64_t sa, char *o, int64_t so, int64_t B) { \
    int64_t R = c->R, rs = c->rs, oz = (int64_t)fl_dtype_size(c->odt);                        \
    double d[BLK], d2[BLK];                                                                   \
    uint64_t u[BLK];                                                                          \
    T v[BLK];                                                                                 \
    int64_t ix[BLK];                                                                          \
    switch (c->op) {                                                                          \
    case FL_SUM: case FL_MEAN: case FL_VAR: case FL_STD:                                      \
      if (!FLT && c->op == FL_SUM) {                                                          \
        for (int64_t j = 0; j < B; j++) u[j] = 0;                                             \
        for (int64_t k = 0; k < R; k++)                                                       \
          for (int64_t j = 0; j < B; j++) u[j] += (uint64_t)(int64_t)a[k * rs + j * sa];      \
        for (int64_t j = 0; j < B; j++) *(int64_t *)(o + j * so * oz) = (int64_t)u[j];        \
        break;                                                                                \
      }                                                                                       \
      for (int64_t j = 0; j < B; j++) d[j] = 0;                                               \
      for (int64_t k = 0; k < R; k++)                                                         \
        for (int64_t j = 0; j < B; j++) d[j] += (double)a[k * rs + j * sa];                   \
      if (c->op == FL_SUM) {                                                                  \
        for (int64_t j = 0; j < B; j++) store_d(o + j * so * oz, c->odt, d[j]);               \
        break;                                                                                \
      }                                                                                       \
      for (int64_t j = 0; j < B; j++) d[j] /= (double)R;                                      \
      if (c->op == FL_MEAN) {                                                                 \
        for (int64_t j = 0; j < B; j++) store_d(o + j * so * oz, c->odt, d[j]);               \
        break;                                                                                \
      }                                                                                       \
      for (int64_t j = 0; j < B; j++) d2[j] = 0;                                              \
      for (int64_t k = 0; k < R; k++)                                                         \
        for (int64_t j = 0; j < B; j++) { double e = (double)a[k * rs + j * sa] - d[j]; d2[j] += e * e; } \
      for (int64_t j = 0; j < B; j++)                                                         \
        store_d(o + j * so * oz, c->odt, var_of(d2[j], R, c->correction, c->op == FL_STD));   \
      break;                                                                                  \
    default: {                                                                                \
      int ismax = c->op == FL_MAX || c->op == FL_ARGMAX;                                      \
      for (int64_t j = 0; j < B; j++) { v[j] = a[j * sa]; ix[j] = 0; }                        \
      for (int64_t k = 1; k < R; k++)                                                         \
        for (int64_t j = 0; j < B; j++) {                                                     \
          T x = a[k * rs + j * sa];                                                           \
          int better = ismax ? x > v[j] : x < v[j];                                           \
          if (better || (x != x && v[j] == v[j])) { v[j] = x; ix[j] = k; }                    \
        }                                                                                     \
      if (c->op == FL_MAX || c->op == FL_MIN)                                                 \
        for (int64_t j = 0; j < B; j++) *(T *)(o + j * so * oz) = v[j];                       \
      else                                                                                    \
        for (int64_t j = 0; j < B; j++) *(int64_t *)(o + j * so * oz) = ix[j];                \
    }                                                                                         \
    }                                                                                         \
  }                                                                                           \
  static void redrow_##N(int64_t n, char **p, const int64_t *s, void *ctx) {                  \
    const red_ctx *c = ctx;                                                                   \
    const T *a = (const T *)p[1];                                                             \
    int64_t oz = (int64_t)fl_dtype_size(c->odt);                                              \
    if (n == 1 || llabs(c->rs) <= llabs(s[1])) {                                              \
      for (int64_t j = 0; j < n; j++) line_##N(c, a + j * s[1], p[0] + j * s[0] * oz);        \
    } else {                                                                                  \
      for (int64_t j = 0; j < n; j += BLK)                                                    \
        block_##N(c, a + j * s[1], s[1], p[0] + j * s[0] * oz, s[0], n - j < BLK ? n - j : BLK); \
    }                                                                                         \
  }
CPU_DTYPES(RED_DTYPE)

#define RED_ENTRY(N, T, U, FLT) redrow_##N,
static const cpu_rowfn red_rows[FL_NDTYPES] = {CPU_DTYPES(RED_ENTRY)};

/* ---------------------------------------------------------------- over everything */

typedef struct { double d; uint64_t u; int64_t idx; double v; } partial;

/* One chunk [lo, hi) of a contiguous tensor: sums, or the best value as double plus index.
 * For best values the chunk's own T value decides; it is kept as double only for combining,
 * so int64 maxima above 2^53 are re-read from the input by index at the end. */
#define ALL_DTYPE(N, T, U, FLT)                                                            \
  static void chunk_##N(fl_redop op, const T *a, int64_t lo, int64_t hi, double m, partial *r) { \
    switch (op) {                                                                           \
    case FL_SUM: case FL_MEAN:                                                              \
      if (!FLT && op == FL_SUM) r->u = usum_##N(a + lo, hi - lo, 1);                        \
      else r->d = dsum_##N(a + lo, hi - lo, 1);                                             \
      break;                                                                                \
    case FL_VAR: case FL_STD: r->d = sqdev_##N(a + lo, hi - lo, 1, m); break;               \
    default: {                                                                              \
      T v;                                                                                  \
      r->idx = lo + best_##N(a + lo, hi - lo, 1, op == FL_MAX || op == FL_ARGMAX, &v);      \
      r->v = (double)v;                                                                     \
    }                                                                                       \
    }                                                                                       \
  }
CPU_DTYPES(ALL_DTYPE)

static void chunk_any(fl_dtype dt, fl_redop op, const void *a, int64_t lo, int64_t hi, double m, partial *r) {
  switch (dt) {
  case FL_F32: chunk_f32(op, a, lo, hi, m, r); break;
  case FL_F64: chunk_f64(op, a, lo, hi, m, r); break;
  case FL_I32: chunk_i32(op, a, lo, hi, m, r); break;
  case FL_I64: chunk_i64(op, a, lo, hi, m, r); break;
  default: chunk_u8(op, a, lo, hi, m, r); break;
  }
}

/* Runs op over the contiguous a in nt chunks and combines them in chunk order. */
static partial all_pass(fl_dtype dt, fl_redop op, const void *a, int64_t N, double m) {
  partial parts[64];
  int nt = cpu_nthreads(N, CPU_GRAIN);
  if (nt > 64) nt = 64;
  int64_t chunk = (N + nt - 1) / nt;
#pragma omp parallel for num_threads(nt) if (nt > 1)
  for (int t = 0; t < nt; t++) {
    int64_t lo = chunk * t, hi = lo + chunk < N ? lo + chunk : N;
    memset(&parts[t], 0, sizeof parts[t]);
    parts[t].idx = -1;
    if (lo < hi) chunk_any(dt, op, a, lo, hi, m, &parts[t]);
  }
  partial r = parts[0];
  int ismax = op == FL_MAX || op == FL_ARGMAX;
  for (int t = 1; t < nt; t++) {
    r.d += parts[t].d;
    r.u += parts[t].u;
    if (parts[t].idx < 0) continue;
    double x = parts[t].v;
    int better = ismax ? x > r.v : x < r.v;
    if (better || (x != x && r.v == r.v)) { r.v = x; r.idx = parts[t].idx; }
  }
  return r;
}

static int reduce_all(fl_redop op, fl_tensor *out, const fl_tensor *a, int correction) {
  int64_t N = fl_tensor_numel(a);
  const void *p = fl_tensor_data(a);
  char *o = fl_tensor_data(out);
  partial r;
  switch (op) {
  case FL_SUM:
    r = all_pass(a->dtype, op, p, N, 0);
    if (fl_dtype_is_float(a->dtype)) store_d(o, out->dtype, r.d);
    else *(int64_t *)o = (int64_t)r.u;
    return 0;
  case FL_MEAN:
    r = all_pass(a->dtype, op, p, N, 0);
    store_d(o, out->dtype, r.d / (double)N);
    return 0;
  case FL_VAR: case FL_STD: {
    double m = all_pass(a->dtype, FL_MEAN, p, N, 0).d / (double)N;
    r = all_pass(a->dtype, op, p, N, m);
    store_d(o, out->dtype, var_of(r.d, N, correction, op == FL_STD));
    return 0;
  }
  default:
    /* the chunked pass compares in double; the final pick between equal-as-double candidates of
     * int64 is exact enough only below 2^53, so int64 takes one exact sequential pass */
    if (a->dtype == FL_I64) {
      int64_t v;
      int64_t i = best_i64(p, N, 1, op == FL_MAX || op == FL_ARGMAX, &v);
      if (op == FL_ARGMAX || op == FL_ARGMIN) *(int64_t *)o = i;
      else *(int64_t *)o = v;
      return 0;
    }
    r = all_pass(a->dtype, op, p, N, 0);
    if (op == FL_ARGMAX || op == FL_ARGMIN) { *(int64_t *)o = r.idx; return 0; }
    /* copy the winning element itself (exact in its own dtype) */
    memcpy(o, (const char *)p + r.idx * (int64_t)fl_dtype_size(a->dtype), fl_dtype_size(a->dtype));
    return 0;
  }
}

int cpu_reduce(fl_redop op, fl_tensor *out, const fl_tensor *a, int dim, int correction) {
  if ((unsigned)op >= FL_NREDOPS) return fl_fail("cpu: unknown reduction %d", (int)op);
  if (a->dtype == FL_BF16) {
    cpu_bf16_call c;
    cpu_bf16_begin(&c);
    fl_tensor *o = cpu_bf16_arg(&c, out, 0, 1), *wa = cpu_bf16_arg(&c, a, 1, 0);
    return cpu_bf16_end(&c, c.rc ? -1 : cpu_reduce(op, o, wa, dim, correction));
  }
  int64_t N = fl_tensor_numel(a);
  if (dim < 0) {
    if (N == 0) {   /* only SUM/MEAN/VAR/STD get here (the front rejects the others) */
      double z = op == FL_SUM ? 0 : NAN;
      return cpu_fill(out, z);
    }
    if (!fl_tensor_is_contiguous(a)) return fl_fail("cpu: reduce over everything needs a contiguous input");
    return reduce_all(op, out, a, correction);
  }
  red_ctx c = {op, a->shape[dim], a->stride[dim], correction, out->dtype};
  if (fl_tensor_numel(out) == 0) return 0;
  if (c.R == 0) {
    return cpu_fill(out, op == FL_SUM ? 0 : NAN);
  }
  /* iterate over outputs together with a's matching element (a narrowed to index 0 of dim) */
  fl_tensor a0 = *a;
  a0.shape[dim] = 1;
  const fl_tensor *t[2] = {out, &a0};
  cpu_iter it;
  cpu_iter_init(&it, 2, t);
  int64_t nout = it.numel;
  int nt = cpu_nthreads(nout * c.R, CPU_GRAIN);
  if (nt > nout) nt = (int)nout;
  if (nt <= 1) {
    cpu_iter_range(&it, 0, nout, red_rows[a->dtype], &c);
    return 0;
  }
#pragma omp parallel num_threads(nt)
  {
    int tid = omp_get_thread_num(), n = omp_get_num_threads();
    int64_t chunk = (nout + n - 1) / n;
    int64_t lo = chunk * tid, hi = lo + chunk < nout ? lo + chunk : nout;
    cpu_iter_range(&it, lo, hi, red_rows[a->dtype], &c);
  }
  return 0;
}

/* ---------------------------------------------------------------- softmax */

/* x: (outer, n, inner) contiguous; one output line per (outer, inner) pair.
 * Max-subtracted for stability; sums accumulate in double. */
#define SOFTMAX_DTYPE(N, T, EXPF, LOGF)                                                     \
  static void softmax_##N(T *o, const T *x, int64_t outer, int64_t n, int64_t inner, int lg) { \
    int64_t lines = outer * inner;                                                          \
    int nt = cpu_nthreads(lines * n, CPU_GRAIN_HEAVY);                                      \
    _Pragma("omp parallel for num_threads(nt) if (nt > 1)")                                 \
    for (int64_t l = 0; l < lines; l++) {                                                   \
      int64_t oi = l / inner, ii = l % inner;                                               \
      const T *xa = x + oi * n * inner + ii;                                                \
      T *oa = o + oi * n * inner + ii;                                                      \
      T m = xa[0];                                                                          \
      for (int64_t k = 1; k < n; k++) if (xa[k * inner] > m || xa[k * inner] != xa[k * inner]) m = xa[k * inner]; \
      double sum = 0;                                                                       \
      if (lg) {                                                                             \
        for (int64_t k = 0; k < n; k++) sum += (double)EXPF(xa[k * inner] - m);             \
        T ls = (T)log(sum);                                                                 \
        for (int64_t k = 0; k < n; k++) oa[k * inner] = xa[k * inner] - m - ls;             \
      } else {                                                                              \
        for (int64_t k = 0; k < n; k++) { T e = EXPF(xa[k * inner] - m); oa[k * inner] = e; sum += (double)e; } \
        T inv = (T)(1.0 / sum);                                                             \
        for (int64_t k = 0; k < n; k++) oa[k * inner] *= inv;                               \
      }                                                                                     \
    }                                                                                       \
  }
SOFTMAX_DTYPE(f32_strided, float, expf, logf)
SOFTMAX_DTYPE(f64, double, exp, log)

/* float32 over the last dim (inner == 1, the usual case: class scores): x - max into the output
 * row, then the vectorised exp in place (vecmath.c) */
static void softmax_f32(float *o, const float *x, int64_t outer, int64_t n, int64_t inner, int lg) {
  if (inner != 1) { softmax_f32_strided(o, x, outer, n, inner, lg); return; }
  int nt = cpu_nthreads(outer * n, CPU_GRAIN_HEAVY);
  _Pragma("omp parallel for num_threads(nt) if (nt > 1)")
  for (int64_t l = 0; l < outer; l++) {
    const float *xa = x + l * n;
    float *oa = o + l * n;
    float m = xa[0];
    for (int64_t k = 1; k < n; k++) if (xa[k] > m || xa[k] != xa[k]) m = xa[k];
    for (int64_t k = 0; k < n; k++) oa[k] = xa[k] - m;
    cpu_vexp_f32(n, oa, oa);
    double sum = 0;
    for (int64_t k = 0; k < n; k++) sum += (double)oa[k];
    if (lg) {
      float ls = (float)log(sum);
      for (int64_t k = 0; k < n; k++) oa[k] = xa[k] - m - ls;
    } else {
      float inv = (float)(1.0 / sum);
      for (int64_t k = 0; k < n; k++) oa[k] *= inv;
    }
  }
}

int cpu_softmax(fl_tensor *out, const fl_tensor *a, int dim, int lg) {
  int64_t outer = 1, inner = 1, n = a->shape[dim];
  for (int i = 0; i < dim; i++) outer *= a->shape[i];
  for (int i = dim + 1; i < a->ndim; i++) inner *= a->shape[i];
  if (outer * inner * n == 0) return 0;
  if (a->dtype == FL_BF16) {
    cpu_bf16_call c;
    cpu_bf16_begin(&c);
    fl_tensor *o = cpu_bf16_arg(&c, out, 0, 1), *wa = cpu_bf16_arg(&c, a, 1, 0);
    return cpu_bf16_end(&c, c.rc ? -1 : cpu_softmax(o, wa, dim, lg));
  }
  if (a->dtype == FL_F32) softmax_f32(fl_tensor_data(out), fl_tensor_data(a), outer, n, inner, lg);
  else if (a->dtype == FL_F64) softmax_f64(fl_tensor_data(out), fl_tensor_data(a), outer, n, inner, lg);
  else return fl_fail("softmax: expected a float tensor, got %s", fl_dtype_name(a->dtype));
  return 0;
}
