/* flowerlua core: N-d strided tensors over reference-counted storage.
 * Plain C11, no Lua. Every kernel goes through the tensor's backend table (backend.h).
 * Errors: functions returning int give 0 on success and -1 on failure, with a message
 * naming the operation, what was expected and what was found in fl_errmsg(). */
#ifndef FLOWER_TENSOR_H
#define FLOWER_TENSOR_H

#include <stddef.h>
#include <stdint.h>

#define FL_MAXDIM 8

/* FL_BF16 (bfloat16): the upper 16 bits of an IEEE float32, for mixed-precision activations and
 * weight copies. Converting into it rounds to nearest even (NaN stays NaN). Backends compute with
 * it in float32 and round each result once. */
typedef enum { FL_F32, FL_F64, FL_I32, FL_I64, FL_U8, FL_BF16, FL_NDTYPES } fl_dtype;

typedef struct fl_backend fl_backend;

typedef struct fl_storage {
  int refcount;               /* atomic; the storage is freed when it drops to 0 */
  void *data;                 /* owned unless `external` */
  size_t nbytes;
  const fl_backend *backend;  /* where `data` lives */
  int device;                 /* device index within the backend */
  /* Page-locked host memory (fl_storage_new_pinned): the device backend whose host_alloc gave
   * `data` and whose host_free takes it back. NULL for every other storage. A pinned storage is a
   * CPU storage in every other respect (backend == &fl_cpu_backend, CPU kernels, is_host). */
  const fl_backend *pinned;
} fl_storage;

/* A tensor is a strided view: element (i0..in) is at
 * data + (offset + sum_k i_k * stride[k]) * elsize, strides counted in elements. */
typedef struct fl_tensor {
  fl_storage *storage;        /* NULL only for an empty (freed / not yet made) tensor */
  int64_t offset;
  int ndim;
  fl_dtype dtype;
  int64_t shape[FL_MAXDIM];
  int64_t stride[FL_MAXDIM];
} fl_tensor;

/* ---- errors ---- */
const char *fl_errmsg(void);                       /* message of the last failure (thread-local) */
int fl_fail(const char *fmt, ...)                  /* records a message, returns -1 */
  __attribute__((format(printf, 1, 2)));
