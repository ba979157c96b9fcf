/* CPU nn kernels, written once for a real type and included by nn_cpu.c for float and double
 * (Torch7's generic/ idea). Before including, nn_cpu.c defines:
 *   real       float or double
 *   NN(name)   name with a dtype suffix (conv2d_forward_f32)
 *   GEMM       cblas_sgemm or cblas_dgemm
 * All tensors are contiguous and checked by the front (core/nn.c): x (N,H,W,C), w (KH,KW,C,F),
 * y (N,OH,OW,F). Parallel loops use OpenMP; inside them each thread calls a single-threaded GEMM
 * (see the Conv2D section for why). Inner loops over channels carry SIMD (omp simd). */

/* ---- shared helpers ---- */

/* y[r, f] = y[r, f]*scale[f] + shift[f], then max(., 0) if relu; rows r in [0, rows).
 * par = 0 inside an already parallel region (no nested team) */
static void NN(epilogue_p)(real *y, int64_t rows, int64_t f, const real *scale, const real *shift, int relu,
                           int par) {
  if (!scale && !shift && !relu) return;
#pragma omp parallel for schedule(static) if (par && rows * f > 32768)
  for (int64_t r = 0; r < rows; r++) {
    real *p = y + r * f;
    if (scale && shift) {
      SIMD for (int64_t c = 0; c < f; c++) p[c] = p[c] * scale[c] + shift[c];
    } else if (scale) {
      SIMD for (int64_t c = 0; c < f; c++) p[c] *= scale[c];
    } else if (shift) {
      SIMD for (int64_t c = 0; c < f; c++) p[c] += shift[c];
    }
    if (relu) SIMD for (int64_t c = 0; c < f; c++) p[c] = p[c] < 0 ? 0 : p[c];
  }
}

static void NN(epilogue)(real *y, int64_t rows, int64_t f, const real *scale, const real *shift, int relu) {
  NN(epilogue_p)(y, rows, f, scale, shift, relu, 1);
}

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

