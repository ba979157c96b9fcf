/* Tensors: errors, dtypes, reference-counted storage, and the view operations (which only
 * rewrite shape/stride/offset; no data moves). */
#include "tensor.h"
#include "backend.h"

#include <stdarg.h>
#include <stdlib.h>
#include <stdio.h>
#include <string.h>

/* ---------------------------------------------------------------- errors */

/* One message per thread: kernels may fail on worker threads (data loaders) without racing. */
static _Thread_local char errbuf[512];
static _Thread_local int err_oom;
/* counts fl_fail* calls on this thread: tells whether a callee (a backend's allocator) recorded a
 * message of its own */
static _Thread_local unsigned fail_seq;

const char *fl_errmsg(void) { return errbuf[0] ? errbuf : "unknown error"; }

static int vfail(int oom, const char *fmt, va_list ap) {
  vsnprintf(errbuf, sizeof errbuf, fmt, ap);
  err_oom = oom;
  fail_seq++;
  return -1;
}

#define FAIL(oom) va_list ap; va_start(ap, fmt); int rc = vfail(oom, fmt, ap); va_end(ap); return rc
int fl_fail(const char *fmt, ...) { FAIL(0); }
int fl_fail_oom(const char *fmt, ...) { FAIL(1); }
#undef FAIL

int fl_last_failure_was_oom(void) { return err_oom; }

