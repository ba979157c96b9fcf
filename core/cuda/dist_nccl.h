/* NCCL for core/dist.c: collectives on CUDA tensors. Plain C, no CUDA or NCCL types; present only in
 * a `make CUDA=1` build (FLOWER_CUDA), and doing real work only where nccl.h was found (FLOWER_NCCL;
 * otherwise every call fails saying so). MPI is dist.c's business: it broadcasts the unique id that
 * fl_nccl_unique_id makes on rank 0, and checks shapes across ranks before any call here.
 *
 * Every call queues its work on the device's own stream (the one every kernel of the backend uses,
 * so the collective is ordered after the backward pass that wrote the gradients) and then waits for
 * it, polling the stream and ncclCommGetAsyncError until `deadline` (CLOCK_MONOTONIC seconds): past
 * it the communicator is aborted (ncclCommAbort) and the call fails, so a rank that died or hangs
 * cannot block the job forever. Tensors are contiguous and on the communicator's device. */
#ifndef FLOWER_DIST_NCCL_H
#define FLOWER_DIST_NCCL_H

#include <stddef.h>
#include "../tensor.h"
#include "../dist.h"

#ifdef __cplusplus
extern "C" {
#endif

#define FL_NCCL_ID_BYTES 128

int fl_nccl_unique_id(void *id);                     /* id: FL_NCCL_ID_BYTES bytes */
/* One communicator per process: rank of size on CUDA device `device`. */
int fl_nccl_init(const void *id, int rank, int size, int device);
int fl_nccl_ready(void);                             /* 1 once fl_nccl_init succeeded */
int fl_nccl_device(void);                            /* its device, -1 before */
int fl_nccl_allreduce(fl_tensor *t, fl_dist_op op, double deadline);
int fl_nccl_broadcast(fl_tensor *t, int root, double deadline);
/* out: contiguous on the device with sum(rows) rows; rank r's rows go to out at row offset[r]. */
int fl_nccl_all_gather(fl_tensor *out, const fl_tensor *t, const int64_t *rows, double deadline);
void fl_nccl_finalize(int abort);                     /* destroys (or aborts) the communicator */

#ifdef __cplusplus
}
#endif

#endif
