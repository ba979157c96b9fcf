/* float32 exp, log, tanh and sigmoid over contiguous arrays, written for the vectoriser.
 *
 * libm's expf/logf/tanhf are scalar calls: an `omp simd` loop around them runs one element at a
 * time (several times slower than numpy's SIMD loops). Here each function is branch-free
 * straight-line code (range reduction with integer bit tricks, a polynomial, selects for the
 * special values), which GCC vectorises in an `omp simd` loop at -O2. The loops are compiled three
 * times: for the baseline (SSE2; no FMA), for AVX2+FMA and for AVX-512, and the best one the CPU
 * supports is picked at run time (the build has no -march flag).
 *
 * Accuracy against double-precision libm, largest error over every 13th float bit pattern (all
 * magnitudes, both signs), the same in every variant to 0.1 ulp: exp 1.04 ulp, log 0.94, tanh 1.93,
 * sigmoid 1.90 (relative error below 2.4e-7). Subnormal results (exp and sigmoid below -87.3) are
 * held to the subnormal spacing. tests/c/test_tensor.c checks every 1031st pattern in every variant
 * the CPU has (exp, log <= 1.5 ulp; tanh, sigmoid <= 2).
 * Overflow gives inf, underflow 0, NaN stays NaN, log(0) = -inf, log(x < 0) = NaN, log(inf) = inf.
 * Variants may differ from each other in the last bit (FMA rounds once where a*b+c rounds twice);
 * within one process every call uses the same variant, so results are reproducible there.
 *
 * The polynomials are truncated Taylor series (coefficients 1/k!, 1/(2k+1)), taken far enough that
 * their truncation error is below float rounding on the reduced ranges:
 *   exp:   x = n ln2 + r, |r| <= ln2/2;  exp(r) to r^7 (next term < 1.2e-8 relative)
 *   expm1: the same r; r + r^2/2 + ... + r^8/8!
 *   log:   x = 2^e m, m in [sqrt(1/2), sqrt(2)), f = m - 1, s = f/(2+f), |s| < 0.172;
 *          log(1+f) = 2 atanh(s) = f - s (f - 2 R), R = s^2/3 + s^4/5 + s^6/7 + s^8/9
 *          (using 2s = f - s f, so the exact f carries the leading term) */
/* Selects such as `sub ? x * 2^23 : x` become vector blends only if the compiler may evaluate both
 * sides; with the default -ftrapping-math it refuses (the unselected side could raise an FP
 * exception flag, which nobody here reads). */
#pragma GCC optimize("no-trapping-math")

#include "cpu.h"

#include <math.h>
#include <string.h>

#define VM_INLINE static inline __attribute__((always_inline))

VM_INLINE float as_float(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }
VM_INLINE uint32_t as_bits(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }

/* a * b + c, fused in the variants that have FMA (`fma` is a constant after inlining) */
VM_INLINE float mad(float a, float b, float c, int fma) { return fma ? __builtin_fmaf(a, b, c) : a * b + c; }

/* ln 2 split so that n * LN2_HI is exact for |n| < 2^15 (LN2_HI has 9 significant bits) */
#define LN2_HI 0.693359375f
#define LN2_LO (-2.12194440e-4f)
#define LOG2E 1.44269504f
#define ROUND_MAGIC 12582912.0f   /* 1.5 * 2^23: adding it rounds a float to an integer */

/* 2^n as a float for -126 <= n <= 127 */
VM_INLINE float pow2i(int32_t n) { return as_float((uint32_t)(n + 127) << 23); }

/* x = n ln2 + r with |r| <= ln2/2 (a little more after rounding); x must be in [-104, 89] */
VM_INLINE float reduce_ln2(float x, int32_t *n, int fma) {
  float t = x * LOG2E + ROUND_MAGIC;
  *n = (int32_t)(as_bits(t) - as_bits(ROUND_MAGIC));   /* the integer, read from t's low bits */
  float nf = t - ROUND_MAGIC;
  float r = mad(nf, -LN2_HI, x, fma);                  /* exact: nf * LN2_HI is exact, x is near it */
  return mad(nf, -LN2_LO, r, fma);
}

