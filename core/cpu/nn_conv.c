/* The CPU's convolution kernels (struct fl_nn_ops): Conv2D and DepthwiseConv2D, forward and both
 * backward passes. Our convolutions are GEMMs on NHWC through OpenBLAS: 1x1 stride-1 convolutions
 * use the activations directly as the GEMM's left matrix; others go through im2col in chunks of
 * output rows, so the column buffer stays a few MB (reused, per thread) whatever the batch size.
 * Most float32 convolutions go to oneDNN instead (conv_dnnl.c), which measured faster; the engine
 * notes below say which. (A Winograd F(2x2,3x3) path lived here too, off by default because it
 * measured 1.2-1.8x slower than im2col + sgemm; oneDNN's direct kernels are faster than both, so it
 * went.) All tensors are contiguous and checked by the front (core/nn.c): x (N,H,W,C), w
 * (KH,KW,C,F), y (N,OH,OW,F). */
#ifndef NN_GENERIC
#include "nn_cpu.h"

/* elements per im2col chunk (about 4 MB of float32); tests shrink it to exercise chunk edges */
static int64_t nn_chunk = (int64_t)1 << 20;
#define FL_NN_CHUNK nn_chunk

void fl_nn_cpu_set_chunk(int64_t elements) { nn_chunk = elements > 0 ? elements : ((int64_t)1 << 20); }

/* Per-thread scratch buffers that only grow (slots: 0 im2col columns, 1 partial gradients):
 * convolutions reuse them instead of allocating per call. OpenMP's worker threads persist, so each
 * keeps its buffers across calls. */
static _Thread_local void *scratch_ptr[2];
static _Thread_local size_t scratch_cap[2];

static void *fl_cpu_nn_scratch(int slot, size_t nbytes) {
  if (nbytes <= scratch_cap[slot]) return scratch_ptr[slot];
  void *p = NULL;
  size_t cap = nbytes + nbytes / 4;
  if (posix_memalign(&p, 64, cap) != 0) return NULL;
  free(scratch_ptr[slot]);
  scratch_ptr[slot] = p;
  scratch_cap[slot] = cap;
  return p;
}

/* Threads for a convolution of `macs` multiply-adds: one below ~1 MMAC, where a fork costs more
 * than it saves. */
static int nn_threads(int64_t macs) {
  int nt = fl_get_num_threads();
  if (nt < 1) nt = 1;
  return macs < ((int64_t)1 << 20) ? 1 : nt;
}

/* Rows per block of a 1x1 convolution's GEMM: about four blocks per thread, taken dynamically so a
 * thread slowed by other processes does not hold the rest back (rows are independent, so the
 * result does not depend on who computes what); at least 256 rows to keep each GEMM efficient. */
static int64_t pointwise_block(int64_t m, int nt) {
  int64_t per = (m + 4 * nt - 1) / (4 * nt);
  return per < 256 ? (m < 256 ? (m > 0 ? m : 1) : 256) : per;
}

/* While our own threads each run a GEMM, OpenBLAS must run single-threaded in each of them. */
static void blas_single_begin(int nt) { if (nt > 1) openblas_set_num_threads(1); }
static void blas_single_end(int nt) { if (nt > 1) openblas_set_num_threads(fl_get_num_threads()); }

/* A 1x1, stride 1, unpadded convolution is a plain GEMM on NHWC: no im2col needed. */
static int win_is_pointwise(const fl_window *w) {
  return w->kh == 1 && w->kw == 1 && w->sh == 1 && w->sw == 1 && w->pt == 0 && w->pb == 0 && w->pl == 0 &&
         w->pr == 0;
}

#define NN_GENERIC "nn_conv.c"
#include "nn_generic.h"

