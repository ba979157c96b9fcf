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
int fl_cast(fl_tensor *out, const fl_tensor *a, fl_dtype dt);

/* Result dtype of a binary op between a and b (float64 > float32 > int64 > int32 > uint8). */
fl_dtype fl_promote(fl_dtype a, fl_dtype b);

int fl_binary(fl_binop op, fl_tensor *out, const fl_tensor *a, const fl_tensor *b);
int fl_binary_into(fl_binop op, fl_tensor *out, const fl_tensor *a, const fl_tensor *b); /* out may alias a */
int fl_unary(fl_unop op, fl_tensor *out, const fl_tensor *a, double p0, double p1);
int fl_unary_into(fl_unop op, fl_tensor *out, const fl_tensor *a, double p0, double p1);
int fl_reduce(fl_redop op, fl_tensor *out, const fl_tensor *a, int dim, int keepdim, int correction);
int fl_where(fl_tensor *out, const fl_tensor *mask, const fl_tensor *a, const fl_tensor *b);
/* (M,K)x(K,N), batched (...,M,K)x(...,K,N) with broadcast batch dims, (K)x(K,N), (M,K)x(K) */
int fl_matmul(fl_tensor *out, const fl_tensor *a, const fl_tensor *b);
int fl_softmax(fl_tensor *out, const fl_tensor *a, int dim, int log);
int fl_rng(fl_tensor *out, fl_rngkind kind, uint64_t seed, uint64_t offset, double p0, double p1);
int fl_arange(fl_tensor *out, double start, double stop, double step, fl_dtype dt);
int fl_linspace(fl_tensor *out, double start, double stop, int64_t n, fl_dtype dt);

/* threads used by the CPU kernels (and OpenBLAS) */
void fl_set_num_threads(int n);
int fl_get_num_threads(void);

#endif
