/* The front API (ops.h): checks arguments, resolves dtypes and broadcasting, allocates outputs,
 * then calls the tensors' backend. Every failure leaves `out` empty and names the operation. */
#include "ops.h"
#include "rng.h"

#include <math.h>
#include <string.h>

static const char *const binop_names[FL_NBINOPS] = {
  "add", "sub", "mul", "div", "pow", "maximum", "minimum", "eq", "ne", "lt", "le", "gt", "ge",
};
static const char *const unop_names[FL_NUNOPS] = {
  "neg", "exp", "log", "sqrt", "abs", "tanh", "sigmoid", "relu", "clamp", "pow", "affine",
};
static const char *const redop_names[FL_NREDOPS] = {
  "sum", "mean", "max", "min", "argmax", "argmin", "var", "std",
};

static int is_cmp(fl_binop op) { return op >= FL_EQ && op <= FL_GE; }

static int check_live(const char *op, const fl_tensor *t) {
  if (!t->storage) return fl_fail("%s: the tensor has been freed", op);
  return 0;
}

/* Operands of one call share a backend and device: nothing moves data implicitly (a copy between
 * host and device is explicit, t:cuda() / t:cpu()). */
static int same_backend(const char *op, const fl_tensor *a, const fl_tensor *b) {
  if (a->storage->backend != b->storage->backend || a->storage->device != b->storage->device) {
    char da[80], db[80];
    fl_device_str(da, sizeof da, a);
    fl_device_str(db, sizeof db, b);
    return fl_fail("%s: tensors are on different devices (%s and %s); move one with :cpu() or :cuda()", op, da, db);
  }
  return 0;
}

static const fl_backend *be_of(const fl_tensor *t) { return t->storage->backend; }

/* A new tensor like `a` (backend, device) with the given dtype and shape. */
static int new_like(fl_tensor *out, const fl_tensor *a, fl_dtype dt, int ndim, const int64_t *shape) {
  return fl_tensor_init(out, be_of(a), a->storage->device, dt, ndim, shape);
}

fl_dtype fl_promote(fl_dtype a, fl_dtype b) {
  /* bfloat16 with float32 gives float32 (the wider), with integers bfloat16, as in PyTorch */
  static const int rank[FL_NDTYPES] = {[FL_F64] = 5, [FL_F32] = 4, [FL_BF16] = 3, [FL_I64] = 2, [FL_I32] = 1,
                                       [FL_U8] = 0};
  return rank[a] >= rank[b] ? a : b;
}

/* ---------------------------------------------------------------- copies */

int fl_copy_into(fl_tensor *dst, const fl_tensor *src) {
  if (check_live("copy", dst) || check_live("copy", src)) return -1;
  /* across backends (host <-> device) the copy is run by the one that is not the CPU's; two device
   * backends know nothing of each other's memory */
  if (!fl_tensor_is_host(dst) && !fl_tensor_is_host(src) && be_of(dst) != be_of(src)) {
    char dd[80], ds[80];
    fl_device_str(dd, sizeof dd, dst);
    fl_device_str(ds, sizeof ds, src);
    return fl_fail("copy: cannot copy from %s to %s directly (copy through the cpu)", ds, dd);
  }
  const fl_backend *be = fl_tensor_is_host(dst) ? be_of(src) : be_of(dst);
  /* src must broadcast to dst's shape (dst itself does not grow) */
  int ok = src->ndim <= dst->ndim;
  for (int i = 1; ok && i <= src->ndim; i++) {
    int64_t s = src->shape[src->ndim - i], d = dst->shape[dst->ndim - i];
    if (s != d && s != 1) ok = 0;
  }
  if (!ok) {
    char a[200], b[200];
    fl_shape_str(a, sizeof a, src->ndim, src->shape);
    fl_shape_str(b, sizeof b, dst->ndim, dst->shape);
    return fl_fail("copy: source of size %s cannot broadcast to destination size %s", a, b);
  }
  if (fl_tensor_has_internal_overlap(dst))
    return fl_fail("copy: cannot write into a tensor whose elements overlap (an expanded view)");
  fl_tensor s, tmp = {0};
  if (fl_tensor_partial_overlap(dst, src)) {   /* e.g. t:copy(t:t()): read from a snapshot */
    if (fl_clone(&tmp, src)) return -1;
    s = tmp;
  } else {
    s = *src;
  }
  int rc = fl_view_expand(&s, dst->ndim, dst->shape);
  if (!rc) rc = be->copy(dst, &s);
  fl_tensor_free(&tmp);
  return rc ? fl_fail_prefix("copy") : 0;
}

