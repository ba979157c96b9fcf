/* Collectives across the ranks of a job: MPI for host tensors and rendezvous, NCCL (core/cuda/
 * dist_nccl.cu) for CUDA tensors. See dist.h for the contract: launch detection, the checked
 * descriptor exchange that turns wrong use into errors, the timeout, and how the job ends. */
#include "dist.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "ops.h"
#include "backend.h"

#ifdef FLOWER_MPI
#include <mpi.h>
#endif
#ifdef FLOWER_CUDA
#include "cuda/cuda_backend.h"
#include "cuda/dist_nccl.h"
#endif

static int started;                 /* fl_dist_init ran (successfully) */
static int g_rank, g_size = 1, g_local_rank, g_local_size = 1;
static double g_timeout = -1;       /* < 0: not read from the environment yet */
static int g_broken;                /* a collective timed out: only stopping is left */
#ifdef FLOWER_MPI
static long long g_seq;             /* collectives so far (the descriptor's call number) */
#endif
static double st_seconds, st_bytes; /* fl_dist_stats */
static long st_calls;

static double now(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

/* Adds one collective to fl_dist_stats (its time since t0 and the bytes it moved); passes rc on. */
static int counted(double t0, double bytes, int rc) {
  st_seconds += now() - t0;
  st_bytes += bytes;
  st_calls++;
  return rc;
}

int fl_dist_has_mpi(void) {
#ifdef FLOWER_MPI
  return 1;
#else
  return 0;
#endif
}

int fl_dist_has_nccl(void) {
#if defined(FLOWER_CUDA) && defined(FLOWER_NCCL)
  return 1;
#else
  return 0;
#endif
}

/* The launchers' variables, in the order we trust them. Slurm's SLURM_NTASKS alone (an allocation,
 * not a step) says nothing: srun also sets SLURM_PROCID. */
int fl_dist_env_size(const char **var) {
  static const char *const vars[] = {"OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_SIZE", "SLURM_NTASKS", NULL};
  for (int i = 0; vars[i]; i++) {
    const char *v = getenv(vars[i]);
    if (!v || !*v) continue;
    if (i == 3 && !getenv("SLURM_PROCID")) continue;
    if (var) *var = vars[i];
    int n = atoi(v);
    return n > 0 ? n : 1;
  }
  /* PMIx (srun --mpi=pmix, prterun) exports the rank but not always the size */
  if (getenv("PMIX_RANK")) { if (var) *var = "PMIX_RANK"; return 2; }
  if (var) *var = "";
  return 1;
}

double fl_dist_timeout(void) {
  if (g_timeout < 0) {
    const char *v = getenv("FLOWER_DIST_TIMEOUT");
    double t = v && *v ? atof(v) : 0;
    g_timeout = t > 0 ? t : 300;
  }
  return g_timeout;
}

int fl_dist_set_timeout(double seconds) {
  if (!(seconds > 0) || !isfinite(seconds))
    return fl_fail("dist.set_timeout: expected a positive number of seconds, got %g", seconds);
  g_timeout = seconds;
  return 0;
}

int fl_dist_broken(void) { return g_broken; }
int fl_dist_rank(void) { return g_rank; }
int fl_dist_size(void) { return g_size; }
int fl_dist_local_rank(void) { return g_local_rank; }
int fl_dist_local_size(void) { return g_local_size; }

void fl_dist_stats(double *seconds, double *bytes, long *calls) {
  if (seconds) *seconds = st_seconds;
  if (bytes) *bytes = st_bytes;
  if (calls) *calls = st_calls;
}

#ifdef FLOWER_MPI
/* glibc's on_exit gives the status: a clean exit finalizes, any other one (or one after a timeout,
 * with a request still pending) aborts, which makes the launcher stop every rank. */
static void dist_at_exit(int status, void *arg) {
  (void)arg;
  int fin = 0;
  MPI_Finalized(&fin);
  if (fin) return;
  if (status != 0 || g_broken) {
#ifdef FLOWER_CUDA
    fl_nccl_finalize(1);
#endif
    fprintf(stderr, "flower.dist: rank %d of %d exits with status %d%s; stopping the job\n", g_rank, g_size,
            status, g_broken ? " after a collective timed out" : "");
    fflush(stderr);
    MPI_Abort(MPI_COMM_WORLD, status ? status : 1);
    return;
  }
#ifdef FLOWER_CUDA
  fl_nccl_finalize(0);
#endif
  MPI_Finalize();
}
#endif

int fl_dist_init(void) {
  if (started) return 0;
  const char *var;
  int n = fl_dist_env_size(&var);
  if (!*var) { started = 1; return 0; }     /* no launcher: one rank, no MPI */
#ifdef FLOWER_MPI
  int inited = 0, provided = 0;
  MPI_Initialized(&inited);
  if (!inited) {
    if (MPI_Init_thread(NULL, NULL, MPI_THREAD_SERIALIZED, &provided) != MPI_SUCCESS)
      return fl_fail("dist.init: MPI_Init failed (launched by %s=%d)", var, n);
    on_exit(dist_at_exit, NULL);
  }
  /* errors come back as codes (and become messages), never abort the process from inside MPI */
  MPI_Comm_set_errhandler(MPI_COMM_WORLD, MPI_ERRORS_RETURN);
  MPI_Comm_rank(MPI_COMM_WORLD, &g_rank);
  MPI_Comm_size(MPI_COMM_WORLD, &g_size);
  MPI_Comm local;
  MPI_Comm_split_type(MPI_COMM_WORLD, MPI_COMM_TYPE_SHARED, g_rank, MPI_INFO_NULL, &local);
  MPI_Comm_rank(local, &g_local_rank);
  MPI_Comm_size(local, &g_local_size);
  MPI_Comm_free(&local);
  started = 1;
  return 0;
#else
  if (n > 1)
    return fl_fail("dist.init: launched as several ranks (%s=%s), but this flowerlua was built without MPI "
                   "(mpi.h was not found: install libopenmpi-dev, e.g. `make deps`, and rebuild); "
                   "it can only run as a single rank", var, getenv(var));
  started = 1;
  return 0;
#endif
}

static int need_init(const char *op) {
  if (fl_dist_init() < 0) return fl_fail_prefix(op);
  if (g_broken)
    return fl_fail("%s: an earlier collective timed out on rank %d; the job cannot continue "
                   "(it stops when this process exits)", op, g_rank);
  return 0;
}

/* ------------------------------------------------------------------ checked descriptors */

enum { D_BARRIER, D_ALLREDUCE, D_BROADCAST, D_ALL_GATHER, D_ALLREDUCE_MANY, D_DOUBLES, D_NCCL_ID };
#ifdef FLOWER_MPI
static const char *const d_names[] = {"barrier", "allreduce", "broadcast", "all_gather",
                                      "allreduce (gradients)", "allreduce (numbers)", "NCCL setup"};
static const char *const op_names[] = {"sum", "mean", "max", "min"};

/* What a rank passed to a collective; every rank compares every rank's. */
typedef struct {
  int64_t seq;
  int32_t kind, arg;           /* arg: the reduction, the root, or a count */
  int32_t dtype, ndim, cuda;   /* cuda: 1 for a CUDA tensor */
  int32_t unused;
  int64_t shape[FL_MAXDIM];
} desc;

static void desc_of(desc *d, int kind, int arg, const fl_tensor *t) {
  memset(d, 0, sizeof *d);
  d->seq = g_seq + 1;           /* calls count from 1 in messages */
  d->kind = kind;
  d->arg = arg;
  if (t) {
    d->dtype = t->dtype;
    d->ndim = t->ndim;
    d->cuda = t->storage->backend != &fl_cpu_backend;
    memcpy(d->shape, t->shape, sizeof(int64_t) * (size_t)t->ndim);
  }
}

static void desc_str(char *buf, size_t n, const desc *d) {
  char shape[128];
  fl_shape_str(shape, sizeof shape, d->ndim, d->shape);
  if (d->kind == D_BARRIER || d->kind == D_NCCL_ID)
    snprintf(buf, n, "%s (call #%lld)", d_names[d->kind], (long long)d->seq);
  else if (d->kind == D_DOUBLES)
    snprintf(buf, n, "%s of %lld values (call #%lld)", d_names[d->kind], (long long)d->shape[0], (long long)d->seq);
  else
    snprintf(buf, n, "%s of a %s %s tensor%s%s%s (call #%lld)", d_names[d->kind],
             d->cuda ? "CUDA" : "host", fl_dtype_name((fl_dtype)d->dtype), shape,
             d->kind == D_ALLREDUCE ? " op " : d->kind == D_BROADCAST ? " root " : "",
             d->kind == D_ALLREDUCE ? op_names[d->arg] : "",
             (long long)d->seq);
  if (d->kind == D_BROADCAST) {
    size_t l = strlen(buf);
    snprintf(buf + l, n - l, " [root %d]", d->arg);
  }
}

/* Waits for a request with the job's deadline, sleeping between polls once the wait is longer than
 * a spin (a rank waiting minutes for rank 0 to write a checkpoint then costs no CPU). */
static int wait_request(MPI_Request *req, const char *op, const desc *mine) {
  double t0 = now(), deadline = t0 + fl_dist_timeout();
  long nap_ns = 20000;
  for (;;) {
    int done = 0;
    if (MPI_Test(req, &done, MPI_STATUS_IGNORE) != MPI_SUCCESS)
      return fl_fail("%s: MPI_Test failed on rank %d", op, g_rank);
    if (done) return 0;
    double t = now();
    if (t > deadline) {
      char what[256];
      desc_str(what, sizeof what, mine);
      g_broken = 1;
      return fl_fail("%s: rank %d of %d waited %g s (the timeout: FLOWER_DIST_TIMEOUT or "
                     "dist.set_timeout) for the other ranks to join its %s: a collective called on some "
                     "ranks only, or a rank that hangs; the job cannot continue and stops when this "
                     "process exits", op, g_rank, g_size, fl_dist_timeout(), what);
    }
    if (t - t0 > 1e-3) {
      struct timespec ts = {0, nap_ns};
      nanosleep(&ts, NULL);
      if (nap_ns < 1000000) nap_ns *= 2;
    }
  }
}

/* Exchanges descriptors; all[] gets every rank's (size entries). Same shape rule for all kinds
 * except all_gather, whose first dim may differ. A mismatch is an error on every rank alike. */
static desc *g_all;
static int exchange(const char *op, desc *mine) {
  if (!g_all && !(g_all = malloc(sizeof(desc) * (size_t)g_size)))
    return fl_fail_oom("%s: out of memory", op);
  MPI_Request req;
  if (MPI_Iallgather(mine, sizeof *mine, MPI_BYTE, g_all, sizeof *mine, MPI_BYTE, MPI_COMM_WORLD, &req) != MPI_SUCCESS)
    return fl_fail("%s: MPI_Iallgather failed on rank %d", op, g_rank);
  g_seq++;
  if (wait_request(&req, op, mine) < 0) return -1;
  for (int r = 0; r < g_size; r++) {
    const desc *o = &g_all[r];
    int same = o->seq == mine->seq && o->kind == mine->kind && o->arg == mine->arg &&
               o->dtype == mine->dtype && o->ndim == mine->ndim && o->cuda == mine->cuda;
    for (int k = mine->kind == D_ALL_GATHER ? 1 : 0; same && k < mine->ndim; k++)
      same = o->shape[k] == mine->shape[k];
    if (!same) {
      /* name the first rank that differs from rank 0, the same on every rank */
      const desc *a = &g_all[0];
      int rb = 1;
      for (; rb < g_size; rb++) {
        const desc *b = &g_all[rb];
        int eq = b->seq == a->seq && b->kind == a->kind && b->arg == a->arg && b->dtype == a->dtype &&
                 b->ndim == a->ndim && b->cuda == a->cuda;
        for (int k = a->kind == D_ALL_GATHER ? 1 : 0; eq && k < a->ndim; k++) eq = b->shape[k] == a->shape[k];
        if (!eq) break;
      }
      if (rb == g_size) rb = r;
      char sa[256], sb[256];
      desc_str(sa, sizeof sa, a);
      desc_str(sb, sizeof sb, &g_all[rb]);
      return fl_fail("%s: the ranks disagree: rank 0 called %s, rank %d called %s (every rank must call "
                     "the same collectives in the same order with the same shapes%s)", op, sa, rb, sb,
                     mine->kind == D_ALL_GATHER ? " beyond the first dim" : "");
    }
  }
  return 0;
}

static MPI_Datatype mpi_type(fl_dtype dt) {
  switch (dt) {
  case FL_F32: return MPI_FLOAT;
  case FL_F64: return MPI_DOUBLE;
  case FL_I32: return MPI_INT32_T;
  case FL_I64: return MPI_INT64_T;
  case FL_U8: return MPI_UINT8_T;
  case FL_BF16: return MPI_UINT16_T;     /* moved as bits; never reduced here */
  default: return MPI_DATATYPE_NULL;
  }
}

static MPI_Op mpi_op(fl_dist_op op) {
  return op == FL_DIST_MAX ? MPI_MAX : op == FL_DIST_MIN ? MPI_MIN : MPI_SUM;
}

#define CHUNK ((int64_t)1 << 30)        /* MPI counts are ints */
#endif /* FLOWER_MPI */

/* ------------------------------------------------------------------ argument checks */

static int is_cuda(const fl_tensor *t) { return t->storage && t->storage->backend != &fl_cpu_backend; }

static int check_tensor(const char *op, const fl_tensor *t) {
  if (!t || !t->storage) return fl_fail("%s: the tensor is freed", op);
  if (is_cuda(t)) {
#if defined(FLOWER_CUDA) && defined(FLOWER_NCCL)
    if (t->storage->backend != fl_cuda_backend()) return fl_fail("%s: unknown device backend", op);
#elif defined(FLOWER_CUDA)
    return fl_fail("%s: the tensor is on a CUDA device, and this build has no NCCL (nccl.h was not "
                   "found under CUDA_HOME at build time)", op);
#else
    return fl_fail("%s: the tensor is on a device this build cannot reach", op);
#endif
  }
  return 0;
}

static int check_reduce(const char *op, const fl_tensor *t, fl_dist_op rop) {
  if ((int)rop < 0 || rop >= FL_DIST_NOPS) return fl_fail("%s: unknown reduction %d", op, (int)rop);
  if (t->dtype == FL_BF16)
    return fl_fail("%s: bfloat16 tensors are not reduced (the sum would round at every rank); "
                   "convert with :float() first", op);
  if (rop == FL_DIST_MEAN && !fl_dtype_is_float(t->dtype))
    return fl_fail("%s: op 'mean' needs a float tensor, got %s (use 'sum')", op, fl_dtype_name(t->dtype));
  return 0;
}

#if defined(FLOWER_CUDA) && defined(FLOWER_NCCL)
/* The job's NCCL communicator, made on first use: rank 0's unique id reaches every rank over MPI.
 * Every rank's tensor must be on its own cuda:<local_rank>, the device the communicator binds. */
static int nccl_ready(const char *op, const fl_tensor *t) {
  int dev = t->storage->device;
  if (fl_nccl_ready()) {
    if (dev != fl_nccl_device())
      return fl_fail("%s: the tensor is on cuda:%d, but rank %d's communicator is on cuda:%d "
                     "(each rank uses cuda:<local_rank>)", op, dev, g_rank, fl_nccl_device());
    return 0;
  }
  if (dev != g_local_rank % (fl_cuda_device_count() > 0 ? fl_cuda_device_count() : 1))
    return fl_fail("%s: the tensor is on cuda:%d, but rank %d (local rank %d) works on cuda:%d: "
                   "move it with t:cuda(flower.dist.local_rank())", op, dev, g_rank, g_local_rank,
                   g_local_rank);
  unsigned char id[FL_NCCL_ID_BYTES];
  memset(id, 0, sizeof id);
  int ok = 1;
  if (g_rank == 0 && fl_nccl_unique_id(id) < 0) ok = 0;
#ifdef FLOWER_MPI
  if (g_size > 1) {
    desc d;
    desc_of(&d, D_NCCL_ID, 0, NULL);
    if (exchange(op, &d) < 0) return -1;
    int flag = ok;
    MPI_Bcast(&flag, 1, MPI_INT, 0, MPI_COMM_WORLD);
    if (!flag) return g_rank == 0 ? fl_fail_prefix(op) : fl_fail("%s: rank 0 could not make an NCCL id", op);
    MPI_Bcast(id, FL_NCCL_ID_BYTES, MPI_BYTE, 0, MPI_COMM_WORLD);
  }
#endif
  if (!ok) return fl_fail_prefix(op);
  if (fl_nccl_init(id, g_rank, g_size, dev) < 0) return fl_fail_prefix(op);
  return 0;
}
#endif

/* ------------------------------------------------------------------ the collectives */

/* A CUDA tensor in a build with NCCL: reduced through NCCL even by a job of one rank, so that a
 * single GPU runs (and tests) the same path as many. Host tensors of one rank need no call at all. */
static int via_nccl(const fl_tensor *t) { return fl_dist_has_nccl() && is_cuda(t); }

int fl_dist_barrier(void) {
  const char *op = "dist.barrier";
  if (need_init(op) < 0) return -1;
  if (g_size == 1) return 0;
#ifdef FLOWER_MPI
  double t0 = now();
  desc d;
  desc_of(&d, D_BARRIER, 0, NULL);
  int rc = exchange(op, &d);      /* an all-gather of every rank's descriptor is a barrier */
  return counted(t0, 0, rc);
#else
  return 0;
#endif
}

/* The data phase of an allreduce on a contiguous host tensor. */
#ifdef FLOWER_MPI
static int host_allreduce(const char *op, fl_tensor *c, fl_dist_op rop) {
  MPI_Datatype ty = mpi_type(c->dtype);
  char *p = fl_tensor_data(c);
  int64_t n = fl_tensor_numel(c);
  size_t es = fl_dtype_size(c->dtype);
  for (int64_t i = 0; i < n; i += CHUNK) {
    int k = (int)(n - i < CHUNK ? n - i : CHUNK);
    if (MPI_Allreduce(MPI_IN_PLACE, p + (size_t)i * es, k, ty, mpi_op(rop), MPI_COMM_WORLD) != MPI_SUCCESS)
      return fl_fail("%s: MPI_Allreduce failed on rank %d", op, g_rank);
  }
  return 0;
}
#endif

/* Runs the data phase of an allreduce on a contiguous tensor of either kind (already checked). */
static int reduce_contiguous(const char *op, fl_tensor *c, fl_dist_op rop) {
#if defined(FLOWER_CUDA) && defined(FLOWER_NCCL)
  if (is_cuda(c)) {
    if (nccl_ready(op, c) < 0) return -1;
    if (fl_nccl_allreduce(c, rop, now() + fl_dist_timeout()) < 0) { g_broken = 1; return fl_fail_prefix(op); }
    return 0;
  }
#endif
#ifdef FLOWER_MPI
  if (host_allreduce(op, c, rop) < 0) return -1;
  if (rop == FL_DIST_MEAN) return fl_unary_into(FL_AFFINE, c, c, 1.0 / g_size, 0.0);
  return 0;
#else
  (void)op; (void)c; (void)rop;
  return 0;
#endif
}

int fl_dist_allreduce(fl_tensor *t, fl_dist_op rop) {
  const char *op = "dist.allreduce";
  if (check_tensor(op, t) < 0 || check_reduce(op, t, rop) < 0) return -1;
  if (need_init(op) < 0) return -1;
  if (g_size == 1 && !via_nccl(t)) return 0;
  double t0 = now();
#ifdef FLOWER_MPI
  if (g_size > 1) {
    desc d;
    desc_of(&d, D_ALLREDUCE, rop, t);
    if (exchange(op, &d) < 0) return -1;
  }
#endif
  fl_tensor c = {0};
  int rc = fl_contiguous(&c, t);
  if (rc == 0) rc = reduce_contiguous(op, &c, rop);
  if (rc == 0 && c.storage != t->storage) rc = fl_copy_into(t, &c);
  fl_tensor_free(&c);
  return counted(t0, (double)fl_tensor_numel(t) * (double)fl_dtype_size(t->dtype), rc);
}

int fl_dist_broadcast(fl_tensor *t, int root) {
  const char *op = "dist.broadcast";
  if (check_tensor(op, t) < 0 || need_init(op) < 0) return -1;
  if (root < 0 || root >= g_size)
    return fl_fail("%s: root must be a rank 0..%d, got %d", op, g_size - 1, root);
  if (g_size == 1) return 0;
#ifdef FLOWER_MPI
  double t0 = now();
  desc d;
  desc_of(&d, D_BROADCAST, root, t);
  if (exchange(op, &d) < 0) return -1;
  fl_tensor c = {0};
  int rc = fl_contiguous(&c, t);
#if defined(FLOWER_CUDA) && defined(FLOWER_NCCL)
  if (rc == 0 && is_cuda(&c)) {
    rc = nccl_ready(op, &c);
    if (rc == 0 && fl_nccl_broadcast(&c, root, now() + fl_dist_timeout()) < 0) { g_broken = 1; rc = fl_fail_prefix(op); }
  } else
#endif
  if (rc == 0) {
    char *p = fl_tensor_data(&c);
    int64_t n = fl_tensor_numel(&c);
    size_t es = fl_dtype_size(c.dtype);
    for (int64_t i = 0; i < n && rc == 0; i += CHUNK) {
      int k = (int)(n - i < CHUNK ? n - i : CHUNK);
      if (MPI_Bcast(p + (size_t)i * es, k, mpi_type(c.dtype), root, MPI_COMM_WORLD) != MPI_SUCCESS)
        rc = fl_fail("%s: MPI_Bcast failed on rank %d", op, g_rank);
    }
  }
  if (rc == 0 && c.storage != t->storage) rc = fl_copy_into(t, &c);
  fl_tensor_free(&c);
  return counted(t0, (double)fl_tensor_numel(t) * (double)fl_dtype_size(t->dtype), rc);
#else
  return 0;
#endif
}

int fl_dist_all_gather(fl_tensor *out, const fl_tensor *t) {
  const char *op = "dist.all_gather";
  if (check_tensor(op, t) < 0 || need_init(op) < 0) return -1;
  if (t->ndim < 1) return fl_fail("%s: expected a tensor with at least one dim, got a 0-dim one", op);
  if (g_size == 1) return fl_clone(out, t);
#ifdef FLOWER_MPI
  double t0 = now();
  desc d;
  desc_of(&d, D_ALL_GATHER, 0, t);
  if (exchange(op, &d) < 0) return -1;
  int64_t shape[FL_MAXDIM], rows = 0, row_elems = 1;
  for (int r = 0; r < g_size; r++) rows += g_all[r].shape[0];
  for (int k = 1; k < t->ndim; k++) row_elems *= t->shape[k];
  memcpy(shape, t->shape, sizeof(int64_t) * (size_t)t->ndim);
  shape[0] = rows;
  if (rows * row_elems > (((int64_t)1 << 31) - 1) && !is_cuda(t))
    return fl_fail("%s: %lld elements in all is more than MPI_Allgatherv counts", op, (long long)(rows * row_elems));
  fl_tensor c = {0};
  int rc = fl_contiguous(&c, t);
  if (rc == 0) rc = fl_tensor_init(out, t->storage->backend, t->storage->device, t->dtype, t->ndim, shape);
#if defined(FLOWER_CUDA) && defined(FLOWER_NCCL)
  if (rc == 0 && is_cuda(&c)) {
    int64_t *counts = malloc(sizeof(int64_t) * (size_t)g_size);
    if (!counts) rc = fl_fail_oom("%s: out of memory", op);
    for (int r = 0; rc == 0 && r < g_size; r++) counts[r] = g_all[r].shape[0];
    if (rc == 0) rc = nccl_ready(op, &c);
    if (rc == 0 && fl_nccl_all_gather(out, &c, counts, now() + fl_dist_timeout()) < 0) { g_broken = 1; rc = fl_fail_prefix(op); }
    free(counts);
  } else
#endif
  if (rc == 0) {
    int *counts = malloc(sizeof(int) * 2 * (size_t)g_size);
    if (!counts) rc = fl_fail_oom("%s: out of memory", op);
    int64_t off = 0;
    for (int r = 0; rc == 0 && r < g_size; r++) {
      counts[r] = (int)(g_all[r].shape[0] * row_elems);
      counts[g_size + r] = (int)off;
      off += counts[r];
    }
    if (rc == 0 && MPI_Allgatherv(fl_tensor_data(&c), (int)fl_tensor_numel(&c), mpi_type(c.dtype), fl_tensor_data(out),
                                  counts, counts + g_size, mpi_type(c.dtype), MPI_COMM_WORLD) != MPI_SUCCESS)
      rc = fl_fail("%s: MPI_Allgatherv failed on rank %d", op, g_rank);
    free(counts);
  }
  fl_tensor_free(&c);
  if (rc < 0) fl_tensor_free(out);
  return counted(t0, 0, rc);
#else
  return 0;
#endif
}

int fl_dist_allreduce_doubles(double *v, int n, fl_dist_op rop) {
  const char *op = "dist.allreduce";
  if (n < 0 || (int)rop < 0 || rop >= FL_DIST_NOPS) return fl_fail("%s: bad arguments", op);
  if (need_init(op) < 0) return -1;
  if (g_size == 1) return 0;
#ifdef FLOWER_MPI
  double t0 = now();
  desc d;
  desc_of(&d, D_DOUBLES, rop, NULL);
  d.ndim = 1;
  d.shape[0] = n;
  if (exchange(op, &d) < 0) return -1;
  if (MPI_Allreduce(MPI_IN_PLACE, v, n, MPI_DOUBLE, mpi_op(rop), MPI_COMM_WORLD) != MPI_SUCCESS)
    return fl_fail("%s: MPI_Allreduce failed on rank %d", op, g_rank);
  if (rop == FL_DIST_MEAN) for (int i = 0; i < n; i++) v[i] /= g_size;
  return counted(t0, 0, 0);
#else
  (void)v;
  return 0;
#endif
}

/* A tensor reduced where it is rather than packed: one bigger than a bucket, or a contiguous host
 * tensor of 64K elements or more (MPI reads host memory in place, so packing it would only add two
 * passes over memory; small ones still share a bucket, one call for many). */
static int reduce_in_place(const fl_tensor *t, int64_t cap) {
  int64_t k = fl_tensor_numel(t);
  return k > cap || (!is_cuda(t) && fl_tensor_is_contiguous(t) && k >= ((int64_t)1 << 16));
}

/* Gradients: packed into flat buffers of about bucket_bytes on their device (scaled on the way in),
 * one reduction per bucket, copied back. The packing goes through the core's own copy and affine
 * kernels, so the same code serves host tensors (MPI) and CUDA ones (NCCL). */
int fl_dist_allreduce_many(int n, fl_tensor *const *ts, double scale, size_t bucket_bytes) {
  const char *op = "dist.allreduce_many";
  if (n < 0) return fl_fail("%s: negative count", op);
  if (n == 0) return need_init(op);
  int64_t total = 0;
  for (int i = 0; i < n; i++) {
    if (check_tensor(op, ts[i]) < 0) return -1;
    if (!fl_dtype_is_float(ts[i]->dtype) || ts[i]->dtype == FL_BF16)
      return fl_fail("%s: tensor %d is %s; gradients are float32 or float64", op, i + 1, fl_dtype_name(ts[i]->dtype));
    if (ts[i]->dtype != ts[0]->dtype || ts[i]->storage->backend != ts[0]->storage->backend ||
        ts[i]->storage->device != ts[0]->storage->device)
      return fl_fail("%s: tensor %d differs in dtype or device from tensor 1: all must share both", op, i + 1);
    total += fl_tensor_numel(ts[i]);
  }
  if (need_init(op) < 0) return -1;
  if (g_size == 1 && scale == 1.0 && !via_nccl(ts[0])) return 0;
  double t0 = now();
  int rc = 0;
#ifdef FLOWER_MPI
  if (g_size > 1) {
    desc d;
    desc_of(&d, D_ALLREDUCE_MANY, n, ts[0]);
    d.ndim = 1;
    d.shape[0] = total;
    if (exchange(op, &d) < 0) return -1;
  }
#endif
  size_t es = fl_dtype_size(ts[0]->dtype);
  int64_t cap = (int64_t)(bucket_bytes / es);
  if (cap < 1) cap = 1;
  if (cap > total) cap = total;
  fl_tensor flat = {0};
  if (fl_tensor_init(&flat, ts[0]->storage->backend, ts[0]->storage->device, ts[0]->dtype, 1, &cap) < 0)
    return fl_fail_prefix(op);
  for (int first = 0; first < n && rc == 0;) {
    if (reduce_in_place(ts[first], cap)) {   /* reduced through its own view */
      fl_tensor v = {0};
      fl_tensor_init_view(&v, ts[first]);
      if (!fl_tensor_is_contiguous(&v)) rc = fl_fail("%s: tensor %d is not contiguous", op, first + 1);
      if (rc == 0 && scale != 1.0) rc = fl_unary_into(FL_AFFINE, &v, &v, scale, 0.0);
      if (rc == 0 && (g_size > 1 || via_nccl(&v))) rc = reduce_contiguous(op, &v, FL_DIST_SUM);
      fl_tensor_free(&v);
      first++;
      continue;
    }
    /* tensors first..last-1 fill this bucket */
    int64_t used = 0;
    int last = first;
    while (last < n && !reduce_in_place(ts[last], cap) && used + fl_tensor_numel(ts[last]) <= cap)
      used += fl_tensor_numel(ts[last++]);
    fl_tensor part[2] = {{0}, {0}};
    int64_t off = 0;
    for (int i = first; i < last && rc == 0; i++) {   /* pack (and scale) */
      fl_tensor_init_view(&part[0], &flat);
      rc = fl_view_narrow(&part[0], 0, off, fl_tensor_numel(ts[i]));
      if (rc == 0) rc = fl_view_reshape(&part[0], ts[i]->ndim, ts[i]->shape);
      if (rc == 0) rc = scale == 1.0 ? fl_copy_into(&part[0], ts[i]) : fl_unary_into(FL_AFFINE, &part[0], ts[i], scale, 0.0);
      fl_tensor_free(&part[0]);
      off += fl_tensor_numel(ts[i]);
    }
    if (rc == 0 && (g_size > 1 || via_nccl(&flat))) {
      fl_tensor_init_view(&part[1], &flat);
      rc = fl_view_narrow(&part[1], 0, 0, used);
      if (rc == 0) rc = reduce_contiguous(op, &part[1], FL_DIST_SUM);
      fl_tensor_free(&part[1]);
    }
    off = 0;
    for (int i = first; i < last && rc == 0; i++) {   /* unpack */
      fl_tensor_init_view(&part[0], &flat);
      rc = fl_view_narrow(&part[0], 0, off, fl_tensor_numel(ts[i]));
      if (rc == 0) rc = fl_view_reshape(&part[0], ts[i]->ndim, ts[i]->shape);
      if (rc == 0) rc = fl_copy_into(ts[i], &part[0]);
      fl_tensor_free(&part[0]);
      off += fl_tensor_numel(ts[i]);
    }
    first = last;
  }
  fl_tensor_free(&flat);
  return counted(t0, (double)total * (double)es, rc);
}