/* ---- which engine runs a float32 convolution ----
 * oneDNN (core/cpu/conv_dnnl.c) or the GEMM kernels above, by what measured faster on this project's
 * 2-core AMD EPYC (AVX-512; oneDNN picks its brgconv kernels) with 2 threads at batch 8, on
 * ResNet50's and InceptionV3's shapes (ms per call, best of interleaved runs, ours / oneDNN; the
 * machine was shared, so the CPU time per call was compared too; tests/bench/layers.lua prints
 * the current numbers):
 *   forward: oneDNN everywhere: 3x3 1.25-1.4x (res3 128 at 28x28: 10.8 / 7.8), 1x1 1.05-1.3x, the
 *     7x7/2 stem 1.4x (12.1 / 8.6), InceptionV3's 1x7 / 7x1 1.2x; the fused BN+ReLU epilogue rides
 *     along as post-ops at no cost. Its worst: 1x1/2 512->1024 at 28x28, 0.86x; a tie on 3x3/2
 *     valid 192->320 at 17x17. Depthwise 1.6-2.8x (our loop is not blocked for the cache).
 *   backward data: oneDNN (1.1-1.7x) from 16 input channels; below, i.e. the RGB stem (7x7/2 3->64
 *     at 224: 21.5 / 44.0), ours: oneDNN has no blocked kernel for 3 channels.
 *   backward filter: oneDNN for spatial kernels from 64 input channels (3x3 1.15-1.45x, 1x7 1.25x)
 *     and 1x1 from 256 (1.05-1.3x); ours for 1x1 below 256 input channels (56x56 64->256: 5.8 /
 *     6.4, oneDNN's CPU time up to 1.3x ours) and spatial kernels below 64 (InceptionV3's 3x3/2
 *     32->32 at 149: 6.0 / 7.0). Depthwise always oneDNN (1.1-2.4x). The bias gradient is our
 *     column sum either way (oneDNN's fused one cost up to 1.7 ms more per call).
 * float64 (gradient checks) always runs our kernels: oneDNN has no float64 convolution. */
static fl_conv_engine conv_engine = FL_CONV_AUTO;
void fl_nn_cpu_set_conv_engine(fl_conv_engine e) { conv_engine = e; }

enum { CONV_FWD, CONV_BWD_DATA, CONV_BWD_FILTER };

/* 1 if this convolution goes to oneDNN. x (N,H,W,C), y (N,OH,OW,F). */
static int conv_by_dnnl(int op, int depthwise, const fl_tensor *x, const fl_tensor *y, const fl_tensor *w) {
  if (conv_engine == FL_CONV_OWN || x->dtype != FL_F32) return 0;
  if (fl_tensor_numel(x) == 0 || fl_tensor_numel(y) == 0 || fl_tensor_numel(w) == 0) return 0;
  if (conv_engine == FL_CONV_ONEDNN || depthwise) return 1;
  int64_t c = x->shape[3];
  int pointwise = w->shape[0] == 1 && w->shape[1] == 1;
  if (op == CONV_BWD_DATA) return c >= 16;
  if (op == CONV_BWD_FILTER) return c >= (pointwise ? 256 : 64);
  return 1;
}

/* oneDNN's result when it took the call, else ours */
#define ROUTE(call_dnnl, call_own) do { \
    int rc_ = (call_dnnl); \
    return rc_ <= 0 ? rc_ : (call_own); \
  } while (0)

/* gb (F) = beta*gb + sum of gy (N,OH,OW,F) over all but the channels (float32) */
static int bias_grad(fl_tensor *gb, const fl_tensor *gy, double beta) {
  int64_t f = gy->shape[3];
  return colsum_f32(fl_tensor_data(gb), fl_tensor_data(gy), fl_tensor_numel(gy) / f, f, beta);
}

/* ---- the entries of struct fl_nn_ops (cpu.c's table) ---- */

/* Conv2D (dw = 0) and DepthwiseConv2D (dw = 1) share their entries: bfloat16 through float32
 * stand-ins, then oneDNN or our float32 / float64 kernels. */
static int forward(int dw, fl_tensor *y, const fl_tensor *x, const fl_tensor *w, const fl_tensor *scale,
                   const fl_tensor *shift, int relu, const fl_window *win) {
  if (x->dtype == FL_BF16) {
    BF16_BEGIN;
    fl_tensor *y2 = OUT(y), *x2 = IN(x), *w2 = IN(w);
    BF16_END(forward(dw, y2, x2, w2, scale, shift, relu, win));
  }
  if (conv_by_dnnl(CONV_FWD, dw, x, y, w))
    ROUTE(cpu_dnnl_conv_forward(y, x, w, scale, shift, relu, win, dw),
          (dw ? depthwise_forward_f32 : conv2d_forward_f32)(y, x, w, scale, shift, relu, win));
  if (dw) return PICK(x, depthwise_forward, y, x, w, scale, shift, relu, win);
  return PICK(x, conv2d_forward, y, x, w, scale, shift, relu, win);
}

static int backward_data(int dw, fl_tensor *gx, const fl_tensor *gy, const fl_tensor *w, const fl_window *win) {
  if (gy->dtype == FL_BF16) {
    BF16_BEGIN;
    fl_tensor *gx2 = OUT(gx), *gy2 = IN(gy), *w2 = IN(w);
    BF16_END(backward_data(dw, gx2, gy2, w2, win));
  }
  if (conv_by_dnnl(CONV_BWD_DATA, dw, gx, gy, w))
    ROUTE(cpu_dnnl_conv_backward_data(gx, gy, w, win, dw),
          (dw ? depthwise_backward_data_f32 : conv2d_backward_data_f32)(gx, gy, w, win));
  if (dw) return PICK(gy, depthwise_backward_data, gx, gy, w, win);
  return PICK(gy, conv2d_backward_data, gx, gy, w, win);
}

