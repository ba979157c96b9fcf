/* Element-wise kernels: binary (with broadcasting: the front passes expanded views, stride 0 on
 * broadcast dims), unary and where. The formulas are core/cpu/elementwise.c's, per dtype: integer
 * arithmetic wraps through the unsigned twin, MAXIMUM/MINIMUM propagate NaN, comparisons give 0/1.
 * bfloat16 operands are loaded into float (cu_acc_t), computed by the float32 formula and rounded
 * once; comparisons of bfloat16 compare the (exact) float values. */
#include "cuda_internal.h"

template <class T> struct cu_unsigned { typedef typename std::make_unsigned<T>::type type; };
template <> struct cu_unsigned<float> { typedef float type; };
template <> struct cu_unsigned<double> { typedef double type; };

/* integer power by squaring in unsigned arithmetic; negative exponents as in the CPU backend */
template <class T> __device__ inline T cu_ipow(T x, T y) {
  typedef typename cu_unsigned<T>::type U;
  if constexpr (std::is_same<T, uint8_t>::value) {
    uint32_t r = 1, b = x, e = y;
    while (e) { if (e & 1) r = (r * b) & 0xff; b = (b * b) & 0xff; e >>= 1; }
    return (T)r;
  } else {
    if (y < 0) {
      if (x == 1) return 1;
      if (x == -1) return (T)((y & 1) ? -1 : 1);
      return 0;
    }
    U r = 1, b = (U)x, e = (U)y;
    while (e) { if (e & 1) r *= b; b *= b; e >>= 1; }
    return (T)r;
  }
}

/* ---------------------------------------------------------------- binary */

template <int OP, class T> __device__ inline T bin_arith(T x, T y) {
  typedef typename cu_unsigned<T>::type U;
  constexpr bool flt = std::is_floating_point<T>::value;
  if constexpr (OP == FL_ADD) return (T)((U)x + (U)y);
  else if constexpr (OP == FL_SUB) return (T)((U)x - (U)y);
  else if constexpr (OP == FL_MUL) return (T)((U)x * (U)y);
  else if constexpr (OP == FL_DIV) return x / y;
  else if constexpr (OP == FL_POW) {
    if constexpr (flt) return (T)pow(x, y);
    else return cu_ipow<T>(x, y);
  }
  else if constexpr (OP == FL_MAXIMUM) return (x > y || x != x) ? x : y;
  else return (x < y || x != x) ? x : y;   /* FL_MINIMUM */
}

template <int OP, class T> __device__ inline uint8_t bin_cmp(T x, T y) {
  if constexpr (OP == FL_EQ) return x == y;
  else if constexpr (OP == FL_NE) return x != y;
  else if constexpr (OP == FL_LT) return x < y;
  else if constexpr (OP == FL_LE) return x <= y;
  else if constexpr (OP == FL_GT) return x > y;
  else return x >= y;
}

template <int OP, class T> struct bin_fn {
  typedef typename std::conditional<(OP >= FL_EQ), uint8_t, T>::type OT;
  typedef cu_acc_t<T> A;
  OT *o;
  const T *a, *b;
  __device__ void operator()(const int64_t *off) const {
    A x = cu_load(a[off[1]]), y = cu_load(b[off[2]]);
    if constexpr (OP >= FL_EQ) o[off[0]] = bin_cmp<OP, A>(x, y);
    else o[off[0]] = cu_store<T>(bin_arith<OP, A>(x, y));
  }
};

template <int OP> static int run_binary(fl_tensor *out, const fl_tensor *a, const fl_tensor *b) {
  const fl_tensor *t[3] = {out, a, b};
  return cu_visit(a->dtype, [&](auto tag) {
    typedef typename decltype(tag)::type T;
    if constexpr (OP == FL_DIV && !cu_is_float<T>)
      return fl_fail("cuda binary: division is for float dtypes, got %s", fl_dtype_name(a->dtype));
    else {
      typedef typename bin_fn<OP, T>::OT OT;
      bin_fn<OP, T> f{(OT *)cu_ptr(out), (const T *)cu_ptr(a), (const T *)cu_ptr(b)};
      return cu_foreach<3>("cuda binary", t, f);
    }
  });
}

int cu_backend_binary(fl_binop op, fl_tensor *out, const fl_tensor *a, const fl_tensor *b) {
  switch (op) {
  case FL_ADD: return run_binary<FL_ADD>(out, a, b);
  case FL_SUB: return run_binary<FL_SUB>(out, a, b);
  case FL_MUL: return run_binary<FL_MUL>(out, a, b);
  case FL_DIV: return run_binary<FL_DIV>(out, a, b);
  case FL_POW: return run_binary<FL_POW>(out, a, b);
  case FL_MAXIMUM: return run_binary<FL_MAXIMUM>(out, a, b);
  case FL_MINIMUM: return run_binary<FL_MINIMUM>(out, a, b);
  case FL_EQ: return run_binary<FL_EQ>(out, a, b);
  case FL_NE: return run_binary<FL_NE>(out, a, b);
  case FL_LT: return run_binary<FL_LT>(out, a, b);
  case FL_LE: return run_binary<FL_LE>(out, a, b);
  case FL_GT: return run_binary<FL_GT>(out, a, b);
  case FL_GE: return run_binary<FL_GE>(out, a, b);
  default: return fl_fail("cuda binary: unknown op %d", (int)op);
  }
}

/* ---------------------------------------------------------------- unary */