int fl_fill(fl_tensor *t, double value) {
  if (check_live("fill", t)) return -1;
  return be_of(t)->fill(t, value);
}

int fl_contiguous(fl_tensor *out, const fl_tensor *a) {
  memset(out, 0, sizeof *out);
  if (check_live("contiguous", a)) return -1;
  if (fl_tensor_is_contiguous(a)) { fl_tensor_init_view(out, a); return 0; }
  return fl_clone(out, a);
}

int fl_clone(fl_tensor *out, const fl_tensor *a) {
  memset(out, 0, sizeof *out);
  if (check_live("clone", a)) return -1;
  if (new_like(out, a, a->dtype, a->ndim, a->shape)) return fl_fail_prefix("clone");
  if (be_of(a)->copy(out, a)) { fl_tensor_free(out); return -1; }
  return 0;
}

/* the result's shape and dtype; -1 with a message naming op for tensors that do not join */
static int cat_shape(const char *op, const fl_tensor *const *ts, int n, int dim, int stack, int64_t *shape,
                     fl_dtype *dt) {
  const fl_tensor *first = ts[0];
  int ndim = first->ndim + (stack ? 1 : 0);
  if (!stack && first->ndim == 0) return fl_fail("cat: cannot concatenate 0-d tensors (use stack)");
  if (ndim > FL_MAXDIM) return fl_fail("stack: result would have more than %d dims", FL_MAXDIM);
  if (dim < 0 || dim >= ndim) return fl_fail("%s: dim %d out of range for a %d-d result", op, dim + 1, ndim);
  *dt = first->dtype;
  int64_t total = 0;
  for (int i = 0; i < n; i++) {
    const fl_tensor *t = ts[i];
    if (check_live(op, t)) return -1;
    int ok = t->ndim == first->ndim;
    for (int k = 0; ok && k < t->ndim; k++)
      if ((stack || k != dim) && t->shape[k] != first->shape[k]) ok = 0;
    if (!ok) {
      char s1[200], s2[200];
      fl_shape_str(s1, sizeof s1, first->ndim, first->shape);
      fl_shape_str(s2, sizeof s2, t->ndim, t->shape);
      return fl_fail("%s: element %d has size %s, incompatible with element 1's %s (dim %d)", op, i + 1, s2, s1,
                     dim + 1);
    }
    if (t->storage->backend != first->storage->backend || t->storage->device != first->storage->device) {
      char d1[80], d2[80];
      fl_device_str(d1, sizeof d1, first);
      fl_device_str(d2, sizeof d2, t);
      return fl_fail("%s: element %d is on %s, element 1 on %s", op, i + 1, d2, d1);
    }
    *dt = fl_promote(*dt, t->dtype);
    total += stack ? 1 : t->shape[dim];
  }
  for (int k = 0, j = 0; k < ndim; k++) {
    shape[k] = k == dim ? total : first->shape[j];
    if (!stack || k != dim) j++;
  }
  return 0;
}

int fl_cat(fl_tensor *out, const fl_tensor *const *ts, int n, int dim, int stack) {
  const char *op = stack ? "stack" : "cat";
  memset(out, 0, sizeof *out);
  if (n < 1) return fl_fail("%s: expected a non-empty list of tensors", op);
  if (check_live(op, ts[0])) return -1;
  int64_t shape[FL_MAXDIM];
  fl_dtype dt = ts[0]->dtype;
  if (cat_shape(op, ts, n, dim, stack, shape, &dt)) return -1;
  int ndim = ts[0]->ndim + (stack ? 1 : 0);
  if (fl_tensor_init(out, ts[0]->storage->backend, ts[0]->storage->device, dt, ndim, shape))
    return fl_fail_prefix(op);
  /* each part is copied (and converted) into its slice of the result */
  int64_t pos = 0;
  for (int i = 0; i < n; i++) {
    fl_tensor part = *out, src = *ts[i];
    int64_t len = stack ? 1 : src.shape[dim];
    fl_view_narrow(&part, dim, pos, len);
    if (stack) fl_view_unsqueeze(&src, dim);
    if (fl_copy_into(&part, &src)) { fl_tensor_free(out); return -1; }
    pos += len;
  }
  return 0;
}