/* oneDNN's weight gradient with our bias column sum (its fused one measured slower); our kernel
 * when oneDNN declines the problem (rc > 0) */
static int backward_filter(int dw, fl_tensor *gw, fl_tensor *gb, const fl_tensor *x, const fl_tensor *gy,
                           const fl_window *win, double beta) {
  if (x->dtype == FL_BF16) {
    BF16_BEGIN;
    fl_tensor *gw2 = cpu_bf16_arg(&c, gw, beta != 0, 1), *x2 = IN(x), *gy2 = IN(gy);
    BF16_END(backward_filter(dw, gw2, gb, x2, gy2, win, beta));
  }
  if (conv_by_dnnl(CONV_BWD_FILTER, dw, x, gy, gw)) {
    int rc = cpu_dnnl_conv_backward_filter(gw, x, gy, win, beta, dw);
    if (rc == 0 && gb) rc = bias_grad(gb, gy, beta);
    if (rc <= 0) return rc;
  }
  if (dw) return PICK(x, depthwise_backward_filter, gw, gb, x, gy, win, beta);
  return PICK(x, conv2d_backward_filter, gw, gb, x, gy, win, beta);
}

int cpu_conv2d_forward(fl_tensor *y, const fl_tensor *x, const fl_tensor *w, const fl_tensor *scale,
                       const fl_tensor *shift, int relu, const fl_window *win) {
  return forward(0, y, x, w, scale, shift, relu, win);
}
int cpu_depthwise_forward(fl_tensor *y, const fl_tensor *x, const fl_tensor *w, const fl_tensor *scale,
                          const fl_tensor *shift, int relu, const fl_window *win) {
  return forward(1, y, x, w, scale, shift, relu, win);
}
int cpu_conv2d_backward_data(fl_tensor *gx, const fl_tensor *gy, const fl_tensor *w, const fl_window *win) {
  return backward_data(0, gx, gy, w, win);
}
int cpu_depthwise_backward_data(fl_tensor *gx, const fl_tensor *gy, const fl_tensor *w, const fl_window *win) {
  return backward_data(1, gx, gy, w, win);
}
int cpu_conv2d_backward_filter(fl_tensor *gw, fl_tensor *gb, const fl_tensor *x, const fl_tensor *gy,
                               const fl_window *win, double beta) {
  return backward_filter(0, gw, gb, x, gy, win, beta);
}
int cpu_depthwise_backward_filter(fl_tensor *gw, fl_tensor *gb, const fl_tensor *x, const fl_tensor *gy,
                                  const fl_window *win, double beta) {
  return backward_filter(1, gw, gb, x, gy, win, beta);
}

#else   /* ---- the generic part: compiled for float (real, NN(name) = name_f32) and double ---- */

/* Column sums of g (rows, f) into out: out = beta*out + sum_r g[r,:]. Accumulates in double. */
static int NN(colsum)(real *out, const real *g, int64_t rows, int64_t f, double beta) {
  int nt = omp_get_max_threads();
  double *part = calloc((size_t)nt * (size_t)f, sizeof(double));
  if (!part) return fl_fail_oom("out of memory (%lld bytes of partial sums)", (long long)(nt * f * 8));
#pragma omp parallel if (rows * f > 32768)
  {
    double *p = part + (int64_t)omp_get_thread_num() * f;
#pragma omp for schedule(static)
    for (int64_t r = 0; r < rows; r++) {
      const real *q = g + r * f;
      SIMD for (int64_t c = 0; c < f; c++) p[c] += q[c];
    }
  }
  for (int64_t c = 0; c < f; c++) {
    double s = beta == 0 ? 0 : beta * out[c];
    for (int t = 0; t < nt; t++) s += part[(int64_t)t * f + c];
    out[c] = (real)s;
  }
  free(part);
  return 0;
}

/* Shapes of one convolution call, unpacked once. */
typedef struct {
  int64_t n, h, w, c;       /* input */
  int64_t oh, ow, f;        /* output */
  int64_t k;                /* patch length kh*kw*c */
} NN(conv_dims);

/* Fills rows [r0, r1) of im2col: output row r = n*OH + oh holds OW patches of length K laid out
 * (kh, kw, c), which matches the HWIO kernel viewed as a (K, F) matrix. */
