/* Compiles the generic part of the nn family file named by NN_GENERIC (nn_cpu.h) twice: with
 *   real       float, then double
 *   NN(name)   name with the dtype's suffix (conv2d_forward_f32, conv2d_forward_f64)
 *   GEMM       cblas_sgemm, then cblas_dgemm
 * No include guard: each family file includes it once. */
#define real float
#define NN(name) name##_f32
#define GEMM cblas_sgemm
#include NN_GENERIC
#undef real
#undef NN
#undef GEMM

#define real double
#define NN(name) name##_f64
#define GEMM cblas_dgemm
#include NN_GENERIC
#undef real
#undef NN
#undef GEMM
