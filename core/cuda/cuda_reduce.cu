/* Reductions (sum mean var std max min argmax argmin) and softmax, with the CPU backend's semantics
 * (core/cpu/reduce.c): floats accumulate in double, integer sums wrap in 64 bits, MAX/MIN/ARG* take
 * the first extreme with NaN winning, VAR/STD are two-pass (mean, then squared deviations).
 *
 * A reduction over one dim runs either one thread per output (outputs adjacent in memory: the
 * threads of a warp read adjacent elements) or one block per output (the reduced dim is contiguous,
 * or there are few outputs). A reduction over everything runs blocks over chunks, then one block over
 * their partial results. Block reductions combine in a fixed tree order: results do not depend on
 * timing.
 *
 * bfloat16 input: each element is loaded as float (cu_load) and goes through the float path
 * (accumulated in double like float32); SUM is written as bfloat16 (float32 rounding, then
 * bfloat16's), MEAN/VAR/STD as float32 (the front's output dtypes), MAX/MIN give the element
 * itself. Softmax of bfloat16 computes in float and rounds each output once. */
#include "cuda_internal.h"

#include <math.h>

#define RED_BLOCK 256

/* where and how a finished accumulator is stored */
typedef struct {
  int op;          /* fl_redop */
  int odt;         /* output dtype (SUM/MEAN/VAR/STD of floats: F32, F64, or BF16 for SUM) */
  int mean_mode;   /* 1: write sum/R as a double (the first pass of VAR/STD) */
  int correction;
  int64_t R;
} red_out;

__device__ inline void store_d(char *p, int odt, double v) {
  if (odt == FL_F32) *(float *)p = (float)v;
  else if (odt == FL_BF16) *(cu_bf16 *)p = cu_f2bf((float)v);   /* through float32, as on the CPU */
  else *(double *)p = v;
}

/* ---- accumulators: init, add one element (index k along the reduced dim), merge, finish ---- */

template <class T> struct acc_sum {       /* float SUM / MEAN, and the mean pass of VAR/STD */
  typedef double Acc;
  static __device__ Acc init() { return 0; }
  static __device__ void add(Acc &a, T x, int64_t, double) { a += (double)cu_load(x); }
  static __device__ void merge(Acc &a, const Acc &b) { a += b; }
  static __device__ void finish(const Acc &a, const red_out &ro, char *p) {
    if (ro.mean_mode) *(double *)p = a / (double)ro.R;
    else store_d(p, ro.odt, ro.op == FL_SUM ? a : a / (double)ro.R);
  }
};

template <class T> struct acc_usum {      /* integer SUM: int64 wrap-around */
  typedef uint64_t Acc;
  static __device__ Acc init() { return 0; }
  static __device__ void add(Acc &a, T x, int64_t, double) { a += (uint64_t)(int64_t)x; }
  static __device__ void merge(Acc &a, const Acc &b) { a += b; }
  static __device__ void finish(const Acc &a, const red_out &, char *p) { *(int64_t *)p = (int64_t)a; }
};

template <class T> struct acc_sqdev {     /* sum of (x - mean)^2 */
  typedef double Acc;
  static __device__ Acc init() { return 0; }
  static __device__ void add(Acc &a, T x, int64_t, double m) { double d = (double)cu_load(x) - m; a += d * d; }
  static __device__ void merge(Acc &a, const Acc &b) { a += b; }
  static __device__ void finish(const Acc &a, const red_out &ro, char *p) {
    double v = ro.R - ro.correction > 0 ? a / (double)(ro.R - ro.correction) : NAN;
    store_d(p, ro.odt, ro.op == FL_STD ? sqrt(v) : v);
  }
};

/* v is held in the accumulation type (float for bfloat16: exact, and comparable with < and ==) */
template <class T> struct best_acc { cu_acc_t<T> v; int64_t i; };   /* i == INT64_MAX: nothing seen yet */