static void NN(im2col)(real *cols, const real *x, const NN(conv_dims) *d, const fl_window *win, int64_t r0,
                       int64_t r1, int par) {
  const int64_t C = d->c, K = d->k, KW = win->kw;
#pragma omp parallel for schedule(static) if (par && (r1 - r0) * d->ow * K > 16384)
  for (int64_t r = r0; r < r1; r++) {
    int64_t n = r / d->oh, oh = r % d->oh;
    for (int64_t ow = 0; ow < d->ow; ow++) {
      real *dst = cols + ((r - r0) * d->ow + ow) * K;
      int64_t iw0 = ow * win->sw - win->pl;
      /* the whole row of the window is inside the input and dense: one copy per kernel row */
      int dense = win->dw == 1 && iw0 >= 0 && iw0 + KW <= d->w;
      for (int i = 0; i < win->kh; i++) {
        int64_t ih = oh * win->sh - win->pt + (int64_t)i * win->dh;
        if (ih < 0 || ih >= d->h) {
          memset(dst, 0, sizeof(real) * (size_t)(KW * C));
          dst += KW * C;
          continue;
        }
        const real *src = x + ((n * d->h + ih) * d->w) * C;
        if (dense) {
          memcpy(dst, src + iw0 * C, sizeof(real) * (size_t)(KW * C));
          dst += KW * C;
          continue;
        }
        for (int j = 0; j < KW; j++, dst += C) {
          int64_t iw = iw0 + (int64_t)j * win->dw;
          if (iw < 0 || iw >= d->w) memset(dst, 0, sizeof(real) * (size_t)C);
          else memcpy(dst, src + iw * C, sizeof(real) * (size_t)C);
        }
      }
    }
  }
}

/* Adds the patch gradients of output rows [r0, r1) back into gx (the adjoint of im2col). Written as a
 * gather over input rows so that threads never write the same element. */
static void NN(col2im)(real *gx, const real *gcols, const NN(conv_dims) *d, const fl_window *win, int64_t r0,
                       int64_t r1, int par) {
  const int64_t C = d->c, K = d->k;
  int64_t q0 = (r0 / d->oh) * d->h, q1 = ((r1 - 1) / d->oh + 1) * d->h;
#pragma omp parallel for schedule(static) if (par && (q1 - q0) * d->w * C > 16384)
  for (int64_t q = q0; q < q1; q++) {
    int64_t n = q / d->h, ih = q % d->h;
    for (int i = 0; i < win->kh; i++) {
      int64_t t = ih + win->pt - (int64_t)i * win->dh;
      if (t < 0 || t % win->sh) continue;
      int64_t oh = t / win->sh;
      if (oh >= d->oh) continue;
      int64_t r = n * d->oh + oh;
      if (r < r0 || r >= r1) continue;
      const real *grow = gcols + (r - r0) * d->ow * K + (int64_t)i * win->kw * C;
      for (int64_t iw = 0; iw < d->w; iw++) {
        real *dst = gx + (q * d->w + iw) * C;
        for (int j = 0; j < win->kw; j++) {
          int64_t u = iw + win->pl - (int64_t)j * win->dw;
          if (u < 0 || u % win->sw) continue;
          int64_t ow = u / win->sw;
          if (ow >= d->ow) continue;
          const real *src = grow + ow * K + (int64_t)j * C;
          SIMD for (int64_t c = 0; c < C; c++) dst[c] += src[c];
        }
      }
    }
  }
}

/* Output rows per im2col chunk: the column buffer stays near FL_NN_CHUNK elements (a few MB, reused
 * per thread) so that peak memory does not grow with the batch, and there are at least `parts`
 * chunks so that every thread gets work. */
static int64_t NN(chunk_rows)(const NN(conv_dims) *d, int parts) {
  int64_t per = d->ow * d->k, total = d->n * d->oh;
  int64_t r = FL_NN_CHUNK / (per > 0 ? per : 1);
  int64_t fair = (total + parts - 1) / parts;
  if (r > fair) r = fair;
  if (r < 1) r = 1;
  return r;
}

static void NN(conv_dims_of)(NN(conv_dims) *d, const fl_tensor *x, const fl_tensor *w, const fl_tensor *y) {
  d->n = x->shape[0]; d->h = x->shape[1]; d->w = x->shape[2]; d->c = x->shape[3];
  d->oh = y->shape[1]; d->ow = y->shape[2]; d->f = y->shape[3];
  d->k = w->shape[0] * w->shape[1] * w->shape[2];
}