VM_INLINE float vm_exp(float x, int fma) {
  /* clamp so that n stays in [-150, 128]: beyond, the result is 0 or inf anyway; NaN -> 0 here and
   * restored at the end */
  float xc = x < -104.0f ? -104.0f : x;
  xc = xc > 89.0f ? 89.0f : xc;
  xc = x != x ? 0.0f : xc;
  int32_t n;
  float r = reduce_ln2(xc, &n, fma);
  float q = 1.0f / 5040;
  q = mad(q, r, 1.0f / 720, fma);
  q = mad(q, r, 1.0f / 120, fma);
  q = mad(q, r, 1.0f / 24, fma);
  q = mad(q, r, 1.0f / 6, fma);
  q = mad(q, r, 0.5f, fma);
  float p = mad(r * r, q, r, fma) + 1.0f;              /* exp(r), in [0.70, 1.42] */
  /* 2^n in two factors so each is a normal float; the last product rounds once, also into the
   * subnormal range (gradual underflow) and up to inf */
  int32_t n1 = n >> 1, n2 = n - n1;
  float y = p * pow2i(n1) * pow2i(n2);
  return x != x ? x + x : y;
}

/* expm1(y) for y in [0, 20] (the caller clamps) */
VM_INLINE float expm1_pos(float y, int fma) {
  int32_t n;
  float r = reduce_ln2(y, &n, fma);
  float q = 1.0f / 40320;
  q = mad(q, r, 1.0f / 5040, fma);
  q = mad(q, r, 1.0f / 720, fma);
  q = mad(q, r, 1.0f / 120, fma);
  q = mad(q, r, 1.0f / 24, fma);
  q = mad(q, r, 1.0f / 6, fma);
  q = mad(q, r, 0.5f, fma);
  float em = mad(r * r, q, r, fma);                    /* expm1(r) */
  float s = pow2i(n);                                  /* n in [0, 29] */
  return mad(s, em, s - 1.0f, fma);                    /* 2^n (expm1(r) + 1) - 1 */
}

/* a / (a + b) for a, b >= 0, where a + b is rounded: its rounding error, found exactly with
 * Fast2Sum (the larger addend first), corrects the quotient to first order. Without it the
 * denominator's rounding alone can cost an ulp of a quotient whose mantissa is near 2. */
VM_INLINE float div_sum(float a, float b) {
  float d = a + b;
  float err = a > b ? (a - d) + b : (b - d) + a;       /* (a + b) - d, exactly */
  float q = a / d;
  return q - q * (err / d);                            /* a / (d + err) to first order */
}

VM_INLINE float vm_tanh(float x, int fma) {
  /* tanh|x| = expm1(2|x|) / (expm1(2|x|) + 2): no cancellation near 0. From 9.011 on, tanh rounds
   * to 1 (1 - 2e^-2|x| is within half an ulp of 1), so clamping at 10 changes nothing */
  float a = fabsf(x);
  float y = a < 10.0f ? a + a : 20.0f;
  float em = expm1_pos(y, fma);
  float t = div_sum(em, 2.0f);
  t = as_float(as_bits(t) | (as_bits(x) & 0x80000000u));   /* sign of x, -0 included */
  return x != x ? x + x : t;
}

VM_INLINE float vm_sigmoid(float x, int fma) {
  /* e = exp(-|x|) never overflows; for x < 0, sigmoid = e / (1 + e) keeps the tiny results
   * (down to subnormals) that 1 / (1 + exp(-x)) would flush to 0 */
  float e = vm_exp(-fabsf(x), fma);
  float num = x >= 0.0f ? 1.0f : e;                    /* NaN: e is NaN */
  float d = 1.0f + e;
  float err = (1.0f - d) + e;                          /* (1 + e) - d exactly: e <= 1 */
  float q = num / d;
  return q - q * (err / d);                            /* a / (d + err) to first order */
}

