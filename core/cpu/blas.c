/* Matrix products through OpenBLAS (cblas_sgemm / cblas_dgemm). */
#include "cpu.h"

#include <cblas.h>
#include <limits.h>

/* How to hand one (R, C) matrix view with strides (s0, s1) to BLAS (row-major convention).
 * The front guarantees (s1 == 1 && (R == 1 || s0 >= C)) || (s0 == 1 && (C == 1 || s1 >= R)). */
static void blas_layout(int64_t R, int64_t C, int64_t s0, int64_t s1, enum CBLAS_TRANSPOSE *tr, int64_t *ld) {
  if (s1 == 1 && (R == 1 || s0 >= C)) {   /* rows contiguous: as stored */
    *tr = CblasNoTrans;
    *ld = R == 1 ? C : s0;
  } else {                                 /* columns contiguous: the transpose is stored */
    *tr = CblasTrans;
    *ld = C == 1 ? R : s1;
  }
  if (*ld < 1) *ld = 1;
}

int cpu_matmul(fl_tensor *out, const fl_tensor *a, const fl_tensor *b, double alpha, double beta) {
  if (a->dtype == FL_BF16) {   /* out bfloat16 or float32 */
    cpu_bf16_call c;
    cpu_bf16_begin(&c);
    fl_tensor *o = cpu_bf16_arg(&c, out, beta != 0, 1);
    fl_tensor *wa = cpu_bf16_arg(&c, a, 1, 0), *wb = cpu_bf16_arg(&c, b, 1, 0);
    return cpu_bf16_end(&c, c.rc ? -1 : cpu_matmul(o, wa, wb, alpha, beta));
  }
  int64_t B = a->shape[0], M = a->shape[1], K = a->shape[2], N = b->shape[2];
  if (M > INT_MAX || N > INT_MAX || K > INT_MAX)
    return fl_fail("matmul: matrix sizes above %d are not supported by BLAS", INT_MAX);
  enum CBLAS_TRANSPOSE ta, tb;
  int64_t lda, ldb;
  blas_layout(M, K, a->stride[1], a->stride[2], &ta, &lda);
  blas_layout(K, N, b->stride[1], b->stride[2], &tb, &ldb);
  int64_t ldc = M == 1 ? N : out->stride[1];
  if (ldc < 1) ldc = 1;
  if (lda > INT_MAX || ldb > INT_MAX || ldc > INT_MAX)
    return fl_fail("matmul: a leading dimension above %d is not supported by BLAS", INT_MAX);
  if (M == 0 || N == 0 || B == 0) return 0;
  size_t esz = fl_dtype_size(a->dtype);
  const char *pa = fl_tensor_data(a), *pb = fl_tensor_data(b);
  char *pc = fl_tensor_data(out);
  int64_t sa = a->stride[0], sb = b->stride[0], sc = out->stride[0];
  /* One matrix b for every batch, with a's and out's batches stacked as rows: a single gemm
   * with B*M rows (how a Linear layer on (B,M,K) input runs). */
  if (B > 1 && sb == 0 && ta == CblasNoTrans && sa == M * lda && sc == M * ldc && B * M <= INT_MAX) {
    M *= B;
    B = 1;
  }
  if (K == 0) {   /* empty sum: out = beta * out */
    for (int64_t i = 0; i < B; i++) {
      fl_tensor o = *out;
      o.offset += i * sc;
      o.ndim = 2; o.shape[0] = out->shape[1]; o.shape[1] = out->shape[2];
      o.stride[0] = out->stride[1]; o.stride[1] = out->stride[2];
      if (beta == 0) cpu_fill(&o, 0);
      else cpu_unary(FL_AFFINE, &o, &o, beta, 0);
    }
    return 0;
  }
  for (int64_t i = 0; i < B; i++) {
    const void *A = pa + (size_t)(i * sa) * esz, *Bm = pb + (size_t)(i * sb) * esz;
    void *C = pc + (size_t)(i * sc) * esz;
    if (a->dtype == FL_F32)
      cblas_sgemm(CblasRowMajor, ta, tb, (int)M, (int)N, (int)K, (float)alpha, A, (int)lda, Bm, (int)ldb,
                  (float)beta, C, (int)ldc);
    else
      cblas_dgemm(CblasRowMajor, ta, tb, (int)M, (int)N, (int)K, alpha, A, (int)lda, Bm, (int)ldb,
                  beta, C, (int)ldc);
  }
  return 0;
}