/* C (m,n) = A (m,k) @ B (k,n), row-major with leading dims, on the calling thread's BLAS */
static void NN(gemm_nn)(int64_t m, int64_t n, int64_t k, const real *A, int64_t lda, const real *B, int64_t ldb,
                        real beta, real *C, int64_t ldc) {
  GEMM(CblasRowMajor, CblasNoTrans, CblasNoTrans, (blasint)m, (blasint)n, (blasint)k, 1, A, (blasint)lda, B,
       (blasint)ldb, beta, C, (blasint)ldc);
}

/* ---- Conv2D ----
 * Threads: every thread runs whole chunks (im2col, a single-threaded GEMM, the epilogue) rather than
 * sharing each GEMM through OpenBLAS's own thread pool: on the narrow matrices of convolutions
 * (F = 64..512 columns) one-thread GEMMs side by side scale better, and the two thread pools no
 * longer spin against each other (measured 2-5x on 2 cores for early ResNet layers). */

static int NN(conv2d_forward)(fl_tensor *y, const fl_tensor *x, const fl_tensor *w, const fl_tensor *scale,
                              const fl_tensor *shift, int relu, const fl_window *win) {
  NN(conv_dims) d;
  NN(conv_dims_of)(&d, x, w, y);
  const real *X = fl_tensor_data(x), *Wt = fl_tensor_data(w), *SC = OPT(scale), *SH = OPT(shift);
  real *Y = fl_tensor_data(y);
  if (fl_tensor_numel(y) == 0) return 0;
  if (d.k == 0) {
    memset(Y, 0, sizeof(real) * (size_t)fl_tensor_numel(y));
    NN(epilogue_p)(Y, d.n * d.oh * d.ow, d.f, SC, SH, relu, 1);
    return 0;
  }
  int nt = nn_threads(d.n * d.oh * d.ow * d.f * d.k);
  if (win_is_pointwise(win)) {
    /* y (M,F) = x (M,C) @ w (C,F), rows split between threads */
    int64_t m = d.n * d.h * d.w, per = pointwise_block(m, nt), nb = (m + per - 1) / per;
    blas_single_begin(nt);
#pragma omp parallel for schedule(dynamic, 1) num_threads(nt) if (nt > 1)
    for (int64_t t = 0; t < nb; t++) {
      int64_t a = t * per, b = a + per < m ? a + per : m;
      NN(gemm_nn)(b - a, d.f, d.c, X + a * d.c, d.c, Wt, d.f, 0, Y + a * d.f, d.f);
      NN(epilogue_p)(Y + a * d.f, b - a, d.f, SC, SH, relu, 0);
    }
    blas_single_end(nt);
    return 0;
  }
  int64_t R = NN(chunk_rows)(&d, nt), total = d.n * d.oh, nchunks = (total + R - 1) / R;
  int failed = 0;
  blas_single_begin(nt);
#pragma omp parallel for schedule(dynamic, 1) num_threads(nt) if (nt > 1)
  for (int64_t ci = 0; ci < nchunks; ci++) {
    int64_t r0 = ci * R, r1 = r0 + R < total ? r0 + R : total, m = (r1 - r0) * d.ow;
    real *cols = fl_cpu_nn_scratch(0, sizeof(real) * (size_t)(R * d.ow * d.k));
    if (!cols) {
#pragma omp atomic write
      failed = 1;
      continue;
    }
    NN(im2col)(cols, X, &d, win, r0, r1, 0);
    real *yr = Y + r0 * d.ow * d.f;
    NN(gemm_nn)(m, d.f, d.k, cols, d.k, Wt, d.f, 0, yr, d.f);
    NN(epilogue_p)(yr, m, d.f, SC, SH, relu, 0);
  }
  blas_single_end(nt);
  if (failed) return fl_fail_oom("out of memory (im2col buffer of %lld elements)", (long long)(R * d.ow * d.k));
  return 0;
}

