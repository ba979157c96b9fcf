/* The front API: checked, broadcasting, dtype-resolving operations dispatched to backends.
 * Outputs passed as `fl_tensor *out` are initialised here (the caller passes an empty struct)
 * unless the name ends in _into, which writes into an existing tensor of the right shape. */
#ifndef FLOWER_OPS_H
#define FLOWER_OPS_H

#include "backend.h"

int fl_copy_into(fl_tensor *dst, const fl_tensor *src);   /* shapes must match; broadcasting src allowed */
int fl_fill(fl_tensor *t, double value);
int fl_contiguous(fl_tensor *out, const fl_tensor *a);    /* view if already contiguous, else a copy */
int fl_clone(fl_tensor *out, const fl_tensor *a);
int fl_cast(fl_tensor *out, const fl_tensor *a, fl_dtype dt);  /* a view of a when dt is a's dtype */
/* ts[0..n-1] joined along dim (cat: an existing dim, sizes may differ there) or along a new dim
 * (stack: equal shapes); dtypes promoted; all on one backend and device. dim is 0-based. */
int fl_cat(fl_tensor *out, const fl_tensor *const *ts, int n, int dim, int stack);
/* the slices idx[0..n-1] (0-based, each checked) of a along dim, in that order; runs of
 * consecutive indices are copied as one slice, so a sorted selection costs about one copy */
int fl_index_select(fl_tensor *out, const fl_tensor *a, int dim, const int64_t *idx, int64_t n);

/* Result dtype of a binary op between a and b (float64 > float32 > int64 > int32 > uint8). */
fl_dtype fl_promote(fl_dtype a, fl_dtype b);

int fl_binary(fl_binop op, fl_tensor *out, const fl_tensor *a, const fl_tensor *b);
/* out may alias a or b; a and b broadcast to out's shape; computed in out's dtype (a float result
 * into an integer out is an error); partially overlapping inputs are read from a copy */
int fl_binary_into(fl_binop op, fl_tensor *out, const fl_tensor *a, const fl_tensor *b);
/* integer inputs give float32 for exp/log/sqrt/tanh/sigmoid and fractional pow/affine parameters */
int fl_unary(fl_unop op, fl_tensor *out, const fl_tensor *a, double p0, double p1);
int fl_unary_into(fl_unop op, fl_tensor *out, const fl_tensor *a, double p0, double p1);
/* dim 0-based, or < 0 for everything (then out is 0-dim, or all-ones shape with keepdim).
 * Output dtypes: see backend.h. ARGMAX/ARGMIN give 0-based int64 indices (the Lua binding adds 1). */
int fl_reduce(fl_redop op, fl_tensor *out, const fl_tensor *a, int dim, int keepdim, int correction);
int fl_where(fl_tensor *out, const fl_tensor *mask, const fl_tensor *a, const fl_tensor *b);
/* (M,K)x(K,N), batched (...,M,K)x(...,K,N) with broadcast batch dims, (K)x(K,N), (M,K)x(K) */
int fl_matmul(fl_tensor *out, const fl_tensor *a, const fl_tensor *b);
/* out = alpha * op(a) @ op(b) + beta * out into an existing out: 2-d (M,K)x(K,N) or 3-d batched
 * (B,M,K)x(B,K,N); op transposes the last two dims when trans_* is set. One float dtype; out's rows
 * contiguous and not overlapping a or b. beta 0 ignores out's contents (for accumulating gradients
 * use beta 1). */
int fl_gemm(fl_tensor *out, const fl_tensor *a, const fl_tensor *b, int trans_a, int trans_b,
            double alpha, double beta);
/* softmax / log-softmax over `dim` (0-based); integer input gives float32 */
int fl_softmax(fl_tensor *out, const fl_tensor *a, int dim, int log);
/* Fills the existing `out` from Philox stream (seed, offset), element i (row-major) getting counter
 * offset + i; see rng.h. UNIFORM [p0, p1), NORMAL mean p0 std p1, INT [p0, p1). */
int fl_rng(fl_tensor *out, fl_rngkind kind, uint64_t seed, uint64_t offset, double p0, double p1);
/* The same from the global generator (rng.h), which advances by numel(t). */
int fl_random_(fl_tensor *t, fl_rngkind kind, double p0, double p1);
/* 1-d CPU tensors: arange has numpy's half-open [start, stop); linspace includes both ends */
int fl_arange(fl_tensor *out, double start, double stop, double step, fl_dtype dt);
int fl_linspace(fl_tensor *out, double start, double stop, int64_t n, fl_dtype dt);

/* threads used by the CPU kernels (and OpenBLAS) */
void fl_set_num_threads(int n);
int fl_get_num_threads(void);

#endif