template <class T, bool MAX> struct acc_best {
  typedef best_acc<T> Acc;
  typedef cu_acc_t<T> V;
  /* does (x, xi) beat (y, yi)? NaN beats numbers; ties (and two NaNs) go to the lower index, so
   * the merge is associative and commutative and gives the first occurrence, as on the CPU */
  static __device__ bool beats(V x, int64_t xi, V y, int64_t yi) {
    if (yi == INT64_MAX) return xi != INT64_MAX;
    if (xi == INT64_MAX) return false;
    bool xn = x != x, yn = y != y;
    if (xn || yn) return xn && !yn ? true : (!xn && yn ? false : xi < yi);
    if (MAX ? x > y : x < y) return true;
    return x == y && xi < yi;
  }
  static __device__ Acc init() { Acc a; a.v = 0; a.i = INT64_MAX; return a; }
  static __device__ void add(Acc &a, T x, int64_t k, double) {
    V xv = cu_load(x);
    if (beats(xv, k, a.v, a.i)) { a.v = xv; a.i = k; }
  }
  static __device__ void merge(Acc &a, const Acc &b) { if (beats(b.v, b.i, a.v, a.i)) a = b; }
  static __device__ void finish(const Acc &a, const red_out &ro, char *p) {
    if (ro.op == FL_ARGMAX || ro.op == FL_ARGMIN) *(int64_t *)p = a.i;
    else *(T *)p = cu_store<T>(a.v);
  }
};

/* Tree reduction over a block of RED_BLOCK threads; the result is valid in thread 0. */
template <class A> __device__ typename A::Acc block_merge(typename A::Acc v) {
  __shared__ typename A::Acc sh[RED_BLOCK];
  int t = threadIdx.x;
  sh[t] = v;
  __syncthreads();
  for (int s = RED_BLOCK / 2; s > 0; s >>= 1) {
    if (t < s) A::merge(sh[t], sh[t + s]);
    __syncthreads();
  }
  typename A::Acc r = sh[0];
  __syncthreads();   /* sh may be reused by the next call */
  return r;
}

/* ---- reduction over one dim ---- */

/* it: operands {out, a narrowed to index 0 of dim}; j-th output reduces R elements at stride rs */
template <class A, class T, class IDX> __global__ void red_thread_kernel(cu_iter<2> it, char *o, int osz,
                                                                          const T *a, int64_t R, int64_t rs,
                                                                          red_out ro, const double *mean) {
  IDX n = (IDX)it.numel, step = (IDX)gridDim.x * blockDim.x;
  for (IDX j = (IDX)blockIdx.x * blockDim.x + threadIdx.x; j < n; j += step) {
    int64_t off[2];
    cu_offsets<IDX, 2>(it, j, off);
    double m = mean ? mean[j] : 0;
    typename A::Acc acc = A::init();
    const T *p = a + off[1];
    for (int64_t k = 0; k < R; k++) A::add(acc, p[k * rs], k, m);
    A::finish(acc, ro, o + off[0] * osz);
  }
}

template <class A, class T, class IDX> __global__ void red_block_kernel(cu_iter<2> it, char *o, int osz,
                                                                         const T *a, int64_t R, int64_t rs,
                                                                         red_out ro, const double *mean) {
  IDX n = (IDX)it.numel;
  for (IDX j = blockIdx.x; j < n; j += gridDim.x) {
    int64_t off[2];
    cu_offsets<IDX, 2>(it, j, off);
    double m = mean ? mean[j] : 0;
    typename A::Acc acc = A::init();
    const T *p = a + off[1];
    for (int64_t k = threadIdx.x; k < R; k += RED_BLOCK) A::add(acc, p[k * rs], k, m);
    acc = block_merge<A>(acc);
    if (threadIdx.x == 0) A::finish(acc, ro, o + off[0] * osz);
  }
}

