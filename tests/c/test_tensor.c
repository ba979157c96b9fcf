/* C unit tests of the tensor core alone (no Lua): storage refcounts, views, broadcasting, every
 * dtype through the CPU kernels, the Philox generator's known answers, error messages. */
#include <string.h>

#include "check.h"
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

  return check_exit();
}