template <int OP, class T> struct un_fn {
  typedef cu_acc_t<T> A;   /* T itself, float for bfloat16 */
  T *o;
  const T *a;
  A p0, p1;
  __device__ void operator()(const int64_t *off) const {
    typedef typename cu_unsigned<A>::type U;
    constexpr bool flt = std::is_floating_point<A>::value;
    constexpr bool u8 = std::is_same<A, uint8_t>::value;
    A x = cu_load(a[off[1]]), r;
    if constexpr (OP == FL_NEG) {
      if constexpr (flt) r = -x;
      else if constexpr (u8) r = (A)(0u - (unsigned)x);
      else r = (A)((U)0 - (U)x);
    } else if constexpr (OP == FL_EXP) r = (A)exp(x);
    else if constexpr (OP == FL_LOG) r = (A)log(x);
    else if constexpr (OP == FL_SQRT) r = (A)sqrt(x);
    else if constexpr (OP == FL_TANH) r = (A)tanh(x);
    else if constexpr (OP == FL_SIGMOID) r = (A)1 / ((A)1 + (A)exp(-x));
    else if constexpr (OP == FL_ABS) {
      if constexpr (flt) r = (A)fabs(x);
      else if constexpr (u8) r = x;
      else r = x < 0 ? (A)((U)0 - (U)x) : x;
    } else if constexpr (OP == FL_RELU) {
      if constexpr (u8) r = x;
      else r = x < 0 ? (A)0 : x;
    } else if constexpr (OP == FL_CLAMP) r = x < p0 ? p0 : x > p1 ? p1 : x;
    else if constexpr (OP == FL_POWS) {
      if constexpr (flt) r = (A)pow(x, p0);
      else r = cu_ipow<A>(x, p0);
    } else {   /* FL_AFFINE */
      if constexpr (flt) r = x * p0 + p1;
      else if constexpr (u8) r = (A)((unsigned)x * p0 + p1);
      else r = (A)((U)x * (U)p0 + (U)p1);
    }
    o[off[0]] = cu_store<T>(r);
  }
};

/* exp/log on float call the float overloads (expf, logf): CUDA's overloads of the math functions */
template <int OP> static int run_unary(fl_tensor *out, const fl_tensor *a, double p0, double p1) {
  const fl_tensor *t[2] = {out, a};
  constexpr bool float_only = OP == FL_EXP || OP == FL_LOG || OP == FL_SQRT || OP == FL_TANH || OP == FL_SIGMOID;
  return cu_visit(a->dtype, [&](auto tag) {
    typedef typename decltype(tag)::type T;
    typedef cu_acc_t<T> A;
    constexpr bool flt = cu_is_float<T>;
    if constexpr (float_only && !flt) {
      return fl_fail("cuda unary: op %d is for float dtypes, got %s", OP, fl_dtype_name(a->dtype));
    } else {
      A q0, q1;   /* bfloat16: the float32 kernel's parameters */
      if constexpr (flt) { q0 = (A)p0; q1 = (A)p1; }
      else if constexpr (std::is_same<T, uint8_t>::value && OP == FL_AFFINE) {
        /* affine parameters wrap modulo 256 (x - 1 is x + 255), as on the CPU */
        q0 = (T)(uint64_t)cu_from_double<int64_t>(p0);
        q1 = (T)(uint64_t)cu_from_double<int64_t>(p1);
      } else { q0 = cu_from_double<T>(p0); q1 = cu_from_double<T>(p1); }
      un_fn<OP, T> f{(T *)cu_ptr(out), (const T *)cu_ptr(a), q0, q1};
      return cu_foreach<2>("cuda unary", t, f);
    }
  });
}

int cu_backend_unary(fl_unop op, fl_tensor *out, const fl_tensor *a, double p0, double p1) {
  switch (op) {
  case FL_NEG: return run_unary<FL_NEG>(out, a, p0, p1);
  case FL_EXP: return run_unary<FL_EXP>(out, a, p0, p1);
  case FL_LOG: return run_unary<FL_LOG>(out, a, p0, p1);
  case FL_SQRT: return run_unary<FL_SQRT>(out, a, p0, p1);
  case FL_ABS: return run_unary<FL_ABS>(out, a, p0, p1);
  case FL_TANH: return run_unary<FL_TANH>(out, a, p0, p1);
  case FL_SIGMOID: return run_unary<FL_SIGMOID>(out, a, p0, p1);
  case FL_RELU: return run_unary<FL_RELU>(out, a, p0, p1);
  case FL_CLAMP: return run_unary<FL_CLAMP>(out, a, p0, p1);
  case FL_POWS: return run_unary<FL_POWS>(out, a, p0, p1);
  case FL_AFFINE: return run_unary<FL_AFFINE>(out, a, p0, p1);
  default: return fl_fail("cuda unary: unknown op %d", (int)op);
  }
}

/* ---------------------------------------------------------------- where */

template <class T> struct where_fn {
  T *o;
  const uint8_t *m;
  const T *a, *b;
  __device__ void operator()(const int64_t *off) const { o[off[0]] = m[off[1]] ? a[off[2]] : b[off[3]]; }
};

int cu_backend_where(fl_tensor *out, const fl_tensor *mask, const fl_tensor *a, const fl_tensor *b) {
  const fl_tensor *t[4] = {out, mask, a, b};
  return cu_visit(out->dtype, [&](auto tag) {
    typedef typename decltype(tag)::type T;
    where_fn<T> f{(T *)cu_ptr(out), (const uint8_t *)cu_ptr(mask), (const T *)cu_ptr(a), (const T *)cu_ptr(b)};
    return cu_foreach<4>("cuda where", t, f);
  });
}