int fl_index_select(fl_tensor *out, const fl_tensor *a, int dim, const int64_t *idx, int64_t n) {
  memset(out, 0, sizeof *out);
  if (check_live("index_select", a)) return -1;
  if (dim < 0 || dim >= a->ndim) return fl_fail("index_select: dim %d is outside [0, %d)", dim, a->ndim);
  if (n < 0) return fl_fail("index_select: negative index count %lld", (long long)n);
  for (int64_t i = 0; i < n; i++)
    if (idx[i] < 0 || idx[i] >= a->shape[dim])
      return fl_fail("index_select: index %lld at position %lld is outside [0, %lld) of dim %d", (long long)idx[i],
                     (long long)i, (long long)a->shape[dim], dim);
  int64_t shape[FL_MAXDIM];
  memcpy(shape, a->shape, sizeof(int64_t) * (size_t)a->ndim);
  shape[dim] = n;
  if (new_like(out, a, a->dtype, a->ndim, shape)) return fl_fail_prefix("index_select");
  for (int64_t i = 0; i < n;) {
    int64_t run = 1;
    while (i + run < n && idx[i + run] == idx[i] + run) run++;
    fl_tensor dst = *out, src = *a;
    fl_view_narrow(&dst, dim, i, run);
    fl_view_narrow(&src, dim, idx[i], run);
    if (fl_copy_into(&dst, &src)) { fl_tensor_free(out); return -1; }
    i += run;
  }
  return 0;
}

int fl_cast(fl_tensor *out, const fl_tensor *a, fl_dtype dt) {
  memset(out, 0, sizeof *out);
  if (check_live("type", a)) return -1;
  if ((unsigned)dt >= FL_NDTYPES) return fl_fail("type: invalid dtype %d", (int)dt);
  if (a->dtype == dt) { fl_tensor_init_view(out, a); return 0; }
  if (new_like(out, a, dt, a->ndim, a->shape)) return fl_fail_prefix("type");
  if (be_of(a)->copy(out, a)) { fl_tensor_free(out); return -1; }
  return 0;
}

/* `*view` becomes a (borrowed) view of `a` when a already has dtype dt, or a converted copy held
 * in `*tmp` (freed by the caller). */
static int as_dtype(fl_tensor *view, fl_tensor *tmp, const fl_tensor *a, fl_dtype dt) {
  memset(tmp, 0, sizeof *tmp);
  if (a->dtype == dt) { *view = *a; return 0; }
  if (fl_cast(tmp, a, dt)) return -1;
  *view = *tmp;
  return 0;
}

/* ---------------------------------------------------------------- element-wise */

static fl_dtype binary_dtype(fl_binop op, fl_dtype a, fl_dtype b) {
  fl_dtype d = fl_promote(a, b);
  if (op == FL_DIV && !fl_dtype_is_float(d)) d = FL_F32;   /* true division, like numpy's / */
  return d;
}

/* Shared by fl_binary and fl_binary_into: a, b converted to `cdt`, expanded to `out`'s shape. */
static int binary_run(fl_binop op, fl_tensor *out, const fl_tensor *a, const fl_tensor *b, fl_dtype cdt) {
  fl_tensor va, vb, ta, tb;
  memset(&tb, 0, sizeof tb);
  int rc = as_dtype(&va, &ta, a, cdt);
  if (!rc) rc = as_dtype(&vb, &tb, b, cdt);
  /* reading an input that partially overlaps the output would see half-written values */
  if (!rc && !ta.storage && fl_tensor_partial_overlap(out, &va)) { rc = fl_clone(&ta, a); va = ta; }
  if (!rc && !tb.storage && fl_tensor_partial_overlap(out, &vb)) { rc = fl_clone(&tb, b); vb = tb; }
  if (!rc) rc = fl_view_expand(&va, out->ndim, out->shape);
  if (!rc) rc = fl_view_expand(&vb, out->ndim, out->shape);
  if (!rc) rc = be_of(out)->binary(op, out, &va, &vb);
  fl_tensor_free(&ta);
  fl_tensor_free(&tb);
  return rc;
}

int fl_binary(fl_binop op, fl_tensor *out, const fl_tensor *a, const fl_tensor *b) {
  memset(out, 0, sizeof *out);
  if ((unsigned)op >= FL_NBINOPS) return fl_fail("binary: invalid op %d", (int)op);
  const char *name = binop_names[op];
  if (check_live(name, a) || check_live(name, b) || same_backend(name, a, b)) return -1;
  int n;
  int64_t sh[FL_MAXDIM];
  if (fl_broadcast_shape(name, a->ndim, a->shape, b->ndim, b->shape, &n, sh)) return -1;
  fl_dtype cdt = binary_dtype(op, a->dtype, b->dtype);
  if (new_like(out, a, is_cmp(op) ? FL_U8 : cdt, n, sh)) return fl_fail_prefix(name);
  if (binary_run(op, out, a, b, cdt)) { fl_tensor_free(out); return -1; }
  return 0;
}

