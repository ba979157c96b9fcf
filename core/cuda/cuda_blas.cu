/* Matrix products through cuBLAS (sgemm/dgemm, strided batched).
 * cuBLAS is column-major: a row-major (M,N) product C = A B is computed as the column-major
 * C^T = B^T A^T, so B is cuBLAS's first operand. A row-major matrix with unit column stride is, read
 * column-major, its own transpose with the same leading dimension (op N); one with unit row stride
 * (a transposed view) is op T. TF32 (fl_cuda_set_tf32) lets float32 GEMMs use tensor cores.
 * bfloat16 operands go through cublasGemmEx with float accumulation (CUBLAS_COMPUTE_32F) into a
 * bfloat16 or a float32 output (the front asks float32 for gradients of float32 master weights). */
#include "cuda_internal.h"

#include <limits.h>

/* How one row-major (R, C) view with strides (s0, s1) enters cuBLAS as the column-major (C, R)
 * matrix it is in memory. The front guarantees (s1 == 1 && (R == 1 || s0 >= C)) ||
 * (s0 == 1 && (C == 1 || s1 >= R)). */
static void gemm_layout(int64_t R, int64_t C, int64_t s0, int64_t s1, cublasOperation_t *op, int64_t *ld) {
  if (s1 == 1 && (R == 1 || s0 >= C)) {   /* rows contiguous */
    *op = CUBLAS_OP_N;
    *ld = R == 1 ? C : s0;
  } else {                                 /* columns contiguous: stored transposed */
    *op = CUBLAS_OP_T;
    *ld = C == 1 ? R : s1;
  }
  if (*ld < 1) *ld = 1;
}

/* out (rows, cols with row stride ld) = beta * out, for K == 0 (bfloat16 computed in float) */
template <class T> __global__ void scale_rows_kernel(T *o, int64_t rows, int64_t cols, int64_t ld, int64_t bs,
                                                     int64_t batches, cu_acc_t<T> beta) {
  typedef cu_acc_t<T> A;
  int64_t n = batches * rows * cols, step = (int64_t)gridDim.x * blockDim.x;
  for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += step) {
    int64_t b = i / (rows * cols), r = (i / cols) % rows, c = i % cols;
    T *p = o + b * bs + r * ld + c;
    *p = cu_store<T>(beta == (A)0 ? (A)0 : beta * cu_load(*p));
  }
}

/* The dtypes the backend multiplies: float32 or float64 throughout, or bfloat16 a and b into a
 * bfloat16 or float32 out. */
static int matmul_dtypes_ok(const fl_tensor *out, const fl_tensor *a, const fl_tensor *b) {
  if (a->dtype != b->dtype) return 0;
  if (a->dtype == FL_BF16) return out->dtype == FL_BF16 || out->dtype == FL_F32;
  return (a->dtype == FL_F32 || a->dtype == FL_F64) && out->dtype == a->dtype;
}

/* C (column-major N x M) = alpha * op(B) op(A) + beta * C with bfloat16 A, B: one GEMM or a strided
 * batch, float accumulation and float alpha/beta. */