template <class A, class T> static int red_dim_run(const char *op, cu_dev *d, fl_tensor *out, const fl_tensor *a,
                                                   int dim, red_out ro, const double *mean) {
  fl_tensor a0 = *a;
  a0.shape[dim] = 1;
  const fl_tensor *t[2] = {out, &a0};
  cu_iter<2> it;
  cu_iter_init<2>(&it, t);
  int64_t nout = it.numel, R = a->shape[dim], rs = a->stride[dim];
  int osz = (int)fl_dtype_size(out->dtype);
  /* contiguous reduced dim, or too few outputs to fill the GPU with one thread each: a block each */
  bool block = (rs == 1 && R >= 64) || (nout < (int64_t)d->sm_count * 64 && R >= 1024);
  bool small = nout < ((int64_t)1 << 31);
  if (block) {
    unsigned g = (unsigned)(nout < (int64_t)d->sm_count * 32 ? nout : (int64_t)d->sm_count * 32);
    if (small) red_block_kernel<A, T, uint32_t><<<g, RED_BLOCK, 0, d->stream>>>(it, cu_ptr(out), osz, (const T *)cu_ptr(a), R, rs, ro, mean);
    else red_block_kernel<A, T, uint64_t><<<g, RED_BLOCK, 0, d->stream>>>(it, cu_ptr(out), osz, (const T *)cu_ptr(a), R, rs, ro, mean);
  } else {
    unsigned g = cu_grid(d, nout, RED_BLOCK);
    if (small) red_thread_kernel<A, T, uint32_t><<<g, RED_BLOCK, 0, d->stream>>>(it, cu_ptr(out), osz, (const T *)cu_ptr(a), R, rs, ro, mean);
    else red_thread_kernel<A, T, uint64_t><<<g, RED_BLOCK, 0, d->stream>>>(it, cu_ptr(out), osz, (const T *)cu_ptr(a), R, rs, ro, mean);
  }
  return cu_launched(op);
}

/* ---- reduction over everything (contiguous input) ---- */

template <class A, class T> __global__ void red_chunks_kernel(const T *a, int64_t N, int64_t chunk,
                                                              typename A::Acc *part, const double *mean) {
  int64_t lo = (int64_t)blockIdx.x * chunk, hi = lo + chunk < N ? lo + chunk : N;
  double m = mean ? mean[0] : 0;
  typename A::Acc acc = A::init();
  for (int64_t k = lo + threadIdx.x; k < hi; k += RED_BLOCK) A::add(acc, a[k], k, m);
  acc = block_merge<A>(acc);
  if (threadIdx.x == 0) part[blockIdx.x] = acc;
}

template <class A> __global__ void red_final_kernel(const typename A::Acc *part, int np, red_out ro, char *o) {
  typename A::Acc acc = A::init();
  for (int k = threadIdx.x; k < np; k += RED_BLOCK) A::merge(acc, part[k]);
  acc = block_merge<A>(acc);
  if (threadIdx.x == 0) A::finish(acc, ro, o);
}

template <class A, class T> static int red_all_run(const char *op, cu_dev *d, char *o, const fl_tensor *a,
                                                   red_out ro, const double *mean) {
  int64_t N = fl_tensor_numel(a);
  int64_t nb = (int64_t)d->sm_count * 4;
  if (nb > (N + RED_BLOCK - 1) / RED_BLOCK) nb = (N + RED_BLOCK - 1) / RED_BLOCK;
  if (nb < 1) nb = 1;
  int64_t chunk = (N + nb - 1) / nb;
  cu_buf part;
  if (part.get(op, d->index, (size_t)nb * sizeof(typename A::Acc))) return -1;
  red_chunks_kernel<A, T><<<(unsigned)nb, RED_BLOCK, 0, d->stream>>>((const T *)cu_ptr(a), N, chunk,
                                                                     (typename A::Acc *)part.p, mean);
  if (cu_launched(op)) return -1;
  red_final_kernel<A><<<1, RED_BLOCK, 0, d->stream>>>((const typename A::Acc *)part.p, (int)nb, ro, o);
  return cu_launched(op);
}

/* ---- dispatch ---- */