static int NN(conv2d_backward_data)(fl_tensor *gx, const fl_tensor *gy, const fl_tensor *w, const fl_window *win) {
  NN(conv_dims) d;
  NN(conv_dims_of)(&d, gx, w, gy);
  const real *GY = fl_tensor_data(gy), *Wt = fl_tensor_data(w);
  real *GX = fl_tensor_data(gx);
  if (fl_tensor_numel(gx) == 0) return 0;
  int nt = nn_threads(d.n * d.oh * d.ow * d.f * d.k);
  if (win_is_pointwise(win) && d.f > 0) {
    /* gx (M,C) = gy (M,F) @ w(C,F)^T, rows split between threads */
    int64_t m = d.n * d.h * d.w, per = pointwise_block(m, nt), nb = (m + per - 1) / per;
    blas_single_begin(nt);
#pragma omp parallel for schedule(dynamic, 1) num_threads(nt) if (nt > 1)
    for (int64_t t = 0; t < nb; t++) {
      int64_t a = t * per, b = a + per < m ? a + per : m;
      GEMM(CblasRowMajor, CblasNoTrans, CblasTrans, (blasint)(b - a), (blasint)d.c, (blasint)d.f, 1,
           GY + a * d.f, (blasint)d.f, Wt, (blasint)d.f, 0, GX + a * d.c, (blasint)d.c);
    }
    blas_single_end(nt);
    return 0;
  }
  memset(GX, 0, sizeof(real) * (size_t)fl_tensor_numel(gx));
  if (fl_tensor_numel(gy) == 0 || d.f == 0) return 0;
  /* Windows of neighbouring output rows overlap in the input, so threads work on whole images when
   * there are enough of them; otherwise chunks run one after another, each GEMM and col2im shared. */
  int per_image = nt > 1 && d.n >= nt;
  int64_t R = NN(chunk_rows)(&d, 1);
  if (per_image && R > d.oh) R = d.oh;
  int64_t cpi = per_image ? (d.oh + R - 1) / R : 0;   /* chunks per image */
  int failed = 0;
  if (per_image) {
    blas_single_begin(nt);
#pragma omp parallel for schedule(dynamic, 1) num_threads(nt)
    for (int64_t n = 0; n < d.n; n++) {
      real *gcols = fl_cpu_nn_scratch(0, sizeof(real) * (size_t)(R * d.ow * d.k));
      if (!gcols) {
#pragma omp atomic write
        failed = 1;
        continue;
      }
      for (int64_t c = 0; c < cpi; c++) {
        int64_t r0 = n * d.oh + c * R, r1 = r0 + R < (n + 1) * d.oh ? r0 + R : (n + 1) * d.oh;
        GEMM(CblasRowMajor, CblasNoTrans, CblasTrans, (blasint)((r1 - r0) * d.ow), (blasint)d.k, (blasint)d.f, 1,
             GY + r0 * d.ow * d.f, (blasint)d.f, Wt, (blasint)d.f, 0, gcols, (blasint)d.k);
        NN(col2im)(GX, gcols, &d, win, r0, r1, 0);
      }
    }
    blas_single_end(nt);
  } else {
    int64_t total = d.n * d.oh;
    real *gcols = fl_cpu_nn_scratch(0, sizeof(real) * (size_t)(R * d.ow * d.k));
    if (!gcols) failed = 1;
    for (int64_t r0 = 0; r0 < total && !failed; r0 += R) {
      int64_t r1 = r0 + R < total ? r0 + R : total, m = (r1 - r0) * d.ow;
      /* gcols (m,K) = gy rows (m,F) @ w(K,F)^T */
      GEMM(CblasRowMajor, CblasNoTrans, CblasTrans, (blasint)m, (blasint)d.k, (blasint)d.f, 1,
           GY + r0 * d.ow * d.f, (blasint)d.f, Wt, (blasint)d.f, 0, gcols, (blasint)d.k);
      NN(col2im)(GX, gcols, &d, win, r0, r1, 1);
    }
  }
  if (failed) return fl_fail_oom("out of memory (col2im buffer of %lld elements)", (long long)(R * d.ow * d.k));
  return 0;
}

