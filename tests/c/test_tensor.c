/* C unit tests of the tensor core alone (no Lua): storage refcounts, views, broadcasting, every
 * dtype through the CPU kernels, the Philox generator's known answers, error messages, the front's
 * refusals with a second (fake, non-host) backend, and the float32 exp/log/tanh/sigmoid kernels'
 * accuracy against double-precision libm. */
#include <float.h>
#include <string.h>

#include "check.h"
#include "cpu/cpu.h"
#include "fake_backend.h"
#include "ops.h"
#include "rng.h"

static const fl_backend *cpu = &fl_cpu_backend;

static int mk(fl_tensor *t, fl_dtype dt, int ndim, const int64_t *shape) {
  return fl_tensor_init(t, cpu, 0, dt, ndim, shape);
}

/* t filled with 0, 1, 2, ... in row-major order */
static void iota(fl_tensor *t) {
  int64_t idx[FL_MAXDIM] = {0};
  int64_t n = fl_tensor_numel(t);
  for (int64_t k = 0; k < n; k++) {
    fl_tensor_set(t, idx, (double)k);
    for (int d = t->ndim - 1; d >= 0; d--) {
      if (++idx[d] < t->shape[d]) break;
      idx[d] = 0;
    }
  }
}

static double at2(const fl_tensor *t, int64_t i, int64_t j) {
  int64_t idx[2] = {i, j};
  return fl_tensor_get(t, idx);
}

static int has(const char *needle) { return strstr(fl_errmsg(), needle) != NULL; }

/* ---- float32 math kernels against double libm ---- */

/* error of y in units of the float spacing at the exact value `ref` (subnormal spacing 2^-149 below
 * FLT_MIN, so subnormal results are held to their absolute precision) */
static double ulp_error(float y, double ref) {
  if (isnan(ref)) return isnan(y) ? 0 : INFINITY;
  if (isnan(y)) return INFINITY;
  if (isinf(y) || fabs(ref) > FLT_MAX) {
    /* overflow: inf is right when ref rounds past FLT_MAX; within 1 ulp of it, FLT_MAX is too */
    if (isinf(y) && fabs(ref) >= FLT_MAX && (y > 0) == (ref > 0)) return 0;
    if (!isinf(y) && fabs(ref) > FLT_MAX) return (fabs(y) == FLT_MAX) ? 1 : INFINITY;
    return INFINITY;
  }
  double a = fabs(ref);
  int e;
  frexp(a < FLT_MIN ? FLT_MIN : a, &e);
  double ulp = ldexp(1.0, e - 24);
  return fabs((double)y - ref) / ulp;
}

static double ref_sigmoid(double x) { return x >= 0 ? 1 / (1 + exp(-x)) : exp(x) / (1 + exp(x)); }

typedef struct {
  const char *name;
  void (*fn)(int64_t, const float *, float *);
  double (*ref)(double);
  double max_ulp;
} math_case;

/* every 1031st float bit pattern (about 4 million values: all magnitudes, both signs, subnormals,
 * inf and NaN) plus hand-picked edges; returns the worst error and where it happened */
static double sweep(const math_case *mc, float *worst_x) {
  enum { CH = 4096 };
  static float xs[CH], ys[CH];
  double worst = 0;
  uint64_t u = 0;
  static const float edges[] = {0.0f, -0.0f, 1.0f, -1.0f, INFINITY, -INFINITY, NAN, FLT_MIN, FLT_MAX,
    -FLT_MAX, 1e-45f, 88.72283f, 88.72284f, 88.7228394f, 89.0f, -87.33654f, -103.9720840f, -104.0f,
    -110.0f, 0.6931472f, -0.3465736f, 0.3465736f, 1e-8f, -1e-8f, 9.0f, -9.0f, 8.99f, 0.5493f, 1.4142135f,
    0.70710677f, 0.70710683f, 1.0000001f, 0.99999994f, 2.0f, 16.6355324f, -16.6355324f};
  int nedges = (int)(sizeof edges / sizeof edges[0]), first = 1;
  while (u < ((uint64_t)1 << 32)) {
    int n = 0;
    if (first) { for (; n < nedges; n++) xs[n] = edges[n]; first = 0; }
    for (; n < CH && u < ((uint64_t)1 << 32); n++, u += 1031) {
      uint32_t b = (uint32_t)u;
      memcpy(&xs[n], &b, 4);
    }
    mc->fn(n, xs, ys);
    for (int i = 0; i < n; i++) {
      double e = ulp_error(ys[i], mc->ref(xs[i]));
      if (e > worst) { worst = e; *worst_x = xs[i]; }
    }
  }
  return worst;
}