int fl_binary_into(fl_binop op, fl_tensor *out, const fl_tensor *a, const fl_tensor *b) {
  if ((unsigned)op >= FL_NBINOPS) return fl_fail("binary: invalid op %d", (int)op);
  const char *name = binop_names[op];
  if (check_live(name, out) || check_live(name, a) || check_live(name, b) || same_backend(name, a, b) ||
      same_backend(name, out, a))
    return -1;
  int n;
  int64_t sh[FL_MAXDIM];
  if (fl_broadcast_shape(name, a->ndim, a->shape, b->ndim, b->shape, &n, sh)) return -1;
  if (fl_broadcast_shape(name, out->ndim, out->shape, n, sh, &n, sh)) return -1;
  if (n != out->ndim || memcmp(sh, out->shape, sizeof *sh * (size_t)n)) {
    char s1[200], s2[200], s3[200];
    fl_shape_str(s1, sizeof s1, a->ndim, a->shape);
    fl_shape_str(s2, sizeof s2, b->ndim, b->shape);
    fl_shape_str(s3, sizeof s3, out->ndim, out->shape);
    return fl_fail("%s: result of shapes %s and %s does not fit the output of size %s", name, s1, s2, s3);
  }
  fl_dtype cdt = binary_dtype(op, a->dtype, b->dtype);
  if (is_cmp(op)) {
    if (out->dtype != FL_U8)
      return fl_fail("%s: comparison output must be uint8, got %s", name, fl_dtype_name(out->dtype));
  } else {
    if (fl_dtype_is_float(cdt) && !fl_dtype_is_float(out->dtype))
      return fl_fail("%s: cannot write a %s result into a %s tensor", name, fl_dtype_name(cdt),
                     fl_dtype_name(out->dtype));
    cdt = out->dtype;
    if (op == FL_DIV && !fl_dtype_is_float(cdt))
      return fl_fail("%s: cannot divide in place in an integer tensor (%s)", name, fl_dtype_name(cdt));
  }
  if (fl_tensor_has_internal_overlap(out))
    return fl_fail("%s: cannot write into a tensor whose elements overlap (an expanded view)", name);
  return binary_run(op, out, a, b, cdt);
}

static int unop_needs_float(fl_unop op, double p0, double p1) {
  switch (op) {
  case FL_EXP: case FL_LOG: case FL_SQRT: case FL_TANH: case FL_SIGMOID: return 1;
  case FL_POWS: return p0 != floor(p0) || p0 < 0;
  case FL_AFFINE: return p0 != floor(p0) || p1 != floor(p1) || fabs(p0) > 9e15 || fabs(p1) > 9e15;
  default: return 0;
  }
}

int fl_unary(fl_unop op, fl_tensor *out, const fl_tensor *a, double p0, double p1) {
  memset(out, 0, sizeof *out);
  if ((unsigned)op >= FL_NUNOPS) return fl_fail("unary: invalid op %d", (int)op);
  const char *name = unop_names[op];
  if (check_live(name, a)) return -1;
  if (op == FL_CLAMP && p0 > p1) return fl_fail("clamp: lower bound %g is above upper bound %g", p0, p1);
  fl_dtype dt = a->dtype;
  if (!fl_dtype_is_float(dt) && unop_needs_float(op, p0, p1)) dt = FL_F32;
  fl_tensor va, ta;
  if (as_dtype(&va, &ta, a, dt)) return -1;
  int rc = new_like(out, a, dt, a->ndim, a->shape);
  if (rc) fl_fail_prefix(name);
  else if ((rc = be_of(a)->unary(op, out, &va, p0, p1))) fl_tensor_free(out);
  fl_tensor_free(&ta);
  return rc;
}

int fl_unary_into(fl_unop op, fl_tensor *out, const fl_tensor *a, double p0, double p1) {
  if ((unsigned)op >= FL_NUNOPS) return fl_fail("unary: invalid op %d", (int)op);
  const char *name = unop_names[op];
  if (check_live(name, out) || check_live(name, a) || same_backend(name, out, a)) return -1;
  if (op == FL_CLAMP && p0 > p1) return fl_fail("clamp: lower bound %g is above upper bound %g", p0, p1);
  if (!fl_dtype_is_float(out->dtype) && unop_needs_float(op, p0, p1))
    return fl_fail("%s: the result is fractional and cannot be written in place into a %s tensor", name,
                   fl_dtype_name(out->dtype));
  if (fl_tensor_has_internal_overlap(out))
    return fl_fail("%s: cannot write into a tensor whose elements overlap (an expanded view)", name);
  fl_tensor va, ta;
  if (as_dtype(&va, &ta, a, out->dtype)) return -1;
  int rc = 0;
  if (!ta.storage && fl_tensor_partial_overlap(out, &va)) { rc = fl_clone(&ta, a); va = ta; }
  if (!rc) rc = fl_view_expand(&va, out->ndim, out->shape);
  if (rc && !ta.storage) fl_fail_prefix(name);
  if (!rc) rc = be_of(out)->unary(op, out, &va, p0, p1);
  fl_tensor_free(&ta);
  return rc;
}

