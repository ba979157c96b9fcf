/* flowerlua core: collectives across the processes of a job, through MPI for host tensors and
 * NCCL for CUDA tensors. Plain C, no Lua. Never a protocol of our own: MPI starts the processes
 * (mpirun, srun), finds the peers and moves the bytes.
 *
 * Launch. fl_dist_init() calls MPI_Init only when a launcher says there are ranks to talk to
 * (Open MPI's OMPI_COMM_WORLD_SIZE, PMI's PMI_SIZE, PMIx's PMIX_RANK, Slurm's SLURM_NTASKS with
 * SLURM_PROCID): a plain `./flowerlua` is rank 0 of 1 and never touches MPI. A build without MPI
 * headers (FLOWER_MPI undefined) is rank 0 of 1 too, and fails with a message when the environment
 * says it was launched as several ranks.
 *
 * Checked collectives. Each call first exchanges a small descriptor with every rank (MPI_Iallgather:
 * call number, operation, dtype, shape, root), polled with a deadline: a shape, dtype or operation
 * that differs between ranks is an error on every rank, naming the ranks and what each passed; a
 * collective that some rank never joins is an error after fl_dist_timeout() seconds (default 300,
 * FLOWER_DIST_TIMEOUT) instead of a hang. Only then do the data move (blocking MPI, or NCCL polled
 * with the same deadline). After a timeout the job cannot go on (a request is still pending):
 * every later call fails and the process ends with MPI_Abort, which stops every rank.
 *
 * Exit. When MPI was started, an exit with status 0 calls MPI_Finalize; any other exit, or one after
 * a timeout, calls MPI_Abort(status): the launcher then stops the other ranks and names this one.
 * A rank killed outright (kill -9) is noticed by the launcher, which stops the job and names it.
 *
 * Errors: 0 on success, -1 with a message in fl_errmsg() naming the operation. */
#ifndef FLOWER_DIST_H
#define FLOWER_DIST_H

#include <stddef.h>
#include "tensor.h"

typedef enum { FL_DIST_SUM, FL_DIST_MEAN, FL_DIST_MAX, FL_DIST_MIN, FL_DIST_NOPS } fl_dist_op;

/* Starts MPI if launched as a job (idempotent). -1 if launched as several ranks and MPI is not
 * in this build, or MPI_Init fails. */
int fl_dist_init(void);
/* 1 if this build has MPI (FLOWER_MPI), 0 otherwise; 1 if it has NCCL (FLOWER_NCCL). */
int fl_dist_has_mpi(void);
int fl_dist_has_nccl(void);
/* The job as seen after fl_dist_init (before it: 0 of 1). local_rank: this rank's index among the
 * ranks on its host (its GPU is cuda:<local_rank>). */
int fl_dist_rank(void);
int fl_dist_size(void);
int fl_dist_local_rank(void);
int fl_dist_local_size(void);
/* The number of ranks the launcher's environment announces (1 when launched by none), and the
 * variable that said so ("" when none). */
int fl_dist_env_size(const char **var);

/* Seconds a rank waits for the others to join a collective (> 0). */
double fl_dist_timeout(void);
int fl_dist_set_timeout(double seconds);
/* 1 after a timeout: the job can only be stopped. */
int fl_dist_broken(void);

int fl_dist_barrier(void);
/* In place on t (any layout; a non-contiguous t goes through a contiguous copy). MEAN divides the
 * sum by the number of ranks (float dtypes only). Host tensors through MPI, CUDA ones through NCCL. */
int fl_dist_allreduce(fl_tensor *t, fl_dist_op op);
/* In place: every rank gets root's values (shapes and dtypes must agree). */
int fl_dist_broadcast(fl_tensor *t, int root);
/* out (empty on entry) = the ranks' tensors concatenated along dim 0, in rank order, on t's device.
 * The first dim may differ between ranks (the ranks' shares of a data set); the others must agree. */
int fl_dist_all_gather(fl_tensor *out, const fl_tensor *t);
/* Many tensors at once (the gradients of a step), checked once: each is multiplied by scale, summed
 * across ranks in buckets of about bucket_bytes (packed into one buffer on their device, one
 * collective per bucket), and written back. All on one device, one float dtype. */
int fl_dist_allreduce_many(int n, fl_tensor *const *ts, double scale, size_t bucket_bytes);
/* Sums (or max/min) n doubles across ranks in place: counts and metrics. */
int fl_dist_allreduce_doubles(double *v, int n, fl_dist_op op);

/* Cumulative seconds spent in collectives and bytes reduced by this rank (benchmarks). */
void fl_dist_stats(double *seconds, double *bytes, long *calls);

#endif
