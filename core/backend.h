/* The backend interface: one front API (ops.h, nn.h), backends behind a table of function pointers.
 * The front checks arguments, resolves broadcasting and dtypes, allocates outputs, and then calls
 * the backend of the tensors involved; a backend only computes. All tensors given to one call share
 * a backend. The CPU backend lives in core/cpu/, the CUDA one in core/cuda/ (.cu files only).
 *
 * Backends register themselves in one list (core/backend.c): the bindings find them by name
 * ("cuda:1" -> the "cuda" table, device 1), and tests/c/test_backend_ops.c compares every op and nn
 * kernel of each one against the CPU's. Adding a backend: its own folder core/<name>/ with a table
 * (ops, `nn` kernels, device_count), one registration line in core/backend.c, and its sources in the
 * Makefile's build; nothing else changes. */
#ifndef FLOWER_BACKEND_H
#define FLOWER_BACKEND_H

#include "tensor.h"

typedef enum {
  FL_ADD, FL_SUB, FL_MUL, FL_DIV, FL_POW, FL_MAXIMUM, FL_MINIMUM,
  FL_EQ, FL_NE, FL_LT, FL_LE, FL_GT, FL_GE,        /* comparisons: out is uint8 0/1 */
  FL_NBINOPS
} fl_binop;

typedef enum {
  FL_NEG, FL_EXP, FL_LOG, FL_SQRT, FL_ABS, FL_TANH, FL_SIGMOID, FL_RELU,
  FL_CLAMP,                                          /* p0 = lo, p1 = hi */
  FL_POWS,                                           /* x ^ p0 */
  FL_AFFINE,                                         /* x * p0 + p1 */
  FL_NUNOPS
} fl_unop;

typedef enum { FL_SUM, FL_MEAN, FL_MAX, FL_MIN, FL_ARGMAX, FL_ARGMIN, FL_VAR, FL_STD, FL_NREDOPS } fl_redop;

typedef enum { FL_RNG_UNIFORM, FL_RNG_NORMAL, FL_RNG_INT } fl_rngkind;

/* bfloat16 (FL_BF16) is accepted wherever float32 is, except by the optimizer and loss kernels of
 * nn.h; it is computed in float32 and each result rounded once, so backends agree within one
 * rounding. Reductions of bfloat16: SUM, MAX, MIN give bfloat16, MEAN/VAR/STD float32. */
struct fl_backend {
  const char *name;                                  /* "cpu", "cuda": devices are "name:<n>" */
  /* Devices present (0 when none: no driver, no hardware). NULL: exactly one, device 0 (the CPU). */
  int (*device_count)(void);
  /* Why device_count() is 0, in a sentence (NULL: the backend never lacks a device). */
  const char *(*unavailable_reason)(void);
  /* NULL on failure. The allocator may record why with fl_fail_oom / fl_fail (the front keeps that
   * message and adds the tensor's size); if it records nothing the front says "out of memory". */
  void *(*alloc)(int device, size_t nbytes);
  void (*free)(int device, void *p);
  /* dst and src have equal shapes; dtypes may differ (converted); either may be strided.
   * A cross-backend copy is run by the backend that is not the CPU's. */
  int (*copy)(fl_tensor *dst, const fl_tensor *src);
  int (*fill)(fl_tensor *t, double value);         /* value converted (saturating for integers) */
  /* a, b already broadcast (expanded views) to out's shape, same dtype as out, except for
   * comparisons where out is uint8 and a, b share their own dtype. Integer arithmetic wraps
   * around; FL_DIV is for float dtypes only (the front promotes integers). */
  int (*binary)(fl_binop op, fl_tensor *out, const fl_tensor *a, const fl_tensor *b);
  /* out and a have equal shapes and dtypes. Transcendental ops (EXP LOG SQRT TANH SIGMOID) and
   * FL_POWS with a non-integral exponent are for float dtypes only (the front casts). */
  int (*unary)(fl_unop op, fl_tensor *out, const fl_tensor *a, double p0, double p1);
  /* reduce a over `dim` (out has a's shape with that dim of size 1), or over everything when dim < 0
   * (out has 1 element; a is contiguous). Output dtypes (chosen by the front): SUM: a's for floats,
   * int64 for integers; MEAN/VAR/STD: float64 for float64 input, else float32; MAX/MIN: a's;
   * ARGMAX/ARGMIN: int64, 0-based, first occurrence, NaN counting as the largest/smallest.
   * `correction` is for VAR/STD (1 = unbiased). MAX/MIN/ARG* need at least one element. */
  int (*reduce)(fl_redop op, fl_tensor *out, const fl_tensor *a, int dim, int correction);
  /* out = where(mask, a, b); all expanded to out's shape; mask uint8 */
  int (*where)(fl_tensor *out, const fl_tensor *mask, const fl_tensor *a, const fl_tensor *b);
  /* out = alpha * a @ b + beta * out, batched over the first dim: a (B,M,K), b (B,K,N),
   * out (B,M,N), all float32 or all float64, or a and b bfloat16 with out bfloat16 or float32
   * (accumulated in float32 either way). Each matrix of a and b has a unit stride in one of
   * its last two dims (row- or column-major; the other stride >= the extent it spans), out's rows
   * have unit stride; batch strides are arbitrary, 0 meaning one matrix shared by every batch.
   * The front (fl_matmul, fl_gemm) copies operands that don't fit this. With beta == 0, out's
   * previous contents are ignored (NaN included). */
  int (*matmul)(fl_tensor *out, const fl_tensor *a, const fl_tensor *b, double alpha, double beta);
  /* softmax / log-softmax over `dim` of a contiguous float tensor into a contiguous out */
  int (*softmax)(fl_tensor *out, const fl_tensor *a, int dim, int log);
  /* Philox4x32-10 streams: element i of the output gets counter (offset + i) with key `seed`;
   * see core/rng.h. For FL_RNG_INT p0..p1 is [lo, hi). NORMAL: mean p0, std p1. UNIFORM: [p0, p1). */
  int (*rng)(fl_tensor *out, fl_rngkind kind, uint64_t seed, uint64_t offset, double p0, double p1);
  /* neural-network kernels (convolution, pooling, batch norm, ...): declared in core/nn.h. A kernel
   * a backend leaves NULL fails naming itself and the backend (and the cross-backend test says so). */
  const struct fl_nn_ops *nn;