int fl_where(fl_tensor *out, const fl_tensor *mask, const fl_tensor *a, const fl_tensor *b) {
  memset(out, 0, sizeof *out);
  if (check_live("where", mask) || check_live("where", a) || check_live("where", b) ||
      same_backend("where", mask, a) || same_backend("where", a, b))
    return -1;
  if (mask->dtype != FL_U8) return fl_fail("where: mask must be uint8, got %s", fl_dtype_name(mask->dtype));
  int n;
  int64_t sh[FL_MAXDIM];
  if (fl_broadcast_shape("where", a->ndim, a->shape, b->ndim, b->shape, &n, sh) ||
      fl_broadcast_shape("where", mask->ndim, mask->shape, n, sh, &n, sh))
    return -1;
  fl_dtype dt = fl_promote(a->dtype, b->dtype);
  fl_tensor va, vb, vm = *mask, ta, tb;
  memset(&tb, 0, sizeof tb);
  int rc = as_dtype(&va, &ta, a, dt);
  if (!rc) rc = as_dtype(&vb, &tb, b, dt);
  if (!rc && (rc = new_like(out, a, dt, n, sh))) fl_fail_prefix("where");
  if (!rc) {
    fl_view_expand(&va, n, sh);
    fl_view_expand(&vb, n, sh);
    fl_view_expand(&vm, n, sh);
    if ((rc = be_of(a)->where(out, &vm, &va, &vb))) fl_tensor_free(out);
  }
  fl_tensor_free(&ta);
  fl_tensor_free(&tb);
  return rc;
}

/* ---------------------------------------------------------------- reductions */

int fl_reduce(fl_redop op, fl_tensor *out, const fl_tensor *a, int dim, int keepdim, int correction) {
  memset(out, 0, sizeof *out);
  if ((unsigned)op >= FL_NREDOPS) return fl_fail("reduce: invalid op %d", (int)op);
  const char *name = redop_names[op];
  if (check_live(name, a)) return -1;
  if (dim >= a->ndim) return fl_fail("%s: dim %d out of range for a %d-d tensor", name, dim + 1, a->ndim);
  int needs_elem = op == FL_MAX || op == FL_MIN || op == FL_ARGMAX || op == FL_ARGMIN;
  int64_t R = dim < 0 ? fl_tensor_numel(a) : a->shape[dim];
  if (needs_elem && R == 0) {
    char s[200];
    fl_shape_str(s, sizeof s, a->ndim, a->shape);
    return fl_fail("%s: cannot reduce over an empty dimension (size %s)", name, s);
  }
  fl_dtype odt;
  switch (op) {
  case FL_SUM: odt = fl_dtype_is_float(a->dtype) ? a->dtype : FL_I64; break;
  case FL_MEAN: case FL_VAR: case FL_STD: odt = a->dtype == FL_F64 ? FL_F64 : FL_F32; break;
  case FL_MAX: case FL_MIN: odt = a->dtype; break;
  default: odt = FL_I64; break;
  }
  int64_t sh[FL_MAXDIM];
  for (int i = 0; i < a->ndim; i++) sh[i] = (dim < 0 || i == dim) ? 1 : a->shape[i];
  fl_tensor src;
  if (dim < 0) {
    if (fl_contiguous(&src, a)) return fl_fail_prefix(name);
  } else {
    fl_tensor_init_view(&src, a);
  }
  int rc;
  if (dim < 0 && !keepdim) rc = new_like(out, a, odt, 0, NULL);
  else rc = new_like(out, a, odt, a->ndim, sh);
  if (rc) {
    fl_fail_prefix(name);
  } else {
    /* the backend sees `out` in keepdim form (a's rank, or 1 element for everything) */
    rc = be_of(a)->reduce(op, out, &src, dim, correction);
    if (rc) fl_tensor_free(out);
    else if (dim >= 0 && !keepdim) fl_view_select(out, dim, 0);
  }
  fl_tensor_free(&src);
  return rc;
}