int main(void) {
  TEST("storage refcount: views keep storage alive") {
    fl_tensor a, v;
    int64_t sh[2] = {3, 4};
    CHECK(mk(&a, FL_F32, 2, sh) == 0);
    CHECK(a.storage->refcount == 1);
    fl_tensor_init_view(&v, &a);
    CHECK(v.storage->refcount == 2);
    fl_tensor_free(&a);
    CHECK(a.storage == NULL);
    fl_tensor_free(&a);                      /* twice: harmless */
    CHECK(v.storage->refcount == 1);
    iota(&v);                                /* still valid memory */
    CHECK(at2(&v, 2, 3) == 11);
    fl_tensor_free(&v);
  }

  TEST("views: transpose narrow select expand unsqueeze squeeze") {
    fl_tensor a, v;
    int64_t sh[2] = {3, 4};
    mk(&a, FL_F64, 2, sh);
    iota(&a);
    fl_tensor_init_view(&v, &a);
    CHECK(fl_view_transpose(&v, 0, 1) == 0);
    CHECK(v.shape[0] == 4 && v.stride[0] == 1 && v.stride[1] == 4);
    CHECK(!fl_tensor_is_contiguous(&v));
    CHECK(at2(&v, 3, 2) == 11);
    CHECK(fl_view_narrow(&v, 0, 1, 2) == 0);
    CHECK(v.offset == 1 && at2(&v, 0, 0) == 1);
    CHECK(fl_view_select(&v, 1, 2) == 0);
    CHECK(v.ndim == 1 && v.shape[0] == 2);
    int64_t i1 = 1;
    CHECK(fl_tensor_get(&v, &i1) == 10);
    CHECK(fl_view_unsqueeze(&v, 0) == 0 && v.ndim == 2 && v.shape[0] == 1);
    int64_t ex[3] = {5, 3, 2};
    CHECK(fl_view_expand(&v, 3, ex) == 0);
    CHECK(v.stride[0] == 0 && v.stride[1] == 0 && v.shape[2] == 2);
    CHECK(fl_tensor_has_internal_overlap(&v));
    fl_tensor_free(&v);
    fl_tensor_init_view(&v, &a);
    CHECK(fl_view_unsqueeze(&v, 2) == 0 && v.shape[2] == 1);
    CHECK(fl_view_squeeze(&v, -1) == 0 && v.ndim == 2);
    CHECK(fl_view_narrow(&v, 1, 1, 4) == -1 && has("narrow: range start 2 length 4 does not fit dim 2 of size 4"));
    CHECK(fl_view_select(&v, 2, 0) == -1 && has("select: dim 3 out of range for a 2-d tensor"));
    int64_t bad[2] = {3, 5};
    CHECK(fl_view_expand(&v, 2, bad) == -1 && has("expand: cannot expand size [3,4] to [3,5]"));
    fl_tensor_free(&v);
    fl_tensor_free(&a);
  }

  TEST("reshape without copies where the layout allows") {
    fl_tensor a, v;
    int64_t sh[3] = {2, 3, 4};
    mk(&a, FL_F32, 3, sh);
    iota(&a);
    fl_tensor_init_view(&v, &a);
    int perm[3] = {1, 0, 2};                 /* (3,2,4): last dim contiguous */
    fl_view_permute(&v, perm);
    int64_t s4[4] = {3, 2, 2, 2};
    CHECK(fl_view_reshape(&v, 4, s4) == 0);
    CHECK(v.stride[0] == 4 && v.stride[1] == 12 && v.stride[2] == 2 && v.stride[3] == 1);
    int64_t s2[2] = {3, 8};                  /* would merge dims with strides 4 and 12: copy needed */
    CHECK(fl_view_reshape(&v, 2, s2) == -1 && has("needs a copy"));
    int64_t s1[2] = {6, -1};
    CHECK(fl_view_reshape(&v, 2, s1) == -1);
    fl_tensor_free(&v);
    fl_tensor_init_view(&v, &a);
    int64_t s3[2] = {-1, 6};
    CHECK(fl_view_reshape(&v, 2, s3) == 0 && v.shape[0] == 4);
    int64_t s5[1] = {7};
    CHECK(fl_view_reshape(&v, 1, s5) == -1 && has("view: size [7] is incompatible with 24 elements"));
    fl_tensor_free(&v);
    fl_tensor_free(&a);
  }

  TEST("broadcast shapes") {
    int n;
    int64_t out[FL_MAXDIM];
    int64_t a[3] = {4, 1, 3}, b[2] = {2, 1};
    CHECK(fl_broadcast_shape("add", 3, a, 2, b, &n, out) == 0);
    CHECK(n == 3 && out[0] == 4 && out[1] == 2 && out[2] == 3);
    int64_t c[1] = {4};
    int64_t d[2] = {2, 3};
    CHECK(fl_broadcast_shape("add", 2, d, 1, c, &n, out) == -1 && has("add: shapes [2,3] and [4] cannot broadcast"));
    CHECK(fl_broadcast_shape("mul", 0, NULL, 2, d, &n, out) == 0 && n == 2);
  }

  TEST("binary ops in every dtype, with broadcasting and strided inputs") {
    for (int dt = 0; dt < FL_NDTYPES; dt++) {
      fl_tensor a, b, r, at;
      int64_t sa[2] = {3, 4}, sb[1] = {4};
      mk(&a, (fl_dtype)dt, 2, sa);
      mk(&b, (fl_dtype)dt, 1, sb);
      iota(&a);
      iota(&b);
      CHECK(fl_binary(FL_ADD, &r, &a, &b) == 0);
      CHECK(r.dtype == (fl_dtype)dt && at2(&r, 2, 3) == 11 + 3);
      fl_tensor_free(&r);
      CHECK(fl_binary(FL_MUL, &r, &a, &b) == 0 && at2(&r, 1, 2) == 6 * 2);
      fl_tensor_free(&r);
      CHECK(fl_binary(FL_GT, &r, &a, &b) == 0 && r.dtype == FL_U8 && at2(&r, 0, 1) == 0 && at2(&r, 1, 0) == 1);
      fl_tensor_free(&r);
      /* transposed (strided) operand */
      fl_tensor_init_view(&at, &a);
      fl_view_transpose(&at, 0, 1);           /* (4,3) */
      fl_tensor c;
      int64_t sc[2] = {4, 3};
      mk(&c, (fl_dtype)dt, 2, sc);
      iota(&c);
      CHECK(fl_binary(FL_SUB, &r, &c, &at) == 0);
      CHECK(at2(&r, 3, 2) == 11 - 11 && at2(&r, 1, 0) == 3 - 1);
      fl_tensor_free(&r);
      fl_tensor_free(&at);
      fl_tensor_free(&c);
      /* in place */
      CHECK(fl_binary_into(FL_ADD, &a, &a, &b) == 0 && at2(&a, 2, 3) == 14);
      fl_tensor_free(&a);
      fl_tensor_free(&b);
    }
  }

  TEST("integer arithmetic wraps without undefined behaviour") {
    fl_tensor a, b, r;
    mk(&a, FL_I32, 0, NULL);
    mk(&b, FL_I32, 0, NULL);
    fl_fill(&a, 2147483647.0);
    fl_fill(&b, 1);
    CHECK(fl_binary(FL_ADD, &r, &a, &b) == 0 && *(int32_t *)fl_tensor_data(&r) == INT32_MIN);
    fl_tensor_free(&r);
    fl_fill(&a, -2147483648.0);
    CHECK(fl_unary(FL_NEG, &r, &a, 0, 0) == 0 && *(int32_t *)fl_tensor_data(&r) == INT32_MIN);
    fl_tensor_free(&r);
    CHECK(fl_binary(FL_DIV, &r, &a, &b) == 0 && r.dtype == FL_F32);   /* true division */
    fl_tensor_free(&r);
    fl_tensor_free(&a);
    fl_tensor_free(&b);
  }

  TEST("conversions saturate from floats") {
    fl_tensor a, r;
    int64_t sh[1] = {4};
    mk(&a, FL_F64, 1, sh);
    double vals[4] = {1e20, -1e20, 0.0 / 0.0, 300.7};
    memcpy(fl_tensor_data(&a), vals, sizeof vals);
    CHECK(fl_cast(&r, &a, FL_I32) == 0);
    int32_t *p = fl_tensor_data(&r);
    CHECK(p[0] == INT32_MAX && p[1] == INT32_MIN && p[2] == 0 && p[3] == 300);
    fl_tensor_free(&r);
    CHECK(fl_cast(&r, &a, FL_U8) == 0);
    uint8_t *q = fl_tensor_data(&r);
    CHECK(q[0] == 255 && q[1] == 0 && q[3] == 255);
    fl_tensor_free(&r);
    fl_tensor_free(&a);
  }

  TEST("reductions: sum over dims in every dtype, argmax first occurrence") {
    for (int dt = 0; dt < FL_NDTYPES; dt++) {
      fl_tensor a, r;
      int64_t sh[2] = {3, 5};
      mk(&a, (fl_dtype)dt, 2, sh);
      iota(&a);
      CHECK(fl_reduce(FL_SUM, &r, &a, 0, 0, 0) == 0 && r.ndim == 1 && r.shape[0] == 5);
      int64_t i4 = 4;
      CHECK(fl_tensor_get(&r, &i4) == 4 + 9 + 14);
      fl_tensor_free(&r);
      CHECK(fl_reduce(FL_SUM, &r, &a, -1, 0, 0) == 0 && r.ndim == 0 && fl_tensor_get(&r, NULL) == 105);
      fl_tensor_free(&r);
      CHECK(fl_reduce(FL_ARGMAX, &r, &a, 1, 1, 0) == 0 && r.dtype == FL_I64 && r.ndim == 2 && at2(&r, 2, 0) == 4);
      fl_tensor_free(&r);
      fl_tensor_free(&a);
    }
    fl_tensor e, r;
    int64_t z[1] = {0};
    mk(&e, FL_F32, 1, z);
    CHECK(fl_reduce(FL_MAX, &r, &e, -1, 0, 0) == -1 && has("max: cannot reduce over an empty dimension"));
    CHECK(r.storage == NULL);
    fl_tensor_free(&e);
  }

  TEST("matmul and gemm") {
    fl_tensor a, b, r;
    int64_t sa[2] = {2, 3}, sb[2] = {3, 2};
    mk(&a, FL_F32, 2, sa);
    mk(&b, FL_F32, 2, sb);
    iota(&a);
    iota(&b);
    CHECK(fl_matmul(&r, &a, &b) == 0);
    /* [[0,1,2],[3,4,5]] x [[0,1],[2,3],[4,5]] = [[10,13],[28,40]] */
    CHECK(at2(&r, 0, 0) == 10 && at2(&r, 0, 1) == 13 && at2(&r, 1, 0) == 28 && at2(&r, 1, 1) == 40);
    /* gemm accumulating: r = 1*(a b) + 1*r -> doubled */
    CHECK(fl_gemm(&r, &a, &b, 0, 0, 1.0, 1.0) == 0 && at2(&r, 1, 1) == 80);
    /* a^T a via the transpose flag: (3,2)x(2,3) */
    fl_tensor g;
    int64_t sg[2] = {3, 3};
    mk(&g, FL_F32, 2, sg);
    CHECK(fl_gemm(&g, &a, &a, 1, 0, 1.0, 0.0) == 0 && at2(&g, 2, 2) == 4 + 25);
    CHECK(fl_gemm(&g, &a, &b, 0, 0, 1.0, 0.0) == -1 && has("gemm: shapes"));
    fl_tensor_free(&g);
    fl_tensor_free(&r);
    int64_t sbad[2] = {4, 2};
    fl_tensor c;
    mk(&c, FL_F32, 2, sbad);
    CHECK(fl_matmul(&r, &a, &c) == -1 && has("matmul: inner dimensions differ: [2,3] x [4,2]"));
    fl_tensor_free(&c);
    fl_tensor_free(&a);
    fl_tensor_free(&b);
  }

  TEST("Philox4x32-10 known answers (Random123)") {
    uint32_t out[4];
    uint32_t c0[4] = {0, 0, 0, 0}, k0[2] = {0, 0};
    fl_philox4x32_10(c0, k0, out);
    CHECK(out[0] == 0x6627e8d5u && out[1] == 0xe169c58du && out[2] == 0xbc57ac4cu && out[3] == 0x9b00dbd8u);
    uint32_t c1[4] = {0xffffffffu, 0xffffffffu, 0xffffffffu, 0xffffffffu}, k1[2] = {0xffffffffu, 0xffffffffu};
    fl_philox4x32_10(c1, k1, out);
    CHECK(out[0] == 0x408f276du && out[1] == 0x41c83b0eu && out[2] == 0xa20bc7c6u && out[3] == 0x6d5451fdu);
    uint32_t c2[4] = {0x243f6a88u, 0x85a308d3u, 0x13198a2eu, 0x03707344u}, k2[2] = {0xa4093822u, 0x299f31d0u};
    fl_philox4x32_10(c2, k2, out);
    CHECK(out[0] == 0xd16cfe09u && out[1] == 0x94fdccebu && out[2] == 0x5001e420u && out[3] == 0x24126ea1u);
  }

  TEST("rng: streams depend only on seed and offset") {
    fl_tensor a, b;
    int64_t n = 10;
    mk(&a, FL_F32, 1, &n);
    mk(&b, FL_F32, 1, &n);
    fl_rng_manual_seed(5);
    CHECK(fl_random_(&a, FL_RNG_UNIFORM, 0, 1) == 0);
    uint64_t seed, off;
    fl_rng_get_state(&seed, &off);
    CHECK(seed == 5 && off == 10);
    CHECK(fl_rng(&b, FL_RNG_UNIFORM, 5, 0, 0, 1) == 0);
    CHECK(memcmp(fl_tensor_data(&a), fl_tensor_data(&b), 40) == 0);
    /* element 3 of a draw at offset 0 equals element 0 of a draw at offset 3 */
    fl_tensor c;
    int64_t one = 1;
    mk(&c, FL_F32, 1, &one);
    fl_rng(&c, FL_RNG_UNIFORM, 5, 3, 0, 1);
    CHECK(((float *)fl_tensor_data(&c))[0] == ((float *)fl_tensor_data(&a))[3]);
    fl_tensor_free(&a);
    fl_tensor_free(&b);
    fl_tensor_free(&c);
  }

  TEST("allocation failures are errors with the size") {
    fl_tensor t;
    int64_t huge[3] = {1000000, 1000000, 1000000};
    CHECK(mk(&t, FL_F32, 3, huge) == -1 && t.storage == NULL);
    CHECK(has("[1000000,1000000,1000000]"));
    int64_t neg[1] = {-1};
    CHECK(mk(&t, FL_F32, 1, neg) == -1 && has("sizes must be >= 0"));
    CHECK(mk(&t, FL_F32, 9, huge) == -1 && has("at most 8 dims"));
  }

  TEST("overlap detection") {
    fl_tensor a, v, w;
    int64_t sh[1] = {10};
    mk(&a, FL_F32, 1, sh);
    fl_tensor_init_view(&v, &a);
    fl_tensor_init_view(&w, &a);
    CHECK(!fl_tensor_partial_overlap(&v, &w));         /* identical views */
    fl_view_narrow(&v, 0, 0, 5);
    fl_view_narrow(&w, 0, 3, 5);
    CHECK(fl_tensor_partial_overlap(&v, &w));
    fl_view_narrow(&w, 0, 2, 3);                       /* elements 5..7 */
    CHECK(!fl_tensor_may_overlap(&v, &w));
    fl_tensor_free(&v);
    fl_tensor_free(&w);
    fl_tensor_free(&a);
  }

  TEST("large host blocks are reused from the cache and can be released") {
    fl_tensor a, b, c;
    int64_t n = 3 << 18;                       /* 3 MB of float32 */
    CHECK(mk(&a, FL_F32, 1, &n) == 0);
    void *pa = fl_tensor_data(&a);
    (void)pa;                                  /* compared only when the cache is on */
    fl_fill(&a, 7);
    fl_tensor_free(&a);
    CHECK(mk(&b, FL_F32, 1, &n) == 0);
#if !defined(__SANITIZE_ADDRESS__)
    CHECK(fl_tensor_data(&b) == pa);           /* same size class: the cached block */
#endif
    int64_t n2 = n + 5;                        /* same 64 KB class, different size */
    CHECK(mk(&c, FL_F32, 1, &n2) == 0);
    fl_fill(&b, 1);
    fl_fill(&c, 2);
    int64_t last = n - 1, last2 = n2 - 1;
    CHECK(fl_tensor_get(&b, &last) == 1 && fl_tensor_get(&c, &last2) == 2);
    fl_tensor_free(&b);
    fl_tensor_free(&c);
    fl_cpu_release_cache();
    CHECK(fl_storage_live_bytes() == 0);
  }

  TEST("freed large blocks serve smaller requests from the same pages, coalesce, and go back") {
    fl_tensor a, b, c, d;
    size_t used0, used, cached, peak;
    fl_cpu_release_cache();
    fl_cpu_memory_stats(&used0, NULL, NULL, 1);
    int64_t n4 = 1 << 20, n3 = 3 << 18, n2 = (1 << 19) - (1 << 14);   /* 4 MB, 3 MB, 2 MB - 64 KB */
    CHECK(mk(&a, FL_F32, 1, &n4) == 0);
    void *pa = fl_tensor_data(&a);
    (void)pa;                                   /* compared only with the arena on */
    fl_fill(&a, 1);
    fl_tensor_free(&a);
    CHECK(mk(&b, FL_F32, 1, &n3) == 0);         /* the freed 4 MB range, from its start */
#if !defined(__SANITIZE_ADDRESS__)
    CHECK(fl_tensor_data(&b) == pa);
#endif
    fl_fill(&b, 3);
    int64_t last = n3 - 1;
    CHECK(fl_tensor_get(&b, &last) == 3);
    fl_tensor_free(&b);
    CHECK(mk(&c, FL_F32, 1, &n2) == 0);         /* two blocks side by side in it        */
    CHECK(mk(&d, FL_F32, 1, &n2) == 0);
#if !defined(__SANITIZE_ADDRESS__)
    CHECK(fl_tensor_data(&c) == pa);
#endif
    fl_tensor_free(&c);
    fl_tensor_free(&d);                         /* coalesced again: 4 MB fits at the same place */
    CHECK(mk(&a, FL_F32, 1, &n4) == 0);
#if !defined(__SANITIZE_ADDRESS__)
    CHECK(fl_tensor_data(&a) == pa);
#endif
    fl_tensor_free(&a);
    fl_cpu_memory_stats(&used, &cached, &peak, 0);
    CHECK(used == used0);
    CHECK(peak - used0 < ((size_t)4 << 20) + ((size_t)128 << 10));   /* never more than 4 MB at once */
#if !defined(__SANITIZE_ADDRESS__)
    CHECK(cached >= (size_t)4 << 20);           /* kept for the next request */
#endif
    fl_cpu_release_cache();
    fl_cpu_memory_stats(NULL, &cached, NULL, 0);
    CHECK(cached == 0);
  }

  TEST("float32 exp/log/tanh/sigmoid kernels: max error in ulp over the whole float range, every ISA") {
    const math_case cases[] = {
      {"exp", cpu_vexp_f32, exp, 1.5}, {"log", cpu_vlog_f32, log, 1.5},
      {"tanh", cpu_vtanh_f32, tanh, 2}, {"sigmoid", cpu_vsigmoid_f32, ref_sigmoid, 2},
    };
    int best = cpu_vecmath_level(-1);
    for (int lv = 0; lv <= best; lv++) {
      CHECK(cpu_vecmath_level(lv) == lv);
      for (int c = 0; c < 4; c++) {
        float wx = 0;
        double w = sweep(&cases[c], &wx);
        printf("# level %d %-8s max error %.3f ulp (at x = %.9g)\n", lv, cases[c].name, w, wx);
        if (!(w <= cases[c].max_ulp))
          printf("not ok - %s at level %d: %.3f ulp > %.1f at x = %.9g\n", cases[c].name, lv, w, cases[c].max_ulp, wx);
        CHECK(w <= cases[c].max_ulp);
      }
    }
    cpu_vecmath_level(best);
  }

  TEST("float32 special values: overflow, underflow, NaN, signed zero, log domain") {
    const float in[] = {INFINITY, -INFINITY, NAN, -NAN, 0.0f, -0.0f, 100.0f, -200.0f, -5.0f};
    float y[9];
    int best = cpu_vecmath_level(-1);
    for (int lv = 0; lv <= best; lv++) {
      cpu_vecmath_level(lv);
      cpu_vexp_f32(9, in, y);
      CHECK(y[0] == INFINITY && y[1] == 0 && isnan(y[2]) && isnan(y[3]) && y[4] == 1 && y[5] == 1);
      CHECK(y[6] == INFINITY && y[7] == 0 && fabs(y[8] - 6.737947e-3) < 1e-9);
      cpu_vlog_f32(9, in, y);
      CHECK(y[0] == INFINITY && isnan(y[1]) && isnan(y[2]) && isnan(y[3]) && y[4] == -INFINITY);
      CHECK(y[5] == -INFINITY && fabs(y[6] - 4.6051702f) < 1e-6 && isnan(y[7]) && isnan(y[8]));
      cpu_vtanh_f32(9, in, y);
      CHECK(y[0] == 1 && y[1] == -1 && isnan(y[2]) && isnan(y[3]) && y[4] == 0 && !signbit(y[4]));
      CHECK(y[5] == 0 && signbit(y[5]) && y[6] == 1 && y[7] == -1);
      cpu_vsigmoid_f32(9, in, y);
      CHECK(y[0] == 1 && y[1] == 0 && isnan(y[2]) && isnan(y[3]) && y[4] == 0.5f && y[5] == 0.5f);
      CHECK(y[6] == 1 && y[7] == 0);
      /* tiny results survive: sigmoid(-100) = e^-100 = 3.72e-44, a subnormal float */
      float xm = -100.0f, ym;
      cpu_vsigmoid_f32(1, &xm, &ym);
      CHECK(ym > 0 && fabs(ym - 3.720076e-44) <= 1.5e-45);
    }
    cpu_vecmath_level(best);
  }

  TEST("float32 unary ops: strided and in-place rows give the contiguous rows' bits") {
    int64_t sh[2] = {37, 41};
    fl_tensor a, at, c1, c2, s;
    mk(&a, FL_F32, 2, sh);
    fl_random_(&a, FL_RNG_NORMAL, 0, 5);
    fl_unary(FL_ABS, &s, &a, 0, 0);                    /* positive inputs for log */
    const fl_unop ops[4] = {FL_EXP, FL_LOG, FL_TANH, FL_SIGMOID};
    for (int k = 0; k < 4; k++) {
      const fl_tensor *in = ops[k] == FL_LOG ? &s : &a;
      fl_tensor_init_view(&at, in);
      fl_view_transpose(&at, 0, 1);                    /* strided rows */
      CHECK(fl_unary(ops[k], &c1, in, 0, 0) == 0);
      CHECK(fl_unary(ops[k], &c2, &at, 0, 0) == 0);
      int same = 1;
      for (int64_t i = 0; i < sh[0]; i++)
        for (int64_t j = 0; j < sh[1]; j++) {
          float x1 = (float)at2(&c1, i, j), x2 = (float)at2(&c2, j, i);
          if (memcmp(&x1, &x2, 4)) same = 0;
        }
      CHECK(same);
      fl_tensor cp;
      fl_clone(&cp, in);
      CHECK(fl_unary_into(ops[k], &cp, &cp, 0, 0) == 0);   /* in place */
      fl_tensor ne, cnt;
      fl_binary(FL_NE, &ne, &cp, &c1);
      fl_reduce(FL_SUM, &cnt, &ne, -1, 0, 0);
      CHECK(*(int64_t *)fl_tensor_data(&cnt) == 0);
      fl_tensor_free(&ne); fl_tensor_free(&cnt); fl_tensor_free(&cp);
      fl_tensor_free(&c1); fl_tensor_free(&c2); fl_tensor_free(&at);
    }
    fl_tensor_free(&s);
    fl_tensor_free(&a);
  }

  TEST("device checks: a non-host backend is refused by host reads and mixed ops") {
    int64_t sh[2] = {2, 3};
    fl_tensor h, f, g, out;
    mk(&h, FL_F32, 2, sh);
    iota(&h);
    CHECK(fl_tensor_init(&f, &fake_backend, 1, FL_F32, 2, sh) == 0);
    CHECK(fl_copy_into(&f, &h) == 0);                  /* host -> device: the explicit copy */
    char d[80];
    fl_device_str(d, sizeof d, &f);
    CHECK(strcmp(d, "fake:1") == 0);
    fl_device_str(d, sizeof d, &h);
    CHECK(strcmp(d, "cpu") == 0);
    CHECK(fl_tensor_is_host(&h) && !fl_tensor_is_host(&f));
    CHECK(fl_tensor_require_host("item", &h) == 0);
    CHECK(fl_tensor_require_host("item", &f) == -1 && has("item: the tensor is on fake:1, not in host memory"));
    /* every front op that takes two tensors names both devices */
    CHECK(fl_binary(FL_ADD, &out, &h, &f) == -1 && has("add: tensors are on different devices (cpu and fake:1)"));
    CHECK(out.storage == NULL);
    CHECK(fl_binary(FL_MUL, &out, &f, &h) == -1 && has("mul: tensors are on different devices (fake:1 and cpu)"));
    CHECK(fl_binary_into(FL_ADD, &h, &h, &f) == -1 && has("(cpu and fake:1)"));
    CHECK(fl_binary_into(FL_ADD, &h, &f, &f) == -1 && has("add: tensors are on different devices (cpu and fake:1)"));
    CHECK(fl_unary_into(FL_EXP, &h, &f, 0, 0) == -1 && has("exp: tensors are on different devices (cpu and fake:1)"));
    fl_tensor mask;
    fl_binary(FL_GT, &mask, &h, &h);
    CHECK(fl_where(&out, &mask, &f, &f) == -1 && has("where: tensors are on different devices (cpu and fake:1)"));
    int64_t sq[2] = {3, 3};
    fl_tensor hq;
    mk(&hq, FL_F32, 2, sq);
    fl_fill(&hq, 1);
    CHECK(fl_matmul(&out, &f, &hq) == -1 && has("matmul: tensors are on different devices (fake:1 and cpu)"));
    CHECK(fl_gemm(&h, &f, &hq, 0, 0, 1, 0) == -1 && has("gemm: tensors are on different devices"));
    /* on one device, ops run through that backend's kernels (the fake's pages are closed between
     * calls: a direct host read would crash here) */
    fl_tensor f2, back;
    CHECK(fl_binary(FL_ADD, &f2, &f, &f) == 0 && f2.storage->backend == &fake_backend && f2.storage->device == 1);
    CHECK(fl_unary_into(FL_EXP, &f2, &f2, 0, 0) == 0);
    mk(&back, FL_F32, 2, sh);
    CHECK(fl_copy_into(&back, &f2) == 0);              /* device -> host */
    CHECK_NEAR(at2(&back, 1, 2), exp(10.0), 1e-2);
    CHECK(fl_reduce(FL_SUM, &g, &f, -1, 0, 0) == 0 && !fl_tensor_is_host(&g));
    fl_tensor_free(&g);
    fl_tensor_free(&f2);
    fl_tensor_free(&back);
    fl_tensor_free(&hq);
    fl_tensor_free(&mask);
    fl_tensor_free(&f);
    fl_tensor_free(&h);
    CHECK(fake_nblocks == 0);
  }

  TEST("allocation failures keep the backend's own message") {
    int64_t n = 1000;
    fl_tensor f;
    fake_limit = 100;
    fake_fail_mode = 0;
    CHECK(fl_tensor_init(&f, &fake_backend, 1, FL_F32, 1, &n) == -1 && f.storage == NULL);
    CHECK(has("fake: out of memory on fake:1: asked for 4000 bytes, 100 free (a float32 tensor of size [1000])"));
    CHECK(fl_last_failure_was_oom());
    fake_fail_mode = 1;                                /* a backend that records nothing */
    CHECK(fl_tensor_init(&f, &fake_backend, 1, FL_F32, 1, &n) == -1);
    CHECK(has("out of memory: cannot allocate 4000 bytes on fake (a float32 tensor of size [1000])"));
    CHECK(fl_last_failure_was_oom());
    fake_fail_mode = 2;                                /* not out of memory: the mark stays off */
    CHECK(fl_tensor_init(&f, &fake_backend, 7, FL_F32, 1, &n) == -1);
    CHECK(has("fake: device 7 does not exist (a float32 tensor of size [1000])"));
    CHECK(!fl_last_failure_was_oom());
    fl_tensor c;                                       /* and through an op, prefixed by its name */
    fake_fail_mode = 0;
    fake_limit = (size_t)1 << 30;
    CHECK(fl_tensor_init(&f, &fake_backend, 1, FL_F32, 1, &n) == 0);
    fake_limit = 100;
    CHECK(fl_clone(&c, &f) == -1 && has("clone: fake: out of memory on fake:1: asked for 4000 bytes"));
    fake_limit = (size_t)1 << 30;
    fl_tensor_free(&f);
  }

  TEST("cat and stack: joined along a dim, dtypes promoted, strided parts, errors name the op") {
    int64_t s23[2] = {2, 3}, s33[2] = {3, 3}, s24[2] = {2, 4};
    fl_tensor a, b, c, r, t;
    CHECK(mk(&a, FL_I32, 2, s23) == 0 && mk(&b, FL_F32, 2, s33) == 0 && mk(&c, FL_F64, 2, s24) == 0);
    iota(&a);
    iota(&b);
    iota(&c);
    const fl_tensor *ab[2] = {&a, &b};
    CHECK(fl_cat(&r, ab, 2, 0, 0) == 0);                 /* (2,3) ++ (3,3) along dim 0 -> (5,3) float32 */
    CHECK(r.ndim == 2 && r.shape[0] == 5 && r.shape[1] == 3 && r.dtype == FL_F32);
    CHECK(at2(&r, 1, 2) == 5 && at2(&r, 2, 0) == 0 && at2(&r, 4, 2) == 8);
    fl_tensor_free(&r);
    fl_tensor at = a;                                    /* a strided part: a^T (3,2) beside b^T (3,3) */
    fl_view_transpose(&at, 0, 1);
    fl_tensor bt = b;
    fl_view_transpose(&bt, 0, 1);
    const fl_tensor *tt[2] = {&at, &bt};
    CHECK(fl_cat(&r, tt, 2, 1, 0) == 0);
    CHECK(r.shape[0] == 3 && r.shape[1] == 5 && at2(&r, 2, 1) == 5 && at2(&r, 0, 4) == 6);
    fl_tensor_free(&r);
    const fl_tensor *aa[3] = {&a, &a, &a};
    CHECK(fl_cat(&r, aa, 3, 1, 1) == 0);                 /* stack along a new middle dim: (2,3,3) */
    CHECK(r.ndim == 3 && r.shape[0] == 2 && r.shape[1] == 3 && r.shape[2] == 3 && r.dtype == FL_I32);
    int64_t i3[3] = {1, 2, 0};
    CHECK(fl_tensor_get(&r, i3) == 3);
    fl_tensor_free(&r);
    const fl_tensor *ac[2] = {&a, &c};
    CHECK(fl_cat(&r, ac, 2, 0, 0) == -1 && has("cat: element 2 has size [2,4], incompatible with element 1's [2,3] (dim 1)"));
    CHECK(fl_cat(&r, ac, 2, 0, 1) == -1 && has("stack: element 2 has size [2,4]"));
    CHECK(fl_cat(&r, ac, 2, 1, 0) == 0 && r.dtype == FL_F64 && r.shape[1] == 7);   /* along dim 1 they join */
    fl_tensor_free(&r);
    CHECK(fl_cat(&r, ab, 0, 0, 0) == -1 && has("cat: expected a non-empty list of tensors"));
    CHECK(fl_cat(&r, ab, 2, 2, 0) == -1 && has("cat: dim 3 out of range for a 2-d result"));
    CHECK(fl_tensor_init_scalar(&t, cpu, 0, FL_F32, 1) == 0);
    const fl_tensor *s0[1] = {&t};
    CHECK(fl_cat(&r, s0, 1, 0, 0) == -1 && has("cat: cannot concatenate 0-d tensors (use stack)"));
    CHECK(fl_cat(&r, s0, 1, 0, 1) == 0 && r.ndim == 1 && r.shape[0] == 1);
    fl_tensor_free(&r);
    fl_tensor f;                                         /* parts on two devices */
    CHECK(fl_tensor_init(&f, &fake_backend, 1, FL_F32, 2, s33) == 0);
    const fl_tensor *af[2] = {&a, &f};
    CHECK(fl_cat(&r, af, 2, 0, 0) == -1 && has("cat: element 2 is on fake:1, element 1 on cpu"));
    fl_tensor_free(&f);
    fl_tensor_free(&t);
    fl_tensor_free(&a);
    fl_tensor_free(&b);
    fl_tensor_free(&c);
  }

  return check_exit();
}