VM_INLINE float vm_log(float x, int fma) {
  /* subnormals: scale into the normal range first */
  int sub = x < 1.17549435e-38f;
  float xs = sub ? x * 8388608.0f : x;                 /* 2^23 */
  uint32_t u = as_bits(xs);
  /* x = 2^e m with m in [sqrt(1/2), sqrt(2)): offset the bits by sqrt(1/2)'s so that the exponent
   * field rolls over at sqrt(2) instead of 2 */
  int32_t e = (int32_t)(u - 0x3f3504f3u) >> 23;
  float m = as_float(u - ((uint32_t)e << 23));
  float ef = (float)(sub ? e - 23 : e);
  float f = m - 1.0f;                                  /* exact */
  float s = f / (2.0f + f);
  float z = s * s;
  float R = 1.0f / 9;
  R = mad(R, z, 1.0f / 7, fma);
  R = mad(R, z, 1.0f / 5, fma);
  R = mad(R, z, 1.0f / 3, fma);
  R = R * z;
  float l1p = f - s * (f - 2.0f * R);                  /* log(1 + f) */
  float y = mad(ef, LN2_HI, mad(ef, LN2_LO, l1p, fma), fma);
  y = x == INFINITY ? x : y;
  y = x == 0.0f ? -INFINITY : y;
  return (x < 0.0f || x != x) ? NAN : y;
}

/* ---------------------------------------------------------------- variants and dispatch */

typedef void (*vm_fn)(int64_t n, const float *x, float *y);

/* y may be x itself (each element is read before it is written) */
#define VM_LOOPS(SUFFIX, ATTR, FMA)                                                            \
  ATTR static void vexp_##SUFFIX(int64_t n, const float *x, float *y) {                        \
    _Pragma("omp simd") for (int64_t i = 0; i < n; i++) y[i] = vm_exp(x[i], FMA);              \
  }                                                                                            \
  ATTR static void vlog_##SUFFIX(int64_t n, const float *x, float *y) {                        \
    _Pragma("omp simd") for (int64_t i = 0; i < n; i++) y[i] = vm_log(x[i], FMA);              \
  }                                                                                            \
  ATTR static void vtanh_##SUFFIX(int64_t n, const float *x, float *y) {                       \
    _Pragma("omp simd") for (int64_t i = 0; i < n; i++) y[i] = vm_tanh(x[i], FMA);             \
  }                                                                                            \
  ATTR static void vsigmoid_##SUFFIX(int64_t n, const float *x, float *y) {                    \
    _Pragma("omp simd") for (int64_t i = 0; i < n; i++) y[i] = vm_sigmoid(x[i], FMA);          \
  }

#if defined(__x86_64__) || defined(__i386__)
#define VM_X86 1
VM_LOOPS(generic, , 0)
VM_LOOPS(avx2, __attribute__((target("avx2,fma"))), 1)
VM_LOOPS(avx512, __attribute__((target("avx512f,avx512dq,avx512vl,avx512bw,avx2,fma"))), 1)
#else
#define VM_X86 0
/* elsewhere the baseline compiler flags decide; FMA only where the target guarantees it */
#ifdef __FP_FAST_FMAF
VM_LOOPS(generic, , 1)
#else
VM_LOOPS(generic, , 0)
#endif
#endif

enum { VM_OPS = 4 };
static const vm_fn vm_table[3][VM_OPS] = {
  {vexp_generic, vlog_generic, vtanh_generic, vsigmoid_generic},
#if VM_X86
  {vexp_avx2, vlog_avx2, vtanh_avx2, vsigmoid_avx2},
  {vexp_avx512, vlog_avx512, vtanh_avx512, vsigmoid_avx512},
#endif
};

static int best_level(void) {
#if VM_X86
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bw"))
    return 2;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return 1;
#endif
  return 0;
}

/* -1 until first use; written with the same value by whichever thread gets there first */
static int vm_level = -1;

int cpu_vecmath_level(int level) {
  int best = best_level();
  if (level >= 0) __atomic_store_n(&vm_level, level < best ? level : best, __ATOMIC_RELAXED);
  int cur = __atomic_load_n(&vm_level, __ATOMIC_RELAXED);
  if (cur < 0) {
    cur = best;
    __atomic_store_n(&vm_level, cur, __ATOMIC_RELAXED);
  }
  return cur;
}

static inline vm_fn pick(int op) {
  int lv = __atomic_load_n(&vm_level, __ATOMIC_RELAXED);
  if (lv < 0) lv = cpu_vecmath_level(-1);
  return vm_table[lv][op];
}

void cpu_vexp_f32(int64_t n, const float *x, float *y) { pick(0)(n, x, y); }
void cpu_vlog_f32(int64_t n, const float *x, float *y) { pick(1)(n, x, y); }
void cpu_vtanh_f32(int64_t n, const float *x, float *y) { pick(2)(n, x, y); }
void cpu_vsigmoid_f32(int64_t n, const float *x, float *y) { pick(3)(n, x, y); }