template <class T> static int reduce_typed(fl_redop op, fl_tensor *out, const fl_tensor *a, int dim, int corr) {
  const char *name = "cuda reduce";
  constexpr bool flt = cu_is_float<T>;
  cu_dev *d;
  if (cu_enter(name, a->storage->device, &d)) return -1;
  red_out ro = {(int)op, (int)out->dtype, 0, corr, dim < 0 ? fl_tensor_numel(a) : a->shape[dim]};
  switch (op) {
  case FL_SUM:
    if constexpr (flt) return dim < 0 ? red_all_run<acc_sum<T>, T>(name, d, cu_ptr(out), a, ro, NULL)
                                      : red_dim_run<acc_sum<T>, T>(name, d, out, a, dim, ro, NULL);
    else return dim < 0 ? red_all_run<acc_usum<T>, T>(name, d, cu_ptr(out), a, ro, NULL)
                        : red_dim_run<acc_usum<T>, T>(name, d, out, a, dim, ro, NULL);
  case FL_MEAN:
    return dim < 0 ? red_all_run<acc_sum<T>, T>(name, d, cu_ptr(out), a, ro, NULL)
                   : red_dim_run<acc_sum<T>, T>(name, d, out, a, dim, ro, NULL);
  case FL_VAR: case FL_STD: {
    /* pass 1: means as doubles (one per output, in the outputs' row-major order) */
    cu_tmp means;
    red_out rm = ro;
    rm.mean_mode = 1;
    if (dim < 0) {
      int64_t one = 1;
      if (means.init(name, d->index, FL_F64, 1, &one)) return -1;
      if (red_all_run<acc_sum<T>, T>(name, d, (char *)means.buf.p, a, rm, NULL)) return -1;
      return red_all_run<acc_sqdev<T>, T>(name, d, cu_ptr(out), a, ro, (const double *)means.buf.p);
    }
    if (means.init(name, d->index, FL_F64, out->ndim, out->shape)) return -1;
    if (red_dim_run<acc_sum<T>, T>(name, d, &means.t, a, dim, rm, NULL)) return -1;
    return red_dim_run<acc_sqdev<T>, T>(name, d, out, a, dim, ro, (const double *)means.buf.p);
  }
  case FL_MAX: case FL_ARGMAX:
    return dim < 0 ? red_all_run<acc_best<T, true>, T>(name, d, cu_ptr(out), a, ro, NULL)
                   : red_dim_run<acc_best<T, true>, T>(name, d, out, a, dim, ro, NULL);
  case FL_MIN: case FL_ARGMIN:
    return dim < 0 ? red_all_run<acc_best<T, false>, T>(name, d, cu_ptr(out), a, ro, NULL)
                   : red_dim_run<acc_best<T, false>, T>(name, d, out, a, dim, ro, NULL);
  default:
    return fl_fail("cuda reduce: unknown reduction %d", (int)op);
  }
}

int cu_backend_reduce(fl_redop op, fl_tensor *out, const fl_tensor *a, int dim, int correction) {
  if ((unsigned)op >= FL_NREDOPS) return fl_fail("cuda reduce: unknown reduction %d", (int)op);
  int64_t N = fl_tensor_numel(a);
  if (dim < 0) {
    if (N == 0) return cu_fill_dev("cuda reduce", out, op == FL_SUM ? 0 : NAN);
    if (!fl_tensor_is_contiguous(a)) return fl_fail("cuda reduce: reduce over everything needs a contiguous input");
  } else {
    if (dim >= a->ndim) return fl_fail("cuda reduce: dim %d out of range for a %d-d tensor", dim + 1, a->ndim);
    if (fl_tensor_numel(out) == 0) return 0;
    if (a->shape[dim] == 0) return cu_fill_dev("cuda reduce", out, op == FL_SUM ? 0 : NAN);
  }
  return cu_visit(a->dtype, [&](auto tag) {
    typedef typename decltype(tag)::type T;
    return reduce_typed<T>(op, out, a, dim, correction);
  });
}

/* ---------------------------------------------------------------- softmax */

/* NaN-propagating max, as the CPU's running max (once NaN, stays NaN) */
template <class T> __device__ inline T nanmax(T a, T b) { return a != a ? a : (b != b ? b : (b > a ? b : a)); }

/* one block per row (inner == 1): x, o (rows, n). A = cu_acc_t<T>: the float32 kernel's arithmetic
 * for bfloat16, each output rounded once. */