static int gemm_bf16(const char *op, cu_dev *d, cublasOperation_t tb, cublasOperation_t ta, int64_t N, int64_t M,
                     int64_t K, float al, const fl_tensor *b, int64_t ldb, int64_t sb, const fl_tensor *a,
                     int64_t lda, int64_t sa, float be, fl_tensor *out, int64_t ldc, int64_t sc, int64_t B) {
  cudaDataType_t ct = out->dtype == FL_BF16 ? CUDA_R_16BF : CUDA_R_32F;
  /* TF32 concerns float32 inputs only; bfloat16 products run on tensor cores in any mode */
  CUBLAS_TRY(op, cublasSetMathMode(d->blas, CUBLAS_DEFAULT_MATH));
  if (B == 1)
    CUBLAS_TRY(op, cublasGemmEx(d->blas, tb, ta, (int)N, (int)M, (int)K, &al, cu_ptr(b), CUDA_R_16BF, (int)ldb,
                                cu_ptr(a), CUDA_R_16BF, (int)lda, &be, cu_ptr(out), ct, (int)ldc, CUBLAS_COMPUTE_32F,
                                CUBLAS_GEMM_DEFAULT));
  else
    CUBLAS_TRY(op, cublasGemmStridedBatchedEx(d->blas, tb, ta, (int)N, (int)M, (int)K, &al, cu_ptr(b), CUDA_R_16BF,
                                              (int)ldb, sb, cu_ptr(a), CUDA_R_16BF, (int)lda, sa, &be, cu_ptr(out),
                                              ct, (int)ldc, sc, (int)B, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
  return 0;
}

int cu_backend_matmul(fl_tensor *out, const fl_tensor *a, const fl_tensor *b, double alpha, double beta) {
  const char *op = "cuda matmul";
  if (a->ndim != 3 || b->ndim != 3 || out->ndim != 3)
    return fl_fail("%s: expected 3-d (batch, rows, cols) operands", op);
  if (!matmul_dtypes_ok(out, a, b))
    return fl_fail("%s: expected float32 or float64 operands of one dtype, or bfloat16 operands with a bfloat16 "
                   "or float32 output, got %s @ %s into %s", op, fl_dtype_name(a->dtype), fl_dtype_name(b->dtype),
                   fl_dtype_name(out->dtype));
  int64_t B = a->shape[0], M = a->shape[1], K = a->shape[2], N = b->shape[2];
  if (M > INT_MAX || N > INT_MAX || K > INT_MAX || B > INT_MAX)
    return fl_fail("%s: sizes above %d are not supported by cuBLAS", op, INT_MAX);
  if (M == 0 || N == 0 || B == 0) return 0;
  cublasOperation_t ta, tb;
  int64_t lda, ldb;
  gemm_layout(M, K, a->stride[1], a->stride[2], &ta, &lda);
  gemm_layout(K, N, b->stride[1], b->stride[2], &tb, &ldb);
  int64_t ldc = M == 1 ? N : out->stride[1];
  if (ldc < 1) ldc = 1;
  if (out->stride[2] != 1 && N > 1) return fl_fail("%s: the output's rows must have unit stride", op);
  if (lda > INT_MAX || ldb > INT_MAX || ldc > INT_MAX)
    return fl_fail("%s: a leading dimension above %d is not supported by cuBLAS", op, INT_MAX);
  cu_dev *d;
  if (cu_enter(op, out->storage->device, &d)) return -1;
  int64_t sa = a->stride[0], sb = b->stride[0], sc = out->stride[0];
  if (K == 0) {   /* empty sum: out = beta * out */
    return cu_visit_act(op, out->dtype, [&](auto tag) {
      typedef typename decltype(tag)::type T;
      scale_rows_kernel<T><<<cu_grid(d, B * M * N, CU_THREADS), CU_THREADS, 0, d->stream>>>(
          (T *)cu_ptr(out), M, N, ldc, sc, B, (cu_acc_t<T>)beta);
      return cu_launched(op);
    });
  }
  /* one b for every batch, with a's and out's batches stacked as rows: a single GEMM with B*M rows */
  if (B > 1 && sb == 0 && ta == CUBLAS_OP_N && sa == M * lda && sc == M * ldc && B * M <= INT_MAX) {
    M *= B;
    B = 1;
  }
  if (B > 1 && sc == 0) return fl_fail("%s: batches of the output overlap (batch stride 0)", op);
  if (cu_blas(op, d)) return -1;
  if (a->dtype == FL_BF16)
    return gemm_bf16(op, d, tb, ta, N, M, K, (float)alpha, b, ldb, sb, a, lda, sa, (float)beta, out, ldc, sc, B);
  if (a->dtype == FL_F32) {
    CUBLAS_TRY(op, cublasSetMathMode(d->blas, cu_allow_tf32 ? CUBLAS_TF32_TENSOR_OP_MATH : CUBLAS_DEFAULT_MATH));
    float al = (float)alpha, be = (float)beta;
    if (B == 1)
      CUBLAS_TRY(op, cublasSgemm(d->blas, tb, ta, (int)N, (int)M, (int)K, &al, (const float *)cu_ptr(b), (int)ldb,
                                 (const float *)cu_ptr(a), (int)lda, &be, (float *)cu_ptr(out), (int)ldc));
    else
      CUBLAS_TRY(op, cublasSgemmStridedBatched(d->blas, tb, ta, (int)N, (int)M, (int)K, &al,
                                               (const float *)cu_ptr(b), (int)ldb, sb, (const float *)cu_ptr(a),
                                               (int)lda, sa, &be, (float *)cu_ptr(out), (int)ldc, sc, (int)B));
  } else {
    CUBLAS_TRY(op, cublasSetMathMode(d->blas, CUBLAS_DEFAULT_MATH));
    if (B == 1)
      CUBLAS_TRY(op, cublasDgemm(d->blas, tb, ta, (int)N, (int)M, (int)K, &alpha, (const double *)cu_ptr(b),
                                 (int)ldb, (const double *)cu_ptr(a), (int)lda, &beta, (double *)cu_ptr(out),
                                 (int)ldc));
    else
      CUBLAS_TRY(op, cublasDgemmStridedBatched(d->blas, tb, ta, (int)N, (int)M, (int)K, &alpha,
                                               (const double *)cu_ptr(b), (int)ldb, sb, (const double *)cu_ptr(a),
                                               (int)lda, sa, &beta, (double *)cu_ptr(out), (int)ldc, sc, (int)B));
  }
  return 0;
}