int fl_softmax(fl_tensor *out, const fl_tensor *a, int dim, int log) {
  memset(out, 0, sizeof *out);
  const char *name = log ? "logsoftmax" : "softmax";
  if (check_live(name, a)) return -1;
  if (dim < 0 || dim >= a->ndim) return fl_fail("%s: dim %d out of range for a %d-d tensor", name, dim + 1, a->ndim);
  fl_tensor src, tmp;
  fl_dtype dt = fl_dtype_is_float(a->dtype) ? a->dtype : FL_F32;
  if (as_dtype(&src, &tmp, a, dt)) return -1;
  fl_tensor c;
  int rc = fl_contiguous(&c, &src);
  if (!rc && (rc = new_like(out, a, dt, a->ndim, a->shape))) fl_fail_prefix(name);
  if (!rc && (rc = be_of(a)->softmax(out, &c, dim, log))) fl_tensor_free(out);
  fl_tensor_free(&c);
  fl_tensor_free(&tmp);
  return rc;
}

/* ---------------------------------------------------------------- matmul */

/* Can BLAS read this (R, C) matrix with strides (s0, s1) as it is? (see backend.h) */
static int blas_ok(int64_t R, int64_t C, int64_t s0, int64_t s1) {
  return (s1 == 1 && (R == 1 || s0 >= C)) || (s0 == 1 && (C == 1 || s1 >= R));
}

/* Collapse the batch dims [0, nb) of t (already expanded) into one dim with a single stride, or
 * report that a copy is needed. `t3` gets the (B, R, C) view. */
static int batch_view(fl_tensor *t3, const fl_tensor *t, int nb) {
  int64_t B = 1, bs = 0;
  int have = 0;
  /* walking from the innermost batch dim outwards, each must step by the extent of the inner ones */
  int64_t expect = 0;
  for (int i = nb - 1; i >= 0; i--) {
    if (t->shape[i] == 1) continue;
    if (!have) { bs = t->stride[i]; expect = bs * t->shape[i]; have = 1; }
    else {
      if (t->stride[i] != expect) return 0;
      expect = t->stride[i] * t->shape[i];
    }
    B *= t->shape[i];
  }
  for (int i = 0; i < nb; i++) if (t->shape[i] == 0) B = 0;
  *t3 = *t;
  t3->ndim = 3;
  t3->shape[0] = B; t3->stride[0] = bs;
  t3->shape[1] = t->shape[nb]; t3->stride[1] = t->stride[nb];
  t3->shape[2] = t->shape[nb + 1]; t3->stride[2] = t->stride[nb + 1];
  return blas_ok(t3->shape[1], t3->shape[2], t3->stride[1], t3->stride[2]);
}

/* a3 from t: a batch view if BLAS can read it, else a contiguous copy held in tmp */
static int matmul_operand(fl_tensor *v3, fl_tensor *tmp, const fl_tensor *t, int nb) {
  memset(tmp, 0, sizeof *tmp);
  if (batch_view(v3, t, nb)) return 0;
  if (fl_clone(tmp, t)) return -1;
  batch_view(v3, tmp, nb);
  return 0;
}

static int matmul_dtype(const char *op, const fl_tensor *a, const fl_tensor *b, fl_dtype *dt) {
  if (!fl_dtype_is_float(a->dtype) || !fl_dtype_is_float(b->dtype))
    return fl_fail("%s: expected float32, float64 or bfloat16 tensors, got %s and %s", op, fl_dtype_name(a->dtype),
                   fl_dtype_name(b->dtype));
  *dt = fl_promote(a->dtype, b->dtype);
  return 0;
}