  /* ---- the host side of a device backend (NULL in the CPU's table and where not provided) ----
   * Page-locked ("pinned") host memory, which the device reads by DMA while the host goes on: the
   * loader decodes batches straight into it (fl_storage_new_pinned, l_data.c's pin_memory).
   * host_alloc: NULL with a message on failure. host_free: waits for the asynchronous copies that
   * still read the block, then frees it. host_wait: blocks until no asynchronous copy reads the
   * block starting at p (0, or -1 with a message); a block it does not know returns 0 at once. */
  void *(*host_alloc)(size_t nbytes);
  void (*host_free)(void *p);
  int (*host_wait)(const void *p);
  /* dst (this backend, contiguous) = src (host, contiguous, same dtype and shape), without waiting
   * for the copy: it runs on a copy stream, and the device's compute stream waits for it on the
   * device, so kernels queued on dst afterwards see the data. A pinned src (host_alloc) is read
   * after the call returns: host_wait / host_free before writing or freeing it. Anything else
   * (pageable or strided src, dtype conversion) is copied as `copy` does. */
  int (*copy_async)(fl_tensor *dst, const fl_tensor *src);
};

extern const fl_backend fl_cpu_backend;

/* ---- the registry ----
 * The built-in backends (the CPU's first, then those the build includes) and any registered since.
 * fl_backend_register adds one (tests add their fake device backend): -1 with a message when the
 * name is taken or the list is full. fl_backend_at(i) for 0 <= i < fl_backend_count(), else NULL. */
#define FL_MAX_BACKENDS 8
int fl_backend_register(const fl_backend *be);
int fl_backend_count(void);
const fl_backend *fl_backend_at(int i);
const fl_backend *fl_backend_find(const char *name);      /* NULL when none has that name */
/* Devices of a backend present now (device_count(), or 1 for a backend without devices). */
int fl_backend_devices(const fl_backend *be);
/* A device name: "cpu", "<backend>" (device 0) or "<backend>:<n>" -> its backend and index.
 * -1 with a message naming `op` for a malformed name, a backend that is not built in (naming those
 * that are), a backend without devices (its reason) or an index past its devices. */
int fl_device_parse(const char *op, const char *spec, const fl_backend **be, int *device);
/* The CPU backend keeps a few freed large blocks for reuse (core/cpu/cpu.c); this returns them. */
void fl_cpu_release_cache(void);
/* Host bytes in blocks in use, in the cache, and the peak of the two together since the start or
 * the last reset (reset_peak != 0 starts it again from now); any pointer may be NULL. */
void fl_cpu_memory_stats(size_t *used, size_t *cached, size_t *peak, int reset_peak);

#endif