static int NN(conv2d_backward_filter)(fl_tensor *gw, fl_tensor *gb, const fl_tensor *x, const fl_tensor *gy,
                                      const fl_window *win, double beta) {
  NN(conv_dims) d;
  NN(conv_dims_of)(&d, x, gw, gy);
  const real *X = fl_tensor_data(x), *GY = fl_tensor_data(gy);
  real *GW = fl_tensor_data(gw);
  const int64_t m_all = d.n * d.oh * d.ow, nw = d.k * d.f;
  if (gb && NN(colsum)(fl_tensor_data(gb), GY, m_all, d.f, beta)) return -1;
  if (nw == 0) return 0;
  if (m_all == 0) {
    for (int64_t i = 0; i < nw; i++) GW[i] = beta == 0 ? 0 : (real)(beta * GW[i]);
    return 0;
  }
  /* Each thread sums its chunks' cols^T @ gy into a private (K,F) buffer; the buffers are added at
   * the end. Chunks are assigned statically so that the sum's order does not depend on timing. */
  int nt = nn_threads(m_all * nw);
  int pw = win_is_pointwise(win);
  /* about four chunks per thread, dealt round-robin: balanced, and still a fixed assignment */
  int64_t R = pw ? 0 : NN(chunk_rows)(&d, 4 * nt), total = d.n * d.oh;
  int64_t nparts = pw ? 4 * (int64_t)nt : 0, per = pw ? (m_all + nparts - 1) / nparts : 0;
  int64_t nchunks = pw ? (m_all + per - 1) / per : (total + R - 1) / R;
  real **part = calloc((size_t)nt, sizeof(real *));
  if (!part) return fl_fail_oom("out of memory (partial kernel gradients)");
  int failed = 0;
  blas_single_begin(nt);
#pragma omp parallel num_threads(nt) if (nt > 1)
  {
    int t = omp_get_thread_num(), first = 1;
    real *acc = fl_cpu_nn_scratch(1, sizeof(real) * (size_t)nw);
    real *cols = pw ? NULL : fl_cpu_nn_scratch(0, sizeof(real) * (size_t)(R * d.ow * d.k));
    if (!acc || (!pw && !cols)) {
#pragma omp atomic write
      failed = 1;
    }
    part[t] = acc;
#pragma omp barrier
#pragma omp for schedule(static, 1)
    for (int64_t ci = 0; ci < nchunks; ci++) {
      if (failed) continue;
      if (pw) {  /* x rows are the columns already */
        int64_t a = ci * per, b = a + per < m_all ? a + per : m_all;
        if (a >= b) continue;
        GEMM(CblasRowMajor, CblasTrans, CblasNoTrans, (blasint)d.c, (blasint)d.f, (blasint)(b - a), 1,
             X + a * d.c, (blasint)d.c, GY + a * d.f, (blasint)d.f, first ? 0 : 1, acc, (blasint)d.f);
      } else {
        int64_t r0 = ci * R, r1 = r0 + R < total ? r0 + R : total, m = (r1 - r0) * d.ow;
        NN(im2col)(cols, X, &d, win, r0, r1, 0);
        GEMM(CblasRowMajor, CblasTrans, CblasNoTrans, (blasint)d.k, (blasint)d.f, (blasint)m, 1, cols,
             (blasint)d.k, GY + r0 * d.ow * d.f, (blasint)d.f, first ? 0 : 1, acc, (blasint)d.f);
      }
      first = 0;
    }
    if (first && acc) memset(acc, 0, sizeof(real) * (size_t)nw);  /* a thread that got no chunk */
#pragma omp barrier
    /* gw = beta*gw + sum of the parts, split over elements between threads */
    if (!failed) {
      int nth = omp_get_num_threads();
      int64_t pe = (nw + nth - 1) / nth, e0 = t * pe, e1 = e0 + pe < nw ? e0 + pe : nw;
      for (int64_t e = e0; e < e1; e++) {
        real s = beta == 0 ? 0 : (real)(beta * GW[e]);
        for (int u = 0; u < nth; u++) s += part[u][e];
        GW[e] = s;
      }
    }
  }
  blas_single_end(nt);
  free(part);
  if (failed) return fl_fail_oom("out of memory (convolution gradient buffers)");
  return 0;
}

/* ---- DepthwiseConv2D: w (KH,KW,C,M), y channel c*M+m ---- */

static int NN(depthwise_forward)(fl_tensor *y, const fl_tensor *x, const fl_tensor *w, const fl_tensor *scale,
                                 const fl_tensor *shift, int relu, const fl_window *win) {
  const int64_t N = x->shape[0], H = x->shape[1], W = x->shape[2], C = x->shape[3], M = w->shape[3];
  const int64_t OH = y->shape[1], OW = y->shape[2], CM = C * M;
  const real *X = fl_tensor_data(x), *Wt = fl_tensor_data(w);
  real *Y = fl_tensor_data(y);
#pragma omp parallel for schedule(static) if (N * OH * OW * CM > 16384)
  for (int64_t r = 0; r < N * OH; r++) {
    int64_t n = r / OH, oh = r % OH;
    for (int64_t ow = 0; ow < OW; ow++) {
      real *out = Y + (r * OW + ow) * CM;
      SIMD for (int64_t c = 0; c < CM; c++) out[c] = 0;
      FOR_TAPS(win, oh, ow, H, W) {
        const real *xp = X + ((n * H + ih) * W + iw) * C;
        const real *wp = Wt + ((int64_t)i * win->kw + j) * CM;
        if (M == 1) {
          SIMD for (int64_t c = 0; c < C; c++) out[c] += xp[c] * wp[c];
        } else {
          for (int64_t c = 0; c < C; c++)
            for (int64_t m = 0; m < M; m++) out[c * M + m] += xp[c] * wp[c * M + m];
        }
      }
    }
  }
  NN(epilogue_p)(Y, N * OH * OW, CM, OPT(scale), OPT(shift), relu, 1);
  return 0;
}