template <class T> __global__ void softmax_rows_kernel(T *o, const T *x, int64_t rows, int64_t n, int lg) {
  typedef cu_acc_t<T> A;
  __shared__ double sh[RED_BLOCK];
  int t = threadIdx.x;
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    const T *xr = x + r * n;
    T *orow = o + r * n;
    A m = -(A)INFINITY;
    for (int64_t k = t; k < n; k += RED_BLOCK) m = nanmax(m, cu_load(xr[k]));
    sh[t] = (double)m;
    __syncthreads();
    for (int s = RED_BLOCK / 2; s > 0; s >>= 1) {
      if (t < s) sh[t] = nanmax(sh[t], sh[t + s]);
      __syncthreads();
    }
    m = (A)sh[0];
    __syncthreads();
    double sum = 0;
    for (int64_t k = t; k < n; k += RED_BLOCK) sum += (double)(A)exp(cu_load(xr[k]) - m);
    sh[t] = sum;
    __syncthreads();
    for (int s = RED_BLOCK / 2; s > 0; s >>= 1) {
      if (t < s) sh[t] += sh[t + s];
      __syncthreads();
    }
    sum = sh[0];
    __syncthreads();
    if (lg) {
      A ls = (A)log(sum);
      for (int64_t k = t; k < n; k += RED_BLOCK) orow[k] = cu_store<T>(cu_load(xr[k]) - m - ls);
    } else {
      A inv = (A)(1.0 / sum);
      for (int64_t k = t; k < n; k += RED_BLOCK) orow[k] = cu_store<T>((A)exp(cu_load(xr[k]) - m) * inv);
    }
  }
}

/* one thread per (outer, inner) line: x, o (outer, n, inner) */
template <class T> __global__ void softmax_lines_kernel(T *o, const T *x, int64_t outer, int64_t n, int64_t inner, int lg) {
  typedef cu_acc_t<T> A;
  int64_t lines = outer * inner, step = (int64_t)gridDim.x * blockDim.x;
  for (int64_t l = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; l < lines; l += step) {
    int64_t oi = l / inner, ii = l % inner;
    const T *xa = x + oi * n * inner + ii;
    T *oa = o + oi * n * inner + ii;
    A m = cu_load(xa[0]);
    for (int64_t k = 1; k < n; k++) m = nanmax(m, cu_load(xa[k * inner]));
    double sum = 0;
    for (int64_t k = 0; k < n; k++) sum += (double)(A)exp(cu_load(xa[k * inner]) - m);
    if (lg) {
      A ls = (A)log(sum);
      for (int64_t k = 0; k < n; k++) oa[k * inner] = cu_store<T>(cu_load(xa[k * inner]) - m - ls);
    } else {
      A inv = (A)(1.0 / sum);
      for (int64_t k = 0; k < n; k++) oa[k * inner] = cu_store<T>((A)exp(cu_load(xa[k * inner]) - m) * inv);
    }
  }
}

int cu_backend_softmax(fl_tensor *out, const fl_tensor *a, int dim, int lg) {
  const char *op = "cuda softmax";
  if (dim < 0 || dim >= a->ndim) return fl_fail("%s: dim %d out of range for a %d-d tensor", op, dim + 1, a->ndim);
  if (!fl_tensor_is_contiguous(a) || !fl_tensor_is_contiguous(out))
    return fl_fail("%s: expected contiguous tensors", op);
  int64_t outer = 1, inner = 1, n = a->shape[dim];
  for (int i = 0; i < dim; i++) outer *= a->shape[i];
  for (int i = dim + 1; i < a->ndim; i++) inner *= a->shape[i];
  if (outer * inner * n == 0) return 0;
  cu_dev *d;
  if (cu_enter(op, a->storage->device, &d)) return -1;
  return cu_visit_act(op, a->dtype, [&](auto tag) {
    typedef typename decltype(tag)::type T;
    if (inner == 1) {
      int64_t g = outer < (int64_t)d->sm_count * 32 ? outer : (int64_t)d->sm_count * 32;
      softmax_rows_kernel<T><<<(unsigned)g, RED_BLOCK, 0, d->stream>>>((T *)cu_ptr(out), (const T *)cu_ptr(a),
                                                                       outer, n, lg);
    } else {
      softmax_lines_kernel<T><<<cu_grid(d, outer * inner, RED_BLOCK), RED_BLOCK, 0, d->stream>>>(
          (T *)cu_ptr(out), (const T *)cu_ptr(a), outer, n, inner, lg);
    }
    return cu_launched(op);
  });
}