int fl_matmul(fl_tensor *out, const fl_tensor *a, const fl_tensor *b) {
  memset(out, 0, sizeof *out);
  if (check_live("matmul", a) || check_live("matmul", b) || same_backend("matmul", a, b)) return -1;
  if (a->ndim == 0 || b->ndim == 0)
    return fl_fail("matmul: expected tensors with at least 1 dim, got %d-d and %d-d", a->ndim, b->ndim);
  fl_dtype dt = FL_F32;
  if (matmul_dtype("matmul", a, b, &dt)) return -1;
  /* 1-d operands become a row (a) or a column (b) matrix; that dim is dropped from the result */
  fl_tensor va = *a, vb = *b;
  int drop_m = a->ndim == 1, drop_n = b->ndim == 1;
  if (drop_m) fl_view_unsqueeze(&va, 0);
  if (drop_n) fl_view_unsqueeze(&vb, 1);
  int64_t M = va.shape[va.ndim - 2], K = va.shape[va.ndim - 1];
  int64_t K2 = vb.shape[vb.ndim - 2], N = vb.shape[vb.ndim - 1];
  if (K != K2) {
    char s1[200], s2[200];
    fl_shape_str(s1, sizeof s1, a->ndim, a->shape);
    fl_shape_str(s2, sizeof s2, b->ndim, b->shape);
    return fl_fail("matmul: inner dimensions differ: %s x %s", s1, s2);
  }
  /* broadcast the batch dims */
  int nb;
  int64_t bsh[FL_MAXDIM + 2];
  if (fl_broadcast_shape("matmul", va.ndim - 2, va.shape, vb.ndim - 2, vb.shape, &nb, bsh)) return -1;
  if (nb + 2 > FL_MAXDIM) return fl_fail("matmul: result would have more than %d dims", FL_MAXDIM);
  int64_t ash[FL_MAXDIM], bsh2[FL_MAXDIM], osh[FL_MAXDIM];
  memcpy(ash, bsh, sizeof *bsh * (size_t)nb);
  memcpy(bsh2, bsh, sizeof *bsh * (size_t)nb);
  memcpy(osh, bsh, sizeof *bsh * (size_t)nb);
  ash[nb] = M; ash[nb + 1] = K;
  bsh2[nb] = K; bsh2[nb + 1] = N;
  osh[nb] = M; osh[nb + 1] = N;
  fl_tensor ca, cb, ta3, tb3, a3, b3, o3;
  int rc = as_dtype(&ca, &ta3, &va, dt);
  memset(&tb3, 0, sizeof tb3);
  if (!rc) rc = as_dtype(&cb, &tb3, &vb, dt);
  fl_tensor ta, tb;
  memset(&ta, 0, sizeof ta);
  memset(&tb, 0, sizeof tb);
  if (!rc) rc = fl_view_expand(&ca, nb + 2, ash);
  if (!rc) rc = fl_view_expand(&cb, nb + 2, bsh2);
  if (!rc) rc = matmul_operand(&a3, &ta, &ca, nb);
  if (!rc) rc = matmul_operand(&b3, &tb, &cb, nb);
  if (!rc && (rc = new_like(out, a, dt, nb + 2, osh))) fl_fail_prefix("matmul");
  if (!rc) {
    batch_view(&o3, out, nb);
    if ((rc = be_of(a)->matmul(&o3, &a3, &b3, 1.0, 0.0))) fl_tensor_free(out);
  }
  fl_tensor_free(&ta);
  fl_tensor_free(&tb);
  fl_tensor_free(&ta3);
  fl_tensor_free(&tb3);
  if (rc) return rc;
  if (drop_n) fl_view_select(out, out->ndim - 1, 0);
  if (drop_m) fl_view_select(out, out->ndim - 2 + drop_n, 0);
  return 0;
}

int fl_gemm(fl_tensor *out, const fl_tensor *a, const fl_tensor *b, int trans_a, int trans_b, double alpha,
            double beta) {
  if (check_live("gemm", out) || check_live("gemm", a) || check_live("gemm", b) || same_backend("gemm", a, b) ||
      same_backend("gemm", out, a))
    return -1;
  int nd = out->ndim;
  if ((nd != 2 && nd != 3) || a->ndim != nd || b->ndim != nd)
    return fl_fail("gemm: expected 2-d or 3-d tensors of equal rank, got %d-d x %d-d -> %d-d", a->ndim, b->ndim, nd);
  /* bfloat16 operands may accumulate into a float32 out (mixed precision's float32 master gradients) */
  int bf16_to_f32 = a->dtype == FL_BF16 && b->dtype == FL_BF16 && out->dtype == FL_F32;
  if (!bf16_to_f32 && (a->dtype != out->dtype || b->dtype != out->dtype || !fl_dtype_is_float(out->dtype)))
    return fl_fail("gemm: expected float32, float64 or bfloat16 tensors of one dtype (or bfloat16 x bfloat16 -> "
                   "float32), got %s x %s -> %s",
                   fl_dtype_name(a->dtype), fl_dtype_name(b->dtype), fl_dtype_name(out->dtype));
  fl_tensor va = *a, vb = *b;
  if (trans_a) fl_view_transpose(&va, nd - 2, nd - 1);
  if (trans_b) fl_view_transpose(&vb, nd - 2, nd - 1);
  int64_t B = nd == 3 ? out->shape[0] : 1;
  if (va.shape[nd - 1] != vb.shape[nd - 2] || va.shape[nd - 2] != out->shape[nd - 2] ||
      vb.shape[nd - 1] != out->shape[nd - 1] || (nd == 3 && (va.shape[0] != B || vb.shape[0] != B))) {
    char s1[200], s2[200], s3[200];
    fl_shape_str(s1, sizeof s1, va.ndim, va.shape);
    fl_shape_str(s2, sizeof s2, vb.ndim, vb.shape);
    fl_shape_str(s3, sizeof s3, out->ndim, out->shape);
    return fl_fail("gemm: shapes %s x %s do not give %s", s1, s2, s3);
  }
  if (fl_tensor_has_internal_overlap(out) || fl_tensor_may_overlap(out, a) || fl_tensor_may_overlap(out, b))
    return fl_fail("gemm: the output must not overlap the inputs");
  fl_tensor o3 = *out, a3, b3, ta, tb;
  if (nd == 2) { fl_view_unsqueeze(&o3, 0); fl_view_unsqueeze(&va, 0); fl_view_unsqueeze(&vb, 0); }
  if (!(o3.shape[2] == 1 || o3.stride[2] == 1) || !(o3.shape[1] == 1 || o3.stride[1] >= o3.shape[2]))
    return fl_fail("gemm: the output's rows must be contiguous");
  memset(&tb, 0, sizeof tb);
  int rc = matmul_operand(&a3, &ta, &va, 1);
  if (!rc) rc = matmul_operand(&b3, &tb, &vb, 1);
  if (!rc) rc = be_of(out)->matmul(&o3, &a3, &b3, alpha, beta);
  fl_tensor_free(&ta);
  fl_tensor_free(&tb);
  return rc;
}