static int NN(depthwise_backward_data)(fl_tensor *gx, const fl_tensor *gy, const fl_tensor *w, const fl_window *win) {
  const int64_t N = gx->shape[0], H = gx->shape[1], W = gx->shape[2], C = gx->shape[3], M = w->shape[3];
  const int64_t OH = gy->shape[1], OW = gy->shape[2], CM = C * M;
  const real *GY = fl_tensor_data(gy), *Wt = fl_tensor_data(w);
  real *GX = fl_tensor_data(gx);
  /* gather: each input pixel sums the outputs whose window covers it */
#pragma omp parallel for schedule(static) if (N * H * W * CM > 16384)
  for (int64_t q = 0; q < N * H; q++) {
    int64_t n = q / H, ih = q % H;
    for (int64_t iw = 0; iw < W; iw++) {
      real *dst = GX + (q * W + iw) * C;
      SIMD for (int64_t c = 0; c < C; c++) dst[c] = 0;
      for (int i = 0; i < win->kh; i++) {
        int64_t t = ih + win->pt - (int64_t)i * win->dh;
        if (t < 0 || t % win->sh) continue;
        int64_t oh = t / win->sh;
        if (oh >= OH) continue;
        for (int j = 0; j < win->kw; j++) {
          int64_t u = iw + win->pl - (int64_t)j * win->dw;
          if (u < 0 || u % win->sw) continue;
          int64_t ow = u / win->sw;
          if (ow >= OW) continue;
          const real *g = GY + ((n * OH + oh) * OW + ow) * CM;
          const real *wp = Wt + ((int64_t)i * win->kw + j) * CM;
          if (M == 1) {
            SIMD for (int64_t c = 0; c < C; c++) dst[c] += g[c] * wp[c];
          } else {
            for (int64_t c = 0; c < C; c++) {
              real s = 0;
              for (int64_t m = 0; m < M; m++) s += g[c * M + m] * wp[c * M + m];
              dst[c] += s;
            }
          }
        }
      }
    }
  }
  return 0;
}

static int NN(depthwise_backward_filter)(fl_tensor *gw, fl_tensor *gb, const fl_tensor *x, const fl_tensor *gy,
                                         const fl_window *win, double beta) {
  const int64_t N = x->shape[0], H = x->shape[1], W = x->shape[2], C = x->shape[3], M = gw->shape[3];
  const int64_t OH = gy->shape[1], OW = gy->shape[2], CM = C * M;
  const int64_t nw = (int64_t)win->kh * win->kw * CM;
  const real *X = fl_tensor_data(x), *GY = fl_tensor_data(gy);
  real *GW = fl_tensor_data(gw);
  if (gb && NN(colsum)(fl_tensor_data(gb), GY, N * OH * OW, CM, beta)) return -1;
  /* each thread accumulates its own copy of the (small) kernel gradient, then they are summed */
  int nt = omp_get_max_threads();
  real *part = calloc((size_t)nt * (size_t)nw, sizeof(real));
  if (!part) return fl_fail_oom("out of memory (%lld bytes of partial kernel gradients)",
                                (long long)(nt * nw * (int64_t)sizeof(real)));
#pragma omp parallel if (N * OH * OW * CM > 16384)
  {
    real *p = part + (int64_t)omp_get_thread_num() * nw;
#pragma omp for schedule(static)
    for (int64_t r = 0; r < N * OH; r++) {
      int64_t n = r / OH, oh = r % OH;
      for (int64_t ow = 0; ow < OW; ow++) {
        const real *g = GY + (r * OW + ow) * CM;
        FOR_TAPS(win, oh, ow, H, W) {
          const real *xp = X + ((n * H + ih) * W + iw) * C;
          real *gp = p + ((int64_t)i * win->kw + j) * CM;
          if (M == 1) {
            SIMD for (int64_t c = 0; c < C; c++) gp[c] += xp[c] * g[c];
          } else {
            for (int64_t c = 0; c < C; c++)
              for (int64_t m = 0; m < M; m++) gp[c * M + m] += xp[c] * g[c * M + m];
          }
        }
      }
    }
  }
  for (int64_t e = 0; e < nw; e++) {
    real s = beta == 0 ? 0 : (real)(beta * GW[e]);
    for (int t = 0; t < nt; t++) s += part[(int64_t)t * nw + e];
    GW[e] = s;
  }
  free(part);
  return 0;
}

#endif