/* Appends " (context)" to the current message, keeping its out-of-memory mark. */
static int fail_append(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static int fail_append(const char *fmt, ...) {
  size_t n = strnlen(errbuf, sizeof errbuf - 1);
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(errbuf + n, sizeof errbuf - n, fmt, ap);
  va_end(ap);
  return -1;
}

int fl_fail_prefix(const char *op) {
  char tmp[sizeof errbuf];
  size_t n = strlen(op);
  if (n > 64) n = 64;
  memcpy(tmp, op, n);
  tmp[n] = ':';
  tmp[n + 1] = ' ';
  size_t m = strnlen(errbuf, sizeof errbuf - n - 3);
  memcpy(tmp + n + 2, errbuf, m);
  tmp[n + 2 + m] = 0;
  memcpy(errbuf, tmp, n + 3 + m);
  return -1;
}

/* ---------------------------------------------------------------- dtypes */

static const char *const dtype_names[FL_NDTYPES] = {"float32", "float64", "int32", "int64", "uint8",
                                                             "bfloat16"};
static const size_t dtype_sizes[FL_NDTYPES] = {4, 8, 4, 8, 1, 2};

size_t fl_dtype_size(fl_dtype dt) { return (unsigned)dt < FL_NDTYPES ? dtype_sizes[dt] : 0; }
const char *fl_dtype_name(fl_dtype dt) { return (unsigned)dt < FL_NDTYPES ? dtype_names[dt] : "?"; }
int fl_dtype_is_float(fl_dtype dt) { return dt == FL_F32 || dt == FL_F64 || dt == FL_BF16; }

int fl_dtype_from_name(const char *name, fl_dtype *out) {
  for (int i = 0; i < FL_NDTYPES; i++)
    if (strcmp(name, dtype_names[i]) == 0) { *out = (fl_dtype)i; return 0; }
  return fl_fail("unknown dtype '%.40s' (expected float32, float64, bfloat16, int32, int64 or uint8)", name);
}

/* ---------------------------------------------------------------- storage */

/* bytes held by live storages of all backends (bindings use it to pace garbage collection) */
static size_t live_bytes;

size_t fl_storage_live_bytes(void) { return __atomic_load_n(&live_bytes, __ATOMIC_RELAXED); }

fl_storage *fl_storage_new(const fl_backend *be, int device, size_t nbytes) {
  fl_storage *s = calloc(1, sizeof *s);
  if (!s) { fl_fail_oom("out of memory allocating a storage header"); return NULL; }
  /* Never ask for 0 bytes: some allocators return NULL for it, which would read as a failure. */
  unsigned seq = fail_seq;
  s->data = be->alloc(device, nbytes ? nbytes : 1);
  if (!s->data) {
    free(s);
    /* A backend that explains its failure (CUDA: "asked for X, the device has Y free", or "device 3
     * does not exist") keeps its message and its out-of-memory mark; the CPU's allocator says
     * nothing and gets the generic message. */
    if (fail_seq == seq) fl_fail_oom("out of memory: cannot allocate %zu bytes on %s", nbytes, be->name);
    return NULL;
  }
  s->refcount = 1;
  __atomic_add_fetch(&live_bytes, nbytes, __ATOMIC_RELAXED);
  s->nbytes = nbytes;
  s->backend = be;
  s->device = device;
  return s;
}

fl_storage *fl_storage_new_pinned(const fl_backend *dev, size_t nbytes) {
  if (dev && dev->host_alloc && dev->host_free) {
    fl_storage *s = calloc(1, sizeof *s);
    if (!s) { fl_fail_oom("out of memory allocating a storage header"); return NULL; }
    s->data = dev->host_alloc(nbytes ? nbytes : 1);
    if (s->data) {
      s->refcount = 1;
      __atomic_add_fetch(&live_bytes, nbytes, __ATOMIC_RELAXED);
      s->nbytes = nbytes;
      s->backend = &fl_cpu_backend;
      s->pinned = dev;
      return s;
    }
    free(s);   /* no page-locked memory: plain memory does the same job, only slower to copy */
  }
  return fl_storage_new(&fl_cpu_backend, 0, nbytes);
}

void fl_storage_retain(fl_storage *s) {
  if (s) __atomic_add_fetch(&s->refcount, 1, __ATOMIC_RELAXED);
}

void fl_storage_release(fl_storage *s) {
  if (!s) return;
  if (__atomic_sub_fetch(&s->refcount, 1, __ATOMIC_ACQ_REL) == 0) {
    __atomic_sub_fetch(&live_bytes, s->nbytes, __ATOMIC_RELAXED);
    if (s->pinned) s->pinned->host_free(s->data);
    else s->backend->free(s->device, s->data);
    free(s);
  }
}

/* ---------------------------------------------------------------- tensors */

int fl_iter_shape(int nop, const fl_tensor *const *t, int64_t *shape, int64_t (*st)[FL_MAXDIM]) {
  const fl_tensor *t0 = t[0];
  int nd = 0;
  for (int i = 0; i < t0->ndim; i++) {   /* drop size-1 dims */
    if (t0->shape[i] == 1) continue;
    shape[nd] = t0->shape[i];
    for (int k = 0; k < nop; k++) st[k][nd] = t[k]->stride[i];
    nd++;
  }
  if (nd == 0) {   /* a single element */
    shape[0] = 1;
    for (int k = 0; k < nop; k++) st[k][0] = 1;
    return 1;
  }
  /* merge dim i into i+1 when every operand steps through them as one: right to left */
  int out = nd - 1;
  for (int i = nd - 2; i >= 0; i--) {
    int ok = 1;
    for (int k = 0; k < nop; k++)
      if (st[k][i] != st[k][out] * shape[out]) { ok = 0; break; }
    if (ok) {
      shape[out] *= shape[i];
    } else {
      out--;
      shape[out] = shape[i];
      for (int k = 0; k < nop; k++) st[k][out] = st[k][i];
    }
  }
  /* shift the merged dims [out, nd) down to [0, nd - out) */
  int m = nd - out;
  for (int i = 0; i < m; i++) {
    shape[i] = shape[out + i];
    for (int k = 0; k < nop; k++) st[k][i] = st[k][out + i];
  }
  return m;
}

void fl_contiguous_strides(int ndim, const int64_t *shape, int64_t *stride) {
  int64_t s = 1;
  for (int i = ndim - 1; i >= 0; i--) {
    stride[i] = s;
    s *= shape[i] > 0 ? shape[i] : 1;
  }
}

void fl_shape_str(char *buf, size_t n, int ndim, const int64_t *shape) {
  size_t k = 0;
  if (n == 0) return;
  buf[0] = 0;
  k += (size_t)snprintf(buf + k, n - k, "[");
  for (int i = 0; i < ndim && k < n; i++)
    k += (size_t)snprintf(buf + k, n - k, i ? ",%lld" : "%lld", (long long)shape[i]);
  if (k < n) snprintf(buf + k, n - k, "]");
}

int fl_tensor_init(fl_tensor *t, const fl_backend *be, int device, fl_dtype dt, int ndim,
                   const int64_t *shape) {
  memset(t, 0, sizeof *t);
  if (ndim < 0 || ndim > FL_MAXDIM)
    return fl_fail("tensors have at most %d dims, got %d", FL_MAXDIM, ndim);
  if ((unsigned)dt >= FL_NDTYPES) return fl_fail("invalid dtype %d", (int)dt);
  /* Count bytes with overflow checks: a huge size from Lua must become an error, not a wrap. */
  uint64_t numel = 1;
  int zero = 0;
  for (int i = 0; i < ndim; i++) {
    if (shape[i] < 0) {
      char s[200];
      fl_shape_str(s, sizeof s, ndim, shape);
      return fl_fail("invalid size %s: sizes must be >= 0", s);
    }
    if (shape[i] == 0) zero = 1;
  }
  if (!zero)
    for (int i = 0; i < ndim; i++) {
      if (numel > ((uint64_t)1 << 62) / (uint64_t)shape[i]) goto toolarge;
      numel *= (uint64_t)shape[i];
    }
  else
    numel = 0;
  uint64_t nbytes = numel * fl_dtype_size(dt);
  if (numel > ((uint64_t)1 << 62) / 8 || nbytes > (uint64_t)PTRDIFF_MAX) goto toolarge;
  fl_storage *s = fl_storage_new(be, device, (size_t)nbytes);
  if (!s) {
    char sh[200];
    fl_shape_str(sh, sizeof sh, ndim, shape);
    return fail_append(" (a %s tensor of size %s)", fl_dtype_name(dt), sh);
  }
  t->storage = s;
  t->offset = 0;
  t->ndim = ndim;
  t->dtype = dt;
  for (int i = 0; i < ndim; i++) t->shape[i] = shape[i];
  fl_contiguous_strides(ndim, t->shape, t->stride);
  return 0;
toolarge: {
  char sh[200];
  fl_shape_str(sh, sizeof sh, ndim, shape);
  return fl_fail_oom("size %s is too large to allocate", sh);
}
}

void fl_tensor_init_view(fl_tensor *dst, const fl_tensor *src) {
  if (dst != src) *dst = *src;
  fl_storage_retain(dst->storage);
}

void fl_tensor_free(fl_tensor *t) {
  if (!t) return;
  fl_storage *s = t->storage;
  t->storage = NULL;
  fl_storage_release(s);
}

void fl_tensor_move(fl_tensor *dst, fl_tensor *src) {
  if (dst == src) return;
  fl_tensor_free(dst);
  *dst = *src;
  src->storage = NULL;
}

int fl_tensor_init_scalar(fl_tensor *t, const fl_backend *be, int device, fl_dtype dt, double value) {
  if (fl_tensor_init(t, be, device, dt, 0, NULL)) return -1;
  if (be->fill(t, value)) { fl_tensor_free(t); return -1; }
  return 0;
}

int64_t fl_tensor_numel(const fl_tensor *t) {
  int64_t n = 1;
  for (int i = 0; i < t->ndim; i++) n *= t->shape[i];
  return n;
}

int fl_tensor_is_contiguous(const fl_tensor *t) {
  int64_t s = 1;
  for (int i = t->ndim - 1; i >= 0; i--) {
    if (t->shape[i] == 1) continue;      /* the stride of a size-1 dim never matters */
    if (t->shape[i] == 0) return 1;
    if (t->stride[i] != s) return 0;
    s *= t->shape[i];
  }
  return 1;
}

int fl_tensor_is_host(const fl_tensor *t) {
  return t->storage && t->storage->backend == &fl_cpu_backend;
}

void fl_device_str(char *buf, size_t n, const fl_tensor *t) {
  if (!t->storage) snprintf(buf, n, "(freed)");
  else if (t->storage->backend == &fl_cpu_backend) snprintf(buf, n, "cpu");
  else snprintf(buf, n, "%s:%d", t->storage->backend->name, t->storage->device);
}

int fl_tensor_require_host(const char *op, const fl_tensor *t) {
  if (fl_tensor_is_host(t)) return 0;
  if (!t->storage) return fl_fail("%s: the tensor has been freed", op);
  char d[80];
  fl_device_str(d, sizeof d, t);
  return fl_fail("%s: the tensor is on %s, not in host memory (copy it to the cpu first)", op, d);
}

void *fl_tensor_data(const fl_tensor *t) {
  if (!t->storage) return NULL;
  return (char *)t->storage->data + t->offset * (int64_t)fl_dtype_size(t->dtype);
}

int fl_tensor_same_shape(const fl_tensor *a, const fl_tensor *b) {
  if (a->ndim != b->ndim) return 0;
  for (int i = 0; i < a->ndim; i++)
    if (a->shape[i] != b->shape[i]) return 0;
  return 1;
}

int fl_tensor_has_internal_overlap(const fl_tensor *t) {
  /* Sort dims by stride; a view has no overlap if each stride is at least the extent of the
   * smaller-stride dims below it (sufficient, not necessary: conservative answers are safe). */
  int idx[FL_MAXDIM], n = 0;
  for (int i = 0; i < t->ndim; i++) {
    if (t->shape[i] == 0) return 0;
    if (t->shape[i] == 1) continue;
    if (t->stride[i] == 0) return 1;
    idx[n++] = i;
  }
  for (int i = 1; i < n; i++)   /* insertion sort by |stride| */
    for (int j = i; j > 0 && llabs(t->stride[idx[j]]) < llabs(t->stride[idx[j - 1]]); j--) {
      int x = idx[j]; idx[j] = idx[j - 1]; idx[j - 1] = x;
    }
  int64_t extent = 1;
  for (int i = 0; i < n; i++) {
    int64_t s = llabs(t->stride[idx[i]]);
    if (s < extent) return 1;
    extent = s * (t->shape[idx[i]] - 1) + extent;
  }
  return 0;
}

/* [lo, hi] element range addressed by t within its storage */
static void tensor_span(const fl_tensor *t, int64_t *lo, int64_t *hi) {
  int64_t a = t->offset, b = t->offset;
  for (int i = 0; i < t->ndim; i++) {
    if (t->shape[i] == 0) { *lo = 0; *hi = -1; return; }
    int64_t d = t->stride[i] * (t->shape[i] - 1);
    if (d > 0) b += d; else a += d;
  }
  *lo = a; *hi = b;
}

int fl_tensor_may_overlap(const fl_tensor *a, const fl_tensor *b) {
  if (!a->storage || a->storage != b->storage) return 0;
  int64_t alo, ahi, blo, bhi;
  tensor_span(a, &alo, &ahi);
  tensor_span(b, &blo, &bhi);
  if (ahi < alo || bhi < blo) return 0;
  int64_t ea = (int64_t)fl_dtype_size(a->dtype), eb = (int64_t)fl_dtype_size(b->dtype);
  /* compare byte ranges: dtypes may differ */
  return !(ahi * ea + ea <= blo * eb || bhi * eb + eb <= alo * ea);
}

int fl_tensor_partial_overlap(const fl_tensor *a, const fl_tensor *b) {
  if (!a->storage || a->storage != b->storage) return 0;
  if (a->offset == b->offset && a->dtype == b->dtype && a->ndim == b->ndim) {
    int same = 1;
    for (int i = 0; i < a->ndim; i++)
      if (a->shape[i] != b->shape[i] || (a->shape[i] > 1 && a->stride[i] != b->stride[i])) same = 0;
    if (same) return 0;   /* identical view: element-wise ops may alias safely */
  }
  return fl_tensor_may_overlap(a, b);
}

static int64_t elem_offset(const fl_tensor *t, const int64_t *index) {
  int64_t off = t->offset;
  for (int i = 0; i < t->ndim; i++) off += index[i] * t->stride[i];
  return off;
}

double fl_tensor_get(const fl_tensor *t, const int64_t *index) {
  const char *p = (const char *)t->storage->data + elem_offset(t, index) * (int64_t)fl_dtype_size(t->dtype);
  switch (t->dtype) {
  case FL_F32: return *(const float *)p;
  case FL_F64: return *(const double *)p;
  case FL_I32: return *(const int32_t *)p;
  case FL_I64: return (double)*(const int64_t *)p;
  case FL_U8: return *(const uint8_t *)p;
  case FL_BF16: return fl_bf16_to_float(*(const uint16_t *)p);
  default: return 0;
  }
}

void fl_tensor_set(fl_tensor *t, const int64_t *index, double v) {
  char *p = (char *)t->storage->data + elem_offset(t, index) * (int64_t)fl_dtype_size(t->dtype);
  /* out-of-range values saturate (a plain C cast would be undefined behaviour) */
  switch (t->dtype) {
  case FL_F32: *(float *)p = (float)v; break;
  case FL_F64: *(double *)p = v; break;
  case FL_I32: *(int32_t *)p = v != v ? 0 : v >= 2147483647.0 ? INT32_MAX : v <= -2147483648.0 ? INT32_MIN : (int32_t)v; break;
  case FL_I64: *(int64_t *)p = v != v ? 0 : v >= 9223372036854775807.0 ? INT64_MAX : v <= -9223372036854775808.0 ? INT64_MIN : (int64_t)v; break;
  case FL_U8: *(uint8_t *)p = v != v ? 0 : v >= 255.0 ? 255 : v <= 0 ? 0 : (uint8_t)v; break;
  case FL_BF16: *(uint16_t *)p = fl_bf16_from_float((float)v); break;
  default: break;
  }
}

/* ---------------------------------------------------------------- views */

static int check_dim(const char *op, const fl_tensor *t, int dim) {
  if (dim < 0 || dim >= t->ndim)
    return fl_fail("%s: dim %d out of range for a %d-d tensor", op, dim + 1, t->ndim);
  return 0;
}

int fl_view_reshape(fl_tensor *t, int ndim, const int64_t *shape) {
  int64_t numel = fl_tensor_numel(t);
  int64_t want[FL_MAXDIM];
  int infer = -1;
  int64_t known = 1;
  char sh[200];
  if (ndim < 0 || ndim > FL_MAXDIM)
    return fl_fail("view: tensors have at most %d dims, got %d", FL_MAXDIM, ndim);
  for (int i = 0; i < ndim; i++) {
    want[i] = shape[i];
    if (shape[i] == -1) {
      if (infer >= 0) return fl_fail("view: only one size may be -1");
      infer = i;
    } else if (shape[i] < 0) {
      fl_shape_str(sh, sizeof sh, ndim, shape);
      return fl_fail("view: invalid size %s", sh);
    } else {
      if (shape[i] && known > INT64_MAX / shape[i]) {
        fl_shape_str(sh, sizeof sh, ndim, shape);
        return fl_fail("view: size %s is incompatible with %lld elements", sh, (long long)numel);
      }
      known *= shape[i];
    }
  }
  if (infer >= 0) {
    if (known == 0 || numel % known) {
      fl_shape_str(sh, sizeof sh, ndim, shape);
      return fl_fail("view: size %s is incompatible with %lld elements", sh, (long long)numel);
    }
    want[infer] = numel / known;
    known = numel;
  }
  if (known != numel) {
    fl_shape_str(sh, sizeof sh, ndim, shape);
    return fl_fail("view: size %s is incompatible with %lld elements", sh, (long long)numel);
  }
  /* Compute strides for the new shape without moving data. Old dims form "chunks": runs of
   * dims that are contiguous among themselves (stride[i] == stride[i+1] * shape[i+1]). Each chunk
   * can be re-split freely, so the new dims must group into the same chunk products; a new dim
   * straddling two chunks needs a copy. */
  int64_t nstride[FL_MAXDIM];
  if (numel == 0 || fl_tensor_is_contiguous(t)) {
    fl_contiguous_strides(ndim, want, nstride);
  } else {
    int vd = ndim - 1;
    int64_t base = t->stride[t->ndim - 1], tnum = 1, vnum = 1;
    for (int d = t->ndim - 1; d >= 0; d--) {
      tnum *= t->shape[d];
      if (d == 0 || (t->shape[d - 1] != 1 && t->stride[d - 1] != tnum * base)) {
        while (vd >= 0 && (vnum < tnum || want[vd] == 1)) {
          nstride[vd] = vnum * base;
          vnum *= want[vd];
          vd--;
        }
        if (vnum != tnum) goto needcopy;
        if (d > 0) { base = t->stride[d - 1]; tnum = 1; vnum = 1; }
      }
    }
    if (vd != -1) goto needcopy;
  }
  t->ndim = ndim;
  for (int i = 0; i < ndim; i++) { t->shape[i] = want[i]; t->stride[i] = nstride[i]; }
  return 0;
needcopy:
  fl_shape_str(sh, sizeof sh, ndim, want);
  return fl_fail("view: size %s needs a copy of this non-contiguous tensor (use reshape)", sh);
}

int fl_view_permute(fl_tensor *t, const int *perm) {
  int seen[FL_MAXDIM] = {0};
  for (int i = 0; i < t->ndim; i++) {
    if (perm[i] < 0 || perm[i] >= t->ndim)
      return fl_fail("permute: dim %d out of range for a %d-d tensor", perm[i] + 1, t->ndim);
    if (seen[perm[i]]) return fl_fail("permute: dim %d appears twice", perm[i] + 1);
    seen[perm[i]] = 1;
  }
  int64_t sh[FL_MAXDIM], st[FL_MAXDIM];
  for (int i = 0; i < t->ndim; i++) { sh[i] = t->shape[perm[i]]; st[i] = t->stride[perm[i]]; }
  memcpy(t->shape, sh, sizeof sh);
  memcpy(t->stride, st, sizeof st);
  return 0;
}

int fl_view_transpose(fl_tensor *t, int d0, int d1) {
  if (check_dim("transpose", t, d0) || check_dim("transpose", t, d1)) return -1;
  int64_t x = t->shape[d0]; t->shape[d0] = t->shape[d1]; t->shape[d1] = x;
  x = t->stride[d0]; t->stride[d0] = t->stride[d1]; t->stride[d1] = x;
  return 0;
}

int fl_view_narrow(fl_tensor *t, int dim, int64_t start, int64_t len) {
  if (check_dim("narrow", t, dim)) return -1;
  if (start < 0 || len < 0 || start > t->shape[dim] || len > t->shape[dim] - start)
    return fl_fail("narrow: range start %lld length %lld does not fit dim %d of size %lld",
                   (long long)start + 1, (long long)len, dim + 1, (long long)t->shape[dim]);
  t->offset += start * t->stride[dim];
  t->shape[dim] = len;
  return 0;
}

int fl_view_select(fl_tensor *t, int dim, int64_t index) {
  if (check_dim("select", t, dim)) return -1;
  if (index < 0 || index >= t->shape[dim])
    return fl_fail("select: index %lld out of range for dim %d of size %lld",
                   (long long)index + 1, dim + 1, (long long)t->shape[dim]);
  t->offset += index * t->stride[dim];
  for (int i = dim; i < t->ndim - 1; i++) {
    t->shape[i] = t->shape[i + 1];
    t->stride[i] = t->stride[i + 1];
  }
  t->ndim--;
  return 0;
}

int fl_view_expand(fl_tensor *t, int ndim, const int64_t *shape) {
  char a[200], b[200];
  if (ndim < t->ndim || ndim > FL_MAXDIM) goto bad;
  int64_t sh[FL_MAXDIM], st[FL_MAXDIM];
  for (int i = ndim - 1, j = t->ndim - 1; i >= 0; i--, j--) {
    int64_t want = shape[i];
    if (j < 0) {                                  /* new leading dim */
      if (want < 0) goto bad;
      sh[i] = want; st[i] = 0;
    } else if (want == -1 || want == t->shape[j]) {
      sh[i] = t->shape[j]; st[i] = t->stride[j];
    } else if (t->shape[j] == 1 && want >= 0) {
      sh[i] = want; st[i] = 0;
    } else goto bad;
  }
  t->ndim = ndim;
  memcpy(t->shape, sh, sizeof sh);
  memcpy(t->stride, st, sizeof st);
  return 0;
bad:
  fl_shape_str(a, sizeof a, t->ndim, t->shape);
  fl_shape_str(b, sizeof b, ndim, shape);
  return fl_fail("expand: cannot expand size %s to %s", a, b);
}

int fl_view_unsqueeze(fl_tensor *t, int dim) {
  if (dim < 0 || dim > t->ndim)
    return fl_fail("unsqueeze: dim %d out of range for a %d-d tensor (1..%d)", dim + 1, t->ndim, t->ndim + 1);
  if (t->ndim >= FL_MAXDIM) return fl_fail("unsqueeze: tensors have at most %d dims", FL_MAXDIM);
  for (int i = t->ndim; i > dim; i--) { t->shape[i] = t->shape[i - 1]; t->stride[i] = t->stride[i - 1]; }
  t->shape[dim] = 1;
  /* any stride works for a size-1 dim; pick the contiguous one so is_contiguous stays simple */
  t->stride[dim] = dim < t->ndim ? t->stride[dim + 1] * t->shape[dim + 1] : 1;
  t->ndim++;
  return 0;
}

int fl_view_squeeze(fl_tensor *t, int dim) {
  if (dim == -1) {
    int k = 0;
    for (int i = 0; i < t->ndim; i++)
      if (t->shape[i] != 1) { t->shape[k] = t->shape[i]; t->stride[k] = t->stride[i]; k++; }
    t->ndim = k;
    return 0;
  }
  if (check_dim("squeeze", t, dim)) return -1;
  if (t->shape[dim] != 1) return 0;   /* like Torch: squeezing a dim of size > 1 is a no-op */
  return fl_view_select(t, dim, 0);
}

int fl_broadcast_shape(const char *op, int na, const int64_t *sa, int nb, const int64_t *sb,
                       int *nout, int64_t *sout) {
  int n = na > nb ? na : nb;
  int64_t out[FL_MAXDIM];
  for (int i = 0; i < n; i++) {
    int ia = na - n + i, ib = nb - n + i;
    int64_t x = ia >= 0 ? sa[ia] : 1, y = ib >= 0 ? sb[ib] : 1;
    if (x == y || y == 1) out[i] = x;
    else if (x == 1) out[i] = y;
    else {
      char a[200], b[200];
      fl_shape_str(a, sizeof a, na, sa);
      fl_shape_str(b, sizeof b, nb, sb);
      return fl_fail("%s: shapes %s and %s cannot broadcast", op, a, b);
    }
  }
  *nout = n;
  memcpy(sout, out, (size_t)n * sizeof *out);
  return 0;
}