/* Like fl_fail, and marks the failure as "out of memory" (bindings may collect garbage and retry). */
int fl_fail_oom(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
int fl_last_failure_was_oom(void);                 /* 1 if the last fl_fail* on this thread was fl_fail_oom */
int fl_fail_prefix(const char *op);                /* turns the message into "op: message", returns -1 */

/* ---- dtypes ---- */
size_t fl_dtype_size(fl_dtype dt);
const char *fl_dtype_name(fl_dtype dt);            /* "float32", "float64", "int32", "int64", "uint8", "bfloat16" */
int fl_dtype_from_name(const char *name, fl_dtype *out); /* -1 with a message if unknown */
int fl_dtype_is_float(fl_dtype dt);               /* float32, float64, bfloat16 */

/* bfloat16 <-> float32 (host code; CUDA code uses cuda_bf16.h's intrinsics, which agree) */
static inline float fl_bf16_to_float(uint16_t h) {
  union { uint32_t u; float f; } v = {(uint32_t)h << 16};
  return v.f;
}
static inline uint16_t fl_bf16_from_float(float f) {
  union { float f; uint32_t u; } v = {f};
  if ((v.u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((v.u >> 16) | 0x40);  /* quiet NaN */
  v.u += 0x7fffu + ((v.u >> 16) & 1);                                            /* nearest, ties to even */
  return (uint16_t)(v.u >> 16);
}

/* ---- storage ---- */
/* NULL + message on failure: the backend allocator's own message when it recorded one with
 * fl_fail / fl_fail_oom (kept as is, with its out-of-memory mark), else a generic out-of-memory one. */
fl_storage *fl_storage_new(const fl_backend *be, int device, size_t nbytes);
/* A CPU storage in page-locked memory from device backend `dev` (its host_alloc), which that
 * device reads with asynchronous copies (backend.h: copy_async). Falls back to a plain CPU storage
 * when dev is NULL, has no host_alloc, or cannot give page-locked memory (a scarce resource): check
 * s->pinned. NULL + message only when plain memory runs out too. */
fl_storage *fl_storage_new_pinned(const fl_backend *dev, size_t nbytes);
void fl_storage_retain(fl_storage *s);
void fl_storage_release(fl_storage *s);
size_t fl_storage_live_bytes(void);                /* bytes held by all live storages */

/* ---- lifetime of a tensor struct (the struct itself is owned by the caller, e.g. a userdata) ---- */
/* Makes `t` a new contiguous tensor; contents uninitialised. ndim 0 is a scalar (one element).
 * Checks the shape (0 <= ndim <= FL_MAXDIM, sizes >= 0, byte count fits) before allocating.
 * On failure `t` is left empty (storage NULL). */
int fl_tensor_init(fl_tensor *t, const fl_backend *be, int device, fl_dtype dt, int ndim, const int64_t *shape);
/* Makes `dst` a view sharing src's storage (retained), same shape/strides. */
void fl_tensor_init_view(fl_tensor *dst, const fl_tensor *src);
void fl_tensor_free(fl_tensor *t);                 /* releases storage, tolerates being called twice */
/* Moves src into dst (dst must be empty or is freed first); src becomes empty. */
void fl_tensor_move(fl_tensor *dst, fl_tensor *src);
/* A new 0-dim tensor holding `value` converted to dt. */
int fl_tensor_init_scalar(fl_tensor *t, const fl_backend *be, int device, fl_dtype dt, double value);

/* ---- shape queries ---- */
int64_t fl_tensor_numel(const fl_tensor *t);
int fl_tensor_is_contiguous(const fl_tensor *t);
/* Address of element 0 in the storage's own memory: a host pointer only when fl_tensor_is_host(t);
 * for a device tensor it is a device address that host code must never dereference. */
void *fl_tensor_data(const fl_tensor *t);
/* 1 if t's elements are in host memory that C code may read and write directly (the CPU backend's
 * storage); 0 for device backends and freed tensors. Check it before fl_tensor_data, fl_tensor_get,
 * fl_tensor_set or any other direct access to elements. */
int fl_tensor_is_host(const fl_tensor *t);
/* 0 if fl_tensor_is_host(t), else -1 with "op: the tensor is on cuda:0, not in host memory ..." */
int fl_tensor_require_host(const char *op, const fl_tensor *t);
/* Where t lives, for messages: "cpu", "cuda:1" (backend name and device index), "(freed)". */
void fl_device_str(char *buf, size_t n, const fl_tensor *t);
void fl_shape_str(char *buf, size_t n, int ndim, const int64_t *shape); /* "[2,3,4]" */
void fl_contiguous_strides(int ndim, const int64_t *shape, int64_t *stride);
/* The iteration space of nop tensors of t[0]'s shape, for kernels that walk them together: size-1
 * dims dropped, and neighbouring dims that every operand steps through as one merged (right to
 * left), so contiguous operands give one dim. Fills shape[0..nd) and st[k][0..nd) (operand k's
 * strides, in elements) and returns nd >= 1 (a single element: one dim of size 1, stride 1). */
int fl_iter_shape(int nop, const fl_tensor *const *t, int64_t *shape, int64_t (*st)[FL_MAXDIM]);
/* 1 if some element of t is reachable through two different indices (a dim of size > 1 and stride 0,
 * or other overlapping strides); writing into such a view is ambiguous. */
int fl_tensor_has_internal_overlap(const fl_tensor *t);
/* 1 if a's and b's element ranges in one storage intersect (conservative: by address span). */
int fl_tensor_may_overlap(const fl_tensor *a, const fl_tensor *b);
/* 1 if a and b may address a common element of the same storage but are not the identical view. */
int fl_tensor_partial_overlap(const fl_tensor *a, const fl_tensor *b);
int fl_tensor_same_shape(const fl_tensor *a, const fl_tensor *b);
/* One element, 0-based index; host tensors only (fl_tensor_is_host): the caller checks. */
double fl_tensor_get(const fl_tensor *t, const int64_t *index);
void fl_tensor_set(fl_tensor *t, const int64_t *index, double value);

/* ---- views (in place on `t`, which must already be a view of its own: see init_view) ----
 * Dims and indices are 0-based here and must be in range (bindings translate Lua's 1-based and
 * negative indices). On failure `t` is unchanged and fl_errmsg() says why. */
int fl_view_reshape(fl_tensor *t, int ndim, const int64_t *shape); /* one dim may be -1; needs a compatible layout */
int fl_view_permute(fl_tensor *t, const int *perm);
int fl_view_transpose(fl_tensor *t, int d0, int d1);
int fl_view_narrow(fl_tensor *t, int dim, int64_t start, int64_t len);
int fl_view_select(fl_tensor *t, int dim, int64_t index); /* removes dim */
int fl_view_expand(fl_tensor *t, int ndim, const int64_t *shape); /* size-1 dims broadcast (stride 0) */
int fl_view_unsqueeze(fl_tensor *t, int dim);
int fl_view_squeeze(fl_tensor *t, int dim);        /* dim -1: all size-1 dims */

/* Broadcast shape of a and b (numpy rules) into out; -1 with a message naming `op` if they don't fit. */
int fl_broadcast_shape(const char *op, int na, const int64_t *sa, int nb, const int64_t *sb,
                       int *nout, int64_t *sout);

#endif