/* ---------------------------------------------------------------- creation */

int fl_rng(fl_tensor *out, fl_rngkind kind, uint64_t seed, uint64_t offset, double p0, double p1) {
  if (check_live("random", out)) return -1;
  if (kind == FL_RNG_INT && !(p1 > p0))
    return fl_fail("random: empty integer range [%.17g, %.17g)", p0, p1);
  if (fl_tensor_is_contiguous(out)) return be_of(out)->rng(out, kind, seed, offset, p0, p1);
  /* draw in element order into a contiguous buffer so a view gets the same stream */
  fl_tensor tmp;
  if (new_like(&tmp, out, out->dtype, out->ndim, out->shape)) return fl_fail_prefix("random");
  int rc = be_of(out)->rng(&tmp, kind, seed, offset, p0, p1);
  if (!rc) rc = be_of(out)->copy(out, &tmp);
  fl_tensor_free(&tmp);
  return rc;
}

int fl_random_(fl_tensor *t, fl_rngkind kind, double p0, double p1) {
  if (check_live("random", t)) return -1;
  if (fl_tensor_has_internal_overlap(t))
    return fl_fail("random: cannot write into a tensor whose elements overlap (an expanded view)");
  if (kind == FL_RNG_INT) {
    if (!(p1 > p0)) return fl_fail("randint: empty range [%.17g, %.17g)", p0, p1);
    if (p1 - p0 > 9.2e18) return fl_fail("randint: range [%.17g, %.17g) is too wide", p0, p1);
  }
  if (kind == FL_RNG_NORMAL && !(p1 >= 0)) return fl_fail("normal: std must be >= 0, got %g", p1);
  uint64_t seed, offset;
  fl_rng_reserve((uint64_t)fl_tensor_numel(t), &seed, &offset);
  return fl_rng(t, kind, seed, offset, p0, p1);
}

/* creation helpers make CPU tensors and write their elements directly (fl_tensor_set) */
int fl_arange(fl_tensor *out, double start, double stop, double step, fl_dtype dt) {
  memset(out, 0, sizeof *out);
  if (!(step != 0) || !isfinite(step)) return fl_fail("arange: step must be a finite nonzero number, got %g", step);
  if (!isfinite(start) || !isfinite(stop)) return fl_fail("arange: bounds must be finite, got %g and %g", start, stop);
  double nd = ceil((stop - start) / step);
  if (nd < 0) nd = 0;
  if (nd > 4e18) return fl_fail("arange: %g elements is too many", nd);
  int64_t n = (int64_t)nd;
  if (fl_tensor_init(out, &fl_cpu_backend, 0, dt, 1, &n)) return fl_fail_prefix("arange");
  for (int64_t i = 0; i < n; i++) fl_tensor_set(out, &i, start + (double)i * step);
  return 0;
}

int fl_linspace(fl_tensor *out, double start, double stop, int64_t n, fl_dtype dt) {
  memset(out, 0, sizeof *out);
  if (n < 0) return fl_fail("linspace: number of points must be >= 0, got %lld", (long long)n);
  if (fl_tensor_init(out, &fl_cpu_backend, 0, dt, 1, &n)) return fl_fail_prefix("linspace");
  double step = n > 1 ? (stop - start) / (double)(n - 1) : 0;
  for (int64_t i = 0; i < n; i++) {
    /* the last point is exactly `stop`, as in numpy */
    double v = i == n - 1 && n > 1 ? stop : start + (double)i * step;
    fl_tensor_set(out, &i, v);
  }
  return 0;
}
