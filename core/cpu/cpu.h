/* Internals shared by the CPU backend's files: the strided iterator and the per-dtype macros. */
#ifndef FLOWER_CPU_H
#define FLOWER_CPU_H

#include "../nn.h"

/* Elements below which a loop stays on one thread (an OpenMP fork costs a few microseconds). */
#define CPU_GRAIN 32768
/* For costly per-element work (exp, tanh, random numbers): parallelise earlier. */
#define CPU_GRAIN_HEAVY 4096

/* A row function processes n elements of each operand: p[k] points at operand k's first element,
 * s[k] is its stride in elements. Operands' element types are known to the function. */
typedef void (*cpu_rowfn)(int64_t n, char **p, const int64_t *s, void *ctx);

#define CPU_MAXOP 4

/* Iteration over up to 4 tensors of one shape: dims of size 1 dropped and dims that are
 * contiguous in every operand merged, so a contiguous case is a single row. */
typedef struct {
  int nop, nd;
  int64_t numel;
  int64_t shape[FL_MAXDIM];
  int64_t st[CPU_MAXOP][FL_MAXDIM];
  char *base[CPU_MAXOP];
  int64_t esz[CPU_MAXOP];
} cpu_iter;

void cpu_iter_init(cpu_iter *it, int nop, const fl_tensor *const *t);
/* Runs fn over flat elements [start, end) in row-major order. */
void cpu_iter_range(const cpu_iter *it, int64_t start, int64_t end, cpu_rowfn fn, void *ctx);
/* Runs fn over everything, on several threads when numel >= grain. */
void cpu_foreach(int nop, const fl_tensor *const *t, cpu_rowfn fn, void *ctx, int64_t grain);

int cpu_nthreads(int64_t work, int64_t grain);  /* threads worth using for `work` elements */

/* X(name, C type, unsigned twin used for wrap-around arithmetic, is float) per dtype, in fl_dtype order */
#define CPU_DTYPES(X) \
  X(f32, float, float, 1) \
  X(f64, double, double, 1) \
  X(i32, int32_t, uint32_t, 0) \
  X(i64, int64_t, uint64_t, 0) \
  X(u8, uint8_t, uint8_t, 0)

/* Saturating conversions from double (a plain cast of an out-of-range value is undefined). */
static inline float cpu_to_f32(double v) { return (float)v; }
static inline double cpu_to_f64(double v) { return v; }
static inline int32_t cpu_to_i32(double v) {
  return v != v ? 0 : v >= 2147483647.0 ? INT32_MAX : v <= -2147483648.0 ? INT32_MIN : (int32_t)v;
}
static inline int64_t cpu_to_i64(double v) {
  return v != v ? 0 : v >= 9223372036854775807.0 ? INT64_MAX
       : v <= -9223372036854775808.0 ? INT64_MIN : (int64_t)v;
}
static inline uint8_t cpu_to_u8(double v) { return v != v ? 0 : v >= 255.0 ? 255 : v <= 0 ? 0 : (uint8_t)v; }

int cpu_binary(fl_binop op, fl_tensor *out, const fl_tensor *a, const fl_tensor *b);
int cpu_unary(fl_unop op, fl_tensor *out, const fl_tensor *a, double p0, double p1);
int cpu_where(fl_tensor *out, const fl_tensor *mask, const fl_tensor *a, const fl_tensor *b);
int cpu_copy(fl_tensor *dst, const fl_tensor *src);
int cpu_fill(fl_tensor *t, double value);
int cpu_reduce(fl_redop op, fl_tensor *out, const fl_tensor *a, int dim, int correction);
int cpu_softmax(fl_tensor *out, const fl_tensor *a, int dim, int log);
int cpu_matmul(fl_tensor *out, const fl_tensor *a, const fl_tensor *b, double alpha, double beta);
int cpu_rng(fl_tensor *out, fl_rngkind kind, uint64_t seed, uint64_t offset, double p0, double p1);

/* bfloat16 operands of a float32 kernel (core/cpu/bf16.c):
 *   cpu_bf16_call c; cpu_bf16_begin(&c);
 *   fl_tensor *o = cpu_bf16_arg(&c, out, 0, 1), *x = cpu_bf16_arg(&c, a, 1, 0);
 *   return cpu_bf16_end(&c, c.rc ? -1 : float32_kernel(o, x));
 * cpu_bf16_arg gives t itself unless t is bfloat16 (NULL stays NULL); then a float32 stand-in holding
 * t's values when `in`, copied back (rounded) into t by cpu_bf16_end when `out` and the kernel
 * succeeded. A failed allocation sets c.rc; cpu_bf16_end frees the stand-ins and returns rc. */
#define CPU_BF16_MAXARG 6
typedef struct {
  int n, rc;
  fl_tensor wide[CPU_BF16_MAXARG];
  fl_tensor *dst[CPU_BF16_MAXARG];
} cpu_bf16_call;
void cpu_bf16_begin(cpu_bf16_call *c);
fl_tensor *cpu_bf16_arg(cpu_bf16_call *c, const fl_tensor *t, int in, int out);
int cpu_bf16_end(cpu_bf16_call *c, int rc);

/* float32 exp, log, tanh, sigmoid over n contiguous elements (y may be x itself): vectorised
 * polynomial kernels, within 2-3 ulp of the exact result (core/cpu/vecmath.c). */
void cpu_vexp_f32(int64_t n, const float *x, float *y);
void cpu_vlog_f32(int64_t n, const float *x, float *y);
void cpu_vtanh_f32(int64_t n, const float *x, float *y);
void cpu_vsigmoid_f32(int64_t n, const float *x, float *y);
/* Instruction set the kernels above use: 0 baseline (SSE2 on x86-64), 1 AVX2+FMA, 2 AVX-512.
 * level < 0 only asks; level >= 0 selects min(level, what this CPU has) (for tests). */
int cpu_vecmath_level(int level);

/* float32 convolutions through oneDNN (core/cpu/conv_dnnl.c), on the same tensors as the fl_nn_ops
 * kernels; depthwise: w is (KH,KW,C,M). 0 done, -1 failed (message set), 1 when oneDNN cannot do
 * this one (the caller falls back to its own kernel). */
int cpu_dnnl_conv_forward(fl_tensor *y, const fl_tensor *x, const fl_tensor *w, const fl_tensor *scale,
                          const fl_tensor *shift, int relu, const fl_window *win, int depthwise);
int cpu_dnnl_conv_backward_data(fl_tensor *gx, const fl_tensor *gy, const fl_tensor *w,
                                const fl_window *win, int depthwise);
/* gw = beta*gw + dL/dw only: the bias gradient is the caller's (a column sum of gy, which measured
 * faster than oneDNN's fused one) */
int cpu_dnnl_conv_backward_filter(fl_tensor *gw, const fl_tensor *x, const fl_tensor *gy,
                                  const fl_window *win, double beta, int depthwise);

/* The nn kernels (struct fl_nn_ops of core/nn.h, gathered in cpu.c), by family: nn_conv.c, nn_pool.c,
 * nn_norm.c, nn_act.c, nn_loss.c, nn_optim.c. cpu_<name> has the type of the table's slot <name>. */
#define CPU_NN_DECLARE(name) __typeof__(*((struct fl_nn_ops *)0)->name) cpu_##name;
FL_NN_KERNELS(CPU_NN_DECLARE)

#endif