static const real *NN(opt)(const fl_tensor *t) { return t ? (const real *)fl_tensor_data(t) : NULL; }

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
  const real *X = fl_tensor_data(x), *Wt = fl_tensor_data(w), *SC = NN(opt)(scale), *SH = NN(opt)(shift);
  real *Y = fl_tensor_data(y);
  if (fl_tensor_numel(y) == 0) return 0;
  if (d.k == 0) {
    memset(Y, 0, sizeof(real) * (size_t)fl_tensor_numel(y));
    NN(epilogue)(Y, d.n * d.oh * d.ow, d.f, SC, SH, relu);
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
      for (int i = 0; i < win->kh; i++) {
        int64_t ih = oh * win->sh - win->pt + (int64_t)i * win->dh;
        if (ih < 0 || ih >= H) continue;
        for (int j = 0; j < win->kw; j++) {
          int64_t iw = ow * win->sw - win->pl + (int64_t)j * win->dw;
          if (iw < 0 || iw >= W) continue;
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
  }
  NN(epilogue)(Y, N * OH * OW, CM, NN(opt)(scale), NN(opt)(shift), relu);
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
        for (int i = 0; i < win->kh; i++) {
          int64_t ih = oh * win->sh - win->pt + (int64_t)i * win->dh;
          if (ih < 0 || ih >= H) continue;
          for (int j = 0; j < win->kw; j++) {
            int64_t iw = ow * win->sw - win->pl + (int64_t)j * win->dw;
            if (iw < 0 || iw >= W) continue;
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
  }
  for (int64_t e = 0; e < nw; e++) {
    real s = beta == 0 ? 0 : (real)(beta * GW[e]);
    for (int t = 0; t < nt; t++) s += part[(int64_t)t * nw + e];
    GW[e] = s;
  }
  free(part);
  return 0;
}

/* ---- pooling ---- */

static int NN(pool2d_forward)(fl_tensor *y, fl_tensor *argmax, const fl_tensor *x, fl_pool_kind kind,
                              const fl_window *win) {
  const int64_t N = x->shape[0], H = x->shape[1], W = x->shape[2], C = x->shape[3];
  const int64_t OH = y->shape[1], OW = y->shape[2];
  const real *X = fl_tensor_data(x);
  real *Y = fl_tensor_data(y);
  if (argmax) {   /* max pooling that also records where each maximum is (first one wins) */
    int32_t *A = fl_tensor_data(argmax);
#pragma omp parallel for schedule(static) if (N * OH * OW * C > 16384)
    for (int64_t r = 0; r < N * OH; r++) {
      int64_t n = r / OH, oh = r % OH;
      for (int64_t ow = 0; ow < OW; ow++) {
        real *out = Y + (r * OW + ow) * C;
        int32_t *ai = A + (r * OW + ow) * C;
        int first = 1;
        for (int i = 0; i < win->kh; i++) {
          int64_t ih = oh * win->sh - win->pt + (int64_t)i * win->dh;
          if (ih < 0 || ih >= H) continue;
          for (int j = 0; j < win->kw; j++) {
            int64_t iw = ow * win->sw - win->pl + (int64_t)j * win->dw;
            if (iw < 0 || iw >= W) continue;
            const real *xp = X + ((n * H + ih) * W + iw) * C;
            const int32_t base = (int32_t)((ih * W + iw) * C);
            if (first) {
              SIMD for (int64_t c = 0; c < C; c++) { out[c] = xp[c]; ai[c] = base + (int32_t)c; }
              first = 0;
            } else {
              SIMD for (int64_t c = 0; c < C; c++) {   /* arithmetic select: vectorises */
                int32_t gt = xp[c] > out[c];
                ai[c] += gt * (base + (int32_t)c - ai[c]);
                out[c] = xp[c] > out[c] ? xp[c] : out[c];
              }
            }
          }
        }
      }
    }
    return 0;
  }
#pragma omp parallel for schedule(static) if (N * OH * OW * C > 16384)
  for (int64_t r = 0; r < N * OH; r++) {
    int64_t n = r / OH, oh = r % OH;
    for (int64_t ow = 0; ow < OW; ow++) {
      real *out = Y + (r * OW + ow) * C;
      int count = 0;
      const real init = kind == FL_POOL_MAX ? -(real)INFINITY : 0;
      SIMD for (int64_t c = 0; c < C; c++) out[c] = init;
      for (int i = 0; i < win->kh; i++) {
        int64_t ih = oh * win->sh - win->pt + (int64_t)i * win->dh;
        if (ih < 0 || ih >= H) continue;
        for (int j = 0; j < win->kw; j++) {
          int64_t iw = ow * win->sw - win->pl + (int64_t)j * win->dw;
          if (iw < 0 || iw >= W) continue;
          const real *xp = X + ((n * H + ih) * W + iw) * C;
          count++;
          if (kind == FL_POOL_MAX) {
            SIMD for (int64_t c = 0; c < C; c++) out[c] = xp[c] > out[c] ? xp[c] : out[c];
          } else {
            SIMD for (int64_t c = 0; c < C; c++) out[c] += xp[c];
          }
        }
      }
      if (kind == FL_POOL_AVG) {
        real inv = (real)1 / (real)(count > 0 ? count : 1);
        SIMD for (int64_t c = 0; c < C; c++) out[c] *= inv;
      }
    }
  }
  return 0;
}

static int NN(pool2d_backward)(fl_tensor *gx, const fl_tensor *gy, const fl_tensor *x, const fl_tensor *argmax,
                               fl_pool_kind kind, const fl_window *win) {
  const int64_t N = gx->shape[0], H = gx->shape[1], W = gx->shape[2], C = gx->shape[3];
  const int64_t OH = gy->shape[1], OW = gy->shape[2];
  const real *X = x ? fl_tensor_data(x) : NULL, *GY = fl_tensor_data(gy);
  real *GX = fl_tensor_data(gx);
  memset(GX, 0, sizeof(real) * (size_t)fl_tensor_numel(gx));
  if (argmax) {   /* scatter through the recorded positions; images are independent */
    const int32_t *A = fl_tensor_data(argmax);
    const int64_t per = OH * OW * C, img = H * W * C;
#pragma omp parallel for schedule(static) if (N > 1 && N * per > 16384)
    for (int64_t n = 0; n < N; n++) {
      const real *g = GY + n * per;
      const int32_t *a = A + n * per;
      real *dst = GX + n * img;
      for (int64_t e = 0; e < per; e++) dst[a[e]] += g[e];
    }
    return 0;
  }
  int nt = omp_get_max_threads();
  /* per thread: best value and its flat input offset, per channel (max pooling) */
  real *bestv = malloc(sizeof(real) * (size_t)(nt * C + 1));
  int64_t *besti = malloc(sizeof(int64_t) * (size_t)(nt * C + 1));
  if (!bestv || !besti) {
    free(bestv); free(besti);
    return fl_fail_oom("out of memory (pooling scratch)");
  }
  /* windows of one image overlap, so threads split the batch (or, for one image, run serially) */
#pragma omp parallel for schedule(static) if (N > 1 && N * H * W * C > 16384)
  for (int64_t n = 0; n < N; n++) {
    real *bv = bestv + (int64_t)omp_get_thread_num() * C;
    int64_t *bi = besti + (int64_t)omp_get_thread_num() * C;
    for (int64_t oh = 0; oh < OH; oh++) {
      for (int64_t ow = 0; ow < OW; ow++) {
        const real *g = GY + ((n * OH + oh) * OW + ow) * C;
        int count = 0;
        if (kind == FL_POOL_MAX)
          for (int64_t c = 0; c < C; c++) { bv[c] = -(real)INFINITY; bi[c] = -1; }
        for (int i = 0; kind == FL_POOL_MAX && i < win->kh; i++) {
          int64_t ih = oh * win->sh - win->pt + (int64_t)i * win->dh;
          if (ih < 0 || ih >= H) continue;
          for (int j = 0; j < win->kw; j++) {
            int64_t iw = ow * win->sw - win->pl + (int64_t)j * win->dw;
            if (iw < 0 || iw >= W) continue;
            int64_t off = ((n * H + ih) * W + iw) * C;
            count++;
            if (kind == FL_POOL_MAX) {
              const real *xp = X + off;
              if (count == 1) {   /* the window's first element inside the input */
                SIMD for (int64_t c = 0; c < C; c++) { bv[c] = xp[c]; bi[c] = off + c; }
              } else {
                SIMD for (int64_t c = 0; c < C; c++) {
                  int gt = xp[c] > bv[c];
                  bv[c] = gt ? xp[c] : bv[c];
                  bi[c] = gt ? off + c : bi[c];
                }
              }
            }
          }
        }
        if (kind == FL_POOL_MAX) {
          for (int64_t c = 0; c < C; c++)
            if (bi[c] >= 0) GX[bi[c]] += g[c];
        } else {
          /* average: the window's elements inside the input, counted first; g*inv once per output
           * (bv as scratch), then added to each of them (the same products as before, row order) */
          for (int i = 0; i < win->kh; i++) {
            int64_t ih = oh * win->sh - win->pt + (int64_t)i * win->dh;
            if (ih < 0 || ih >= H) continue;
            for (int j = 0; j < win->kw; j++) {
              int64_t iw = ow * win->sw - win->pl + (int64_t)j * win->dw;
              if (iw >= 0 && iw < W) count++;
            }
          }
          if (count == 0) continue;
          real inv = (real)1 / (real)count;
          SIMD for (int64_t c = 0; c < C; c++) bv[c] = g[c] * inv;
          for (int i = 0; i < win->kh; i++) {
            int64_t ih = oh * win->sh - win->pt + (int64_t)i * win->dh;
            if (ih < 0 || ih >= H) continue;
            for (int j = 0; j < win->kw; j++) {
              int64_t iw = ow * win->sw - win->pl + (int64_t)j * win->dw;
              if (iw < 0 || iw >= W) continue;
              real *dst = GX + ((n * H + ih) * W + iw) * C;
              SIMD for (int64_t c = 0; c < C; c++) dst[c] += bv[c];
            }
          }
        }
      }
    }
  }
  free(bestv);
  free(besti);
  return 0;
}

/* ---- batch normalisation over rows of (rows, C) ---- */

/* One pass: per-thread sums of x and x^2 in double, reduced into sum (C) and sumsq (C). The
 * variance is then E[x^2] - mean^2, which in double loses nothing that matters for activations. */
/* Rows per block of the batch-norm reductions: sums over a block run in the tensor's type with full
 * SIMD width, then go into double accumulators (precision of double sums, speed of float loops).
 * The moments are taken of x - x[0] (the first row, per channel): the variance is unchanged and
 * E[v^2] - E[v]^2 does not cancel badly when the mean is large against the spread. */
#define BN_BLOCK 16

static void NN(bn_moments)(double *part, int nt, const real *x, int64_t rows, int64_t C, double *sum, double *sumsq) {
  memset(part, 0, sizeof(double) * (size_t)(nt * 2 * C));
  const int64_t nb = (rows + BN_BLOCK - 1) / BN_BLOCK;
  real *blk = malloc(sizeof(real) * (size_t)(nt * 2 * C));
#pragma omp parallel if (blk && rows * C > 32768)
  {
    int t = omp_get_thread_num();
    double *p = part + (int64_t)t * 2 * C, *q2 = p + C;
    real *b1 = blk ? blk + (int64_t)t * 2 * C : NULL, *b2 = b1 ? b1 + C : NULL;
#pragma omp for schedule(static)
    for (int64_t bi = 0; bi < nb; bi++) {
      int64_t r0 = bi * BN_BLOCK, r1 = r0 + BN_BLOCK < rows ? r0 + BN_BLOCK : rows;
      if (!b1) {   /* no scratch: plain double sums */
        for (int64_t r = r0; r < r1; r++) {
          const real *q = x + r * C;
          SIMD for (int64_t c = 0; c < C; c++) { double v = (double)q[c] - x[c]; p[c] += v; q2[c] += v * v; }
        }
        continue;
      }
      SIMD for (int64_t c = 0; c < C; c++) { b1[c] = 0; b2[c] = 0; }
      for (int64_t r = r0; r < r1; r++) {
        const real *q = x + r * C;
        SIMD for (int64_t c = 0; c < C; c++) { real v = q[c] - x[c]; b1[c] += v; b2[c] += v * v; }
      }
      SIMD for (int64_t c = 0; c < C; c++) { p[c] += b1[c]; q2[c] += b2[c]; }
    }
  }
  free(blk);
  for (int64_t c = 0; c < C; c++) { sum[c] = 0; sumsq[c] = 0; }
  for (int t = 0; t < nt; t++)
    for (int64_t c = 0; c < C; c++) { sum[c] += part[(int64_t)t * 2 * C + c]; sumsq[c] += part[(int64_t)t * 2 * C + C + c]; }
}

static int NN(batchnorm_forward_train)(fl_tensor *y, fl_tensor *mean, fl_tensor *invstd, const fl_tensor *x,
                                       const fl_tensor *gamma, const fl_tensor *beta, fl_tensor *running_mean,
                                       fl_tensor *running_var, double momentum, double eps, int unbiased, int relu) {
  const int64_t C = x->shape[x->ndim - 1], rows = fl_tensor_numel(x) / C;
  const real *X = fl_tensor_data(x), *G = NN(opt)(gamma), *B = NN(opt)(beta);
  real *Y = fl_tensor_data(y), *MEAN = fl_tensor_data(mean), *INV = fl_tensor_data(invstd);
  int nt = omp_get_max_threads();
  double *part = malloc(sizeof(double) * (size_t)(nt * 2 * C + 4 * C));
  real *ab = malloc(sizeof(real) * (size_t)(2 * C));
  if (!part || !ab) {
    free(part); free(ab);
    return fl_fail_oom("out of memory (batch-norm partial sums)");
  }
  double *dm = part + nt * 2 * C, *dv = dm + C, *s1 = dv + C, *s2 = s1 + C;
  NN(bn_moments)(part, nt, X, rows, C, s1, s2);   /* moments of x - x[0] */
  for (int64_t c = 0; c < C; c++) {
    double m = s1[c] / (double)rows, v = s2[c] / (double)rows - m * m;
    dm[c] = m + X[c];
    dv[c] = v > 0 ? v : 0;
  }
  /* y = x*a + b with a = gamma*invstd, b = beta - mean*a; a, b stored in y's dtype */
  for (int64_t c = 0; c < C; c++) {
    double inv = 1.0 / sqrt(dv[c] + eps), a = (G ? G[c] : 1) * inv;
    MEAN[c] = (real)dm[c];
    INV[c] = (real)inv;
    ab[c] = (real)a;
    ab[C + c] = (real)((B ? B[c] : 0) - dm[c] * a);
  }
  if (running_mean) {
    real *RM = fl_tensor_data(running_mean), *RV = fl_tensor_data(running_var);
    double unbias = unbiased && rows > 1 ? (double)rows / (double)(rows - 1) : 1.0;
    for (int64_t c = 0; c < C; c++) {
      RM[c] = (real)(momentum * RM[c] + (1 - momentum) * dm[c]);
      RV[c] = (real)(momentum * RV[c] + (1 - momentum) * dv[c] * unbias);
    }
  }
  free(part);
#pragma omp parallel for schedule(static) if (rows * C > 32768)
  for (int64_t r = 0; r < rows; r++) {
    const real *q = X + r * C;
    real *o = Y + r * C;
    if (relu) {
      SIMD for (int64_t c = 0; c < C; c++) { real v = q[c] * ab[c] + ab[C + c]; o[c] = v < 0 ? 0 : v; }
    } else {
      SIMD for (int64_t c = 0; c < C; c++) o[c] = q[c] * ab[c] + ab[C + c];
    }
  }
  free(ab);
  return 0;
}

static int NN(batchnorm_backward)(fl_tensor *gx, fl_tensor *ggamma, fl_tensor *gbeta, const fl_tensor *x,
                                  const fl_tensor *gy, const fl_tensor *mean, const fl_tensor *invstd,
                                  const fl_tensor *gamma, int training, double beta_acc, const fl_tensor *relu_y) {
  const int64_t C = x->shape[x->ndim - 1], rows = fl_tensor_numel(x) / C;
  const real *X = fl_tensor_data(x), *GY = fl_tensor_data(gy), *MEAN = fl_tensor_data(mean);
  const real *INV = fl_tensor_data(invstd), *G = NN(opt)(gamma), *RY = NN(opt)(relu_y);
  int nt = omp_get_max_threads();
  /* per thread: sum gy (C) and sum gy*xhat (C) */
  double *part = calloc((size_t)(nt * 2 * C + 2 * C), sizeof(double));
  if (!part) return fl_fail_oom("out of memory (batch-norm partial sums)");
  int need_sums = training || ggamma || gbeta;
  if (need_sums) {
    /* per block of rows, in the tensor's type: sum g and sum g*(x - mean); then double */
    const int64_t nb = (rows + BN_BLOCK - 1) / BN_BLOCK;
    real *blk = malloc(sizeof(real) * (size_t)(nt * 2 * C));
    if (!blk) { free(part); return fl_fail_oom("out of memory (batch-norm partial sums)"); }
#pragma omp parallel if (rows * C > 32768)
    {
      int t = omp_get_thread_num();
      double *sg = part + (int64_t)t * 2 * C, *sgx = sg + C;
      real *b1 = blk + (int64_t)t * 2 * C, *b2 = b1 + C;
#pragma omp for schedule(static)
      for (int64_t bi = 0; bi < nb; bi++) {
        int64_t r0 = bi * BN_BLOCK, r1 = r0 + BN_BLOCK < rows ? r0 + BN_BLOCK : rows;
        SIMD for (int64_t c = 0; c < C; c++) { b1[c] = 0; b2[c] = 0; }
        for (int64_t r = r0; r < r1; r++) {
          const real *q = X + r * C, *g = GY + r * C, *ry = RY ? RY + r * C : NULL;
          if (ry) {
            SIMD for (int64_t c = 0; c < C; c++) {
              /* both loads unconditional, then a select: GCC if-converts (vectorises) only this
               * form; a conditional load, or the old g*(real)(ry > 0), compiled to branches */
              real gv = g[c], yv = ry[c], gc = yv > 0 ? gv : 0;
              b1[c] += gc;
              b2[c] += gc * (q[c] - MEAN[c]);
            }
          } else {
            SIMD for (int64_t c = 0; c < C; c++) {
              b1[c] += g[c];
              b2[c] += g[c] * (q[c] - MEAN[c]);
            }
          }
        }
        SIMD for (int64_t c = 0; c < C; c++) { sg[c] += b1[c]; sgx[c] += (double)b2[c] * INV[c]; }
      }
    }
    free(blk);
  }
  double *sum_g = part + nt * 2 * C, *sum_gx = sum_g + C;
  for (int t = 0; t < nt; t++)
    for (int64_t c = 0; c < C; c++) {
      sum_g[c] += part[(int64_t)t * 2 * C + c];
      sum_gx[c] += part[(int64_t)t * 2 * C + C + c];
    }
  if (gbeta) {
    real *o = fl_tensor_data(gbeta);
    for (int64_t c = 0; c < C; c++) o[c] = (real)((beta_acc == 0 ? 0 : beta_acc * o[c]) + sum_g[c]);
  }
  if (ggamma) {
    real *o = fl_tensor_data(ggamma);
    for (int64_t c = 0; c < C; c++) o[c] = (real)((beta_acc == 0 ? 0 : beta_acc * o[c]) + sum_gx[c]);
  }
  if (gx) {
    real *GX = fl_tensor_data(gx);
    /* training: gx = gamma*invstd * (gy - mean(gy) - xhat*mean(gy*xhat)); inference: gamma*invstd*gy.
     * Written as gx = gy*a + x*b + c per channel. */
    real *abc = malloc(sizeof(real) * (size_t)(3 * C));
    if (!abc) { free(part); return fl_fail_oom("out of memory (batch-norm coefficients)"); }
    for (int64_t c = 0; c < C; c++) {
      double a = (G ? G[c] : 1) * (double)INV[c];
      if (training) {
        double mg = sum_g[c] / (double)rows, mgx = sum_gx[c] / (double)rows;
        /* xhat = (x - mean)*inv: gx = a*gy - a*mg - a*inv*mgx*(x - mean) */
        double b = -a * INV[c] * mgx;
        abc[c] = (real)a;
        abc[C + c] = (real)b;
        abc[2 * C + c] = (real)(-a * mg - b * MEAN[c]);
      } else {
        abc[c] = (real)a; abc[C + c] = 0; abc[2 * C + c] = 0;
      }
    }
#pragma omp parallel for schedule(static) if (rows * C > 32768)
    for (int64_t r = 0; r < rows; r++) {
      const real *q = X + r * C, *g = GY + r * C, *ry = RY ? RY + r * C : NULL;
      real *o = GX + r * C;
      if (ry) {
        SIMD for (int64_t c = 0; c < C; c++) {
          real gv = g[c], yv = ry[c], gc = yv > 0 ? gv : 0;   /* a select: vectorises (see above) */
          o[c] = gc * abc[c] + q[c] * abc[C + c] + abc[2 * C + c];
        }
      } else {
        SIMD for (int64_t c = 0; c < C; c++) o[c] = g[c] * abc[c] + q[c] * abc[C + c] + abc[2 * C + c];
      }
    }
    free(abc);
  }
  free(part);
  return 0;
}

static int NN(add_act)(fl_tensor *y, const fl_tensor *a, const fl_tensor *b, double scale, int relu) {
  const int64_t n = fl_tensor_numel(a);
  const real *A = fl_tensor_data(a), *B = fl_tensor_data(b);
  real *Y = fl_tensor_data(y);
  const real s = (real)scale;
  if (relu) {
#pragma omp parallel for simd schedule(static) if (n > 65536)
    for (int64_t i = 0; i < n; i++) { real v = A[i] + s * B[i]; Y[i] = v < 0 ? 0 : v; }
  } else {
#pragma omp parallel for simd schedule(static) if (n > 65536)
    for (int64_t i = 0; i < n; i++) Y[i] = A[i] + s * B[i];
  }
  return 0;
}

static int NN(channel_affine)(fl_tensor *y, const fl_tensor *x, const fl_tensor *scale, const fl_tensor *shift,
                              int relu) {
  const int64_t C = x->shape[x->ndim - 1], rows = C ? fl_tensor_numel(x) / C : 0;
  const real *X = fl_tensor_data(x);
  real *Y = fl_tensor_data(y);
  if (Y != X) memcpy(Y, X, sizeof(real) * (size_t)fl_tensor_numel(x));
  NN(epilogue)(Y, rows, C, NN(opt)(scale), NN(opt)(shift), relu);
  return 0;
}

static int NN(act_backward)(fl_act_kind act, fl_tensor *gx, const fl_tensor *gy, const fl_tensor *y) {
  const int64_t n = fl_tensor_numel(y);
  const real *Y = fl_tensor_data(y), *GY = fl_tensor_data(gy);
  real *GX = fl_tensor_data(gx);
  if (act == FL_ACT_SOFTMAX) {
    const int64_t k = y->ndim ? y->shape[y->ndim - 1] : 1, rows = k ? n / k : 0;
#pragma omp parallel for schedule(static) if (n > 32768)
    for (int64_t r = 0; r < rows; r++) {
      const real *p = Y + r * k, *g = GY + r * k;
      real *o = GX + r * k;
      double dot = 0;
      SIMD for (int64_t i = 0; i < k; i++) dot += (double)g[i] * p[i];
      SIMD for (int64_t i = 0; i < k; i++) o[i] = (real)(p[i] * (g[i] - dot));
    }
    return 0;
  }
  if (act == FL_ACT_RELU) {
#pragma omp parallel for simd schedule(static) if (n > 65536)
    for (int64_t i = 0; i < n; i++) { real g = GY[i], v = Y[i]; GX[i] = v > 0 ? g : 0; }   /* loads first: vectorises */
  } else if (act == FL_ACT_SIGMOID) {
#pragma omp parallel for simd schedule(static) if (n > 65536)
    for (int64_t i = 0; i < n; i++) GX[i] = GY[i] * Y[i] * (1 - Y[i]);
  } else if (act == FL_ACT_TANH) {
#pragma omp parallel for simd schedule(static) if (n > 65536)
    for (int64_t i = 0; i < n; i++) GX[i] = GY[i] * (1 - Y[i] * Y[i]);
  }
  return 0;
}

static int NN(softmax_xent)(fl_tensor *loss, fl_tensor *grad, const fl_tensor *logits, const fl_tensor *target,
                            double smoothing, double grad_scale) {
  const int64_t N = logits->shape[0], K = logits->shape[1];
  const real *Z = fl_tensor_data(logits);
  real *L = fl_tensor_data(loss), *G = grad ? fl_tensor_data(grad) : NULL;
  const int labels = target->dtype == FL_I32 || target->dtype == FL_I64;
  const real *T = labels ? NULL : fl_tensor_data(target);
  int64_t bad = -1;
  for (int64_t r = 0; r < N && labels; r++) {
    int64_t l = target->dtype == FL_I32 ? ((const int32_t *)fl_tensor_data(target))[r]
                                         : ((const int64_t *)fl_tensor_data(target))[r];
    if (l < 0 || l >= K) { bad = r; break; }
  }
  if (bad >= 0) {
    int64_t l = target->dtype == FL_I32 ? ((const int32_t *)fl_tensor_data(target))[bad]
                                         : ((const int64_t *)fl_tensor_data(target))[bad];
    return fl_fail("label %lld of row %lld is outside [0, %lld)", (long long)l, (long long)bad + 1, (long long)K);
  }
  const double off = smoothing / (double)K, on = 1 - smoothing;
#pragma omp parallel for schedule(static) if (N * K > 32768)
  for (int64_t r = 0; r < N; r++) {
    const real *z = Z + r * K;
    double mx = z[0], se = 0;
    for (int64_t i = 1; i < K; i++) mx = z[i] > mx ? z[i] : mx;
    for (int64_t i = 0; i < K; i++) se += exp(z[i] - mx);
    double lse = mx + log(se), l = 0;
    int64_t lab = -1;
    if (labels)
      lab = target->dtype == FL_I32 ? ((const int32_t *)fl_tensor_data(target))[r]
                                     : ((const int64_t *)fl_tensor_data(target))[r];
    for (int64_t i = 0; i < K; i++) {
      double t = labels ? (i == lab ? 1.0 : 0.0) : (double)T[r * K + i];
      t = on * t + off;
      if (t != 0) l -= t * (z[i] - lse);
      if (G) G[r * K + i] = (real)(grad_scale * (exp(z[i] - lse) - t));
    }
    L[r] = (real)l;
  }
  return 0;
}

/* ---- optimizer kernels ---- */

static int NN(axpby)(fl_tensor *y, double a, const fl_tensor *x, double b) {
  const int64_t n = fl_tensor_numel(y);
  real *Y = fl_tensor_data(y);
  const real *X = fl_tensor_data(x);
  const real ra = (real)a, rb = (real)b;
#pragma omp parallel for simd schedule(static) if (n > 65536)
  for (int64_t i = 0; i < n; i++) Y[i] = ra * X[i] + rb * Y[i];
  return 0;
}

static int NN(sumsq)(const fl_tensor *x, double *out) {
  const int64_t n = fl_tensor_numel(x);
  const real *X = fl_tensor_data(x);
  double s = 0;
#pragma omp parallel for simd schedule(static) reduction(+ : s) if (n > 65536)
  for (int64_t i = 0; i < n; i++) s += (double)X[i] * X[i];
  *out = s;
  return 0;
}

static int NN(sgd_step)(fl_tensor *w, const fl_tensor *g, fl_tensor *m, double lr, double momentum, int nesterov) {
  const int64_t n = fl_tensor_numel(w);
  real *W = fl_tensor_data(w), *Mo = m ? fl_tensor_data(m) : NULL;
  const real *G = fl_tensor_data(g);
  const real rl = (real)lr, mu = (real)momentum;
  if (!Mo) {
#pragma omp parallel for simd schedule(static) if (n > 65536)
    for (int64_t i = 0; i < n; i++) W[i] -= rl * G[i];
    return 0;
  }
  if (nesterov) {
#pragma omp parallel for simd schedule(static) if (n > 65536)
    for (int64_t i = 0; i < n; i++) {
      real mi = mu * Mo[i] - rl * G[i];
      Mo[i] = mi;
      W[i] += mu * mi - rl * G[i];
    }
  } else {
#pragma omp parallel for simd schedule(static) if (n > 65536)
    for (int64_t i = 0; i < n; i++) {
      real mi = mu * Mo[i] - rl * G[i];
      Mo[i] = mi;
      W[i] += mi;
    }
  }
  return 0;
}

static int NN(adam_step)(fl_tensor *w, const fl_tensor *g, fl_tensor *m, fl_tensor *v, double alpha, double beta1,
                         double beta2, double eps) {
  const int64_t n = fl_tensor_numel(w);
  real *W = fl_tensor_data(w), *Mo = fl_tensor_data(m), *V = fl_tensor_data(v);
  const real *G = fl_tensor_data(g);
  const real a = (real)alpha, c1 = (real)(1 - beta1), c2 = (real)(1 - beta2), e = (real)eps;
#pragma omp parallel for simd schedule(static) if (n > 65536)   /* sqrt without errno (Makefile) */
  for (int64_t i = 0; i < n; i++) {
    real gi = G[i];
    real mi = Mo[i] + (gi - Mo[i]) * c1;
    real vi = V[i] + (gi * gi - V[i]) * c2;
    Mo[i] = mi;
    V[i] = vi;
    W[i] -= mi * a / (sqrt(vi) + e);
  }
  return 0;
}
