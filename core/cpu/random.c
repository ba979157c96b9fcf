/* Random fills from Philox4x32-10; rng.h documents how each value is made from the counter. */
#include "cpu.h"
#include "../rng.h"

#include <math.h>

typedef struct {
  fl_rngkind kind;
  uint64_t seed, offset;
  double p0, p1;
  uint64_t range;
} rng_ctx;

static double rng_uniform53(const uint32_t r[4]) {
  return (double)((((uint64_t)r[1] << 32) | r[0]) >> 11) * 0x1p-53;
}

static double rng_normal(const uint32_t r[4]) {
  double u1 = (double)((((uint64_t)r[1] << 32) | r[0]) >> 11) * 0x1p-53 + 0x1p-54;
  double u2 = (double)((((uint64_t)r[3] << 32) | r[2]) >> 11) * 0x1p-53;
  return sqrt(-2.0 * log(u1)) * cos(6.283185307179586 * u2);
}

/* Fill the contiguous range [lo, hi) of elements (flat index i = counter offset). */
#define RNG_DTYPE(N, T, U, FLT)                                                       \
  static void rng_##N(T *o, int64_t lo, int64_t hi, const rng_ctx *c) {               \
    uint32_t r[4];                                                                    \
    for (int64_t i = lo; i < hi; i++) {                                               \
      fl_philox_at(c->seed, c->offset, (uint64_t)i, r);                               \
      double v;                                                                       \
      if (c->kind == FL_RNG_INT) {                                                    \
        o[i] = (T)(int64_t)((uint64_t)(int64_t)c->p0 + ((((uint64_t)r[1] << 32) | r[0]) % c->range)); \
        continue;                                                                     \
      }                                                                               \
      if (c->kind == FL_RNG_NORMAL) v = c->p0 + c->p1 * rng_normal(r);                \
      else if (sizeof(T) == 4 && FLT) v = c->p0 + (c->p1 - c->p0) * ((double)(r[0] >> 8) * 0x1p-24); \
      else v = c->p0 + (c->p1 - c->p0) * rng_uniform53(r);                            \
      o[i] = cpu_to_##N(v);                                                           \
    }                                                                                 \
  }
CPU_DTYPES(RNG_DTYPE)

static void rng_fill(fl_dtype dt, void *o, int64_t lo, int64_t hi, const rng_ctx *c) {
  switch (dt) {
  case FL_F32: rng_f32(o, lo, hi, c); break;
  case FL_F64: rng_f64(o, lo, hi, c); break;
  case FL_I32: rng_i32(o, lo, hi, c); break;
  case FL_I64: rng_i64(o, lo, hi, c); break;
  default: rng_u8(o, lo, hi, c); break;
  }
}

int cpu_rng(fl_tensor *out, fl_rngkind kind, uint64_t seed, uint64_t offset, double p0, double p1) {
  if (!fl_tensor_is_contiguous(out)) return fl_fail("cpu: random fill needs a contiguous tensor");
  if (out->dtype == FL_BF16) {   /* the float32 stream, rounded */
    cpu_bf16_call c;
    cpu_bf16_begin(&c);
    fl_tensor *o = cpu_bf16_arg(&c, out, 0, 1);
    return cpu_bf16_end(&c, c.rc ? -1 : cpu_rng(o, kind, seed, offset, p0, p1));
  }
  rng_ctx c = {kind, seed, offset, p0, p1, 0};
  if (kind == FL_RNG_INT) {
    if (!(p1 > p0)) return fl_fail("random: empty integer range [%.17g, %.17g)", p0, p1);
    c.range = (uint64_t)((int64_t)p1 - (int64_t)p0);
  }
  int64_t n = fl_tensor_numel(out);
  void *o = fl_tensor_data(out);
  int nt = cpu_nthreads(n, CPU_GRAIN_HEAVY);
#pragma omp parallel for num_threads(nt) if (nt > 1)
  for (int t = 0; t < nt; t++) {
    int64_t chunk = (n + nt - 1) / nt, lo = chunk * t, hi = lo + chunk < n ? lo + chunk : n;
    if (lo < hi) rng_fill(out->dtype, o, lo, hi, &c);
  }
  return 0;
}
