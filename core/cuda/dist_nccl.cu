/* NCCL collectives on CUDA tensors for core/dist.c (contract in dist_nccl.h). Without nccl.h at
 * build time (FLOWER_NCCL undefined) every call fails with a message saying so. */
#include "cuda_internal.h"
#include "dist_nccl.h"

#include <time.h>

#ifdef FLOWER_NCCL
#include <nccl.h>

static ncclComm_t g_comm;
static int g_dev = -1;

static double mono_now(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static int nccl_fail(const char *op, const char *what, ncclResult_t r) {
  return fl_fail("%s: %s failed: %s (%s)", op, what, ncclGetErrorString(r), ncclGetLastError(g_comm));
}

#define NCCL_TRY(op, call) do { ncclResult_t r_ = (call); if (r_ != ncclSuccess) return nccl_fail(op, #call, r_); } while (0)

static int nccl_type(fl_dtype dt, ncclDataType_t *out) {
  switch (dt) {
  case FL_F32: *out = ncclFloat32; return 0;
  case FL_F64: *out = ncclFloat64; return 0;
  case FL_I32: *out = ncclInt32; return 0;
  case FL_I64: *out = ncclInt64; return 0;
  case FL_U8: *out = ncclUint8; return 0;
  case FL_BF16: *out = ncclBfloat16; return 0;
  default: return -1;
  }
}

/* Waits for the queued collective: the stream done, or an asynchronous NCCL error, or the deadline
 * (then the communicator is aborted: a peer that died would otherwise keep the kernel spinning). */
static int nccl_wait(const char *op, cu_dev *d, double deadline) {
  long nap_ns = 10000;
  double t0 = mono_now();
  for (;;) {
    cudaError_t e = cudaStreamQuery(d->stream);
    if (e == cudaSuccess) return 0;
    if (e != cudaErrorNotReady) return cu_fail(op, "cudaStreamQuery", e);
    ncclResult_t async;
    if (ncclCommGetAsyncError(g_comm, &async) == ncclSuccess && async != ncclSuccess && async != ncclInProgress) {
      ncclCommAbort(g_comm);
      g_comm = NULL;
      return nccl_fail(op, "the communicator (asynchronous error)", async);
    }
    double t = mono_now();
    if (t > deadline) {
      ncclCommAbort(g_comm);
      g_comm = NULL;
      return fl_fail("%s: the NCCL collective did not finish within %.0f s (a peer died or hangs); "
                     "communicator aborted", op, t - t0);
    }
    if (t - t0 > 1e-3) {
      struct timespec ts = {0, nap_ns};
      nanosleep(&ts, NULL);
      if (nap_ns < 1000000) nap_ns *= 2;
    }
  }
}

int fl_nccl_unique_id(void *id) {
  static_assert(sizeof(ncclUniqueId) <= FL_NCCL_ID_BYTES, "NCCL id larger than FL_NCCL_ID_BYTES");
  ncclUniqueId u;
  NCCL_TRY("nccl", ncclGetUniqueId(&u));
  memcpy(id, &u, sizeof u);
  return 0;
}

int fl_nccl_init(const void *id, int rank, int size, int device) {
  cu_dev *d;
  if (cu_enter("nccl init", device, &d)) return -1;
  ncclUniqueId u;
  memcpy(&u, id, sizeof u);
  NCCL_TRY("nccl init", ncclCommInitRank(&g_comm, size, u, rank));
  g_dev = device;
  return 0;
}

int fl_nccl_ready(void) { return g_comm != NULL; }
int fl_nccl_device(void) { return g_comm ? g_dev : -1; }

static int nccl_enter(const char *op, const fl_tensor *t, cu_dev **d, ncclDataType_t *ty) {
  if (!g_comm) return fl_fail("%s: no NCCL communicator (aborted after an earlier failure?)", op);
  if (nccl_type(t->dtype, ty) < 0) return fl_fail("%s: no NCCL type for %s", op, fl_dtype_name(t->dtype));
  return cu_enter(op, g_dev, d);
}

int fl_nccl_allreduce(fl_tensor *t, fl_dist_op rop, double deadline) {
  const char *op = "nccl allreduce";
  cu_dev *d;
  ncclDataType_t ty;
  if (nccl_enter(op, t, &d, &ty)) return -1;
  ncclRedOp_t r = rop == FL_DIST_MEAN ? ncclAvg : rop == FL_DIST_MAX ? ncclMax : rop == FL_DIST_MIN ? ncclMin : ncclSum;
  void *p = fl_tensor_data(t);
  NCCL_TRY(op, ncclAllReduce(p, p, (size_t)fl_tensor_numel(t), ty, r, g_comm, d->stream));
  return nccl_wait(op, d, deadline);
}

int fl_nccl_broadcast(fl_tensor *t, int root, double deadline) {
  const char *op = "nccl broadcast";
  cu_dev *d;
  ncclDataType_t ty;
  if (nccl_enter(op, t, &d, &ty)) return -1;
  void *p = fl_tensor_data(t);
  NCCL_TRY(op, ncclBroadcast(p, p, (size_t)fl_tensor_numel(t), ty, root, g_comm, d->stream));
  return nccl_wait(op, d, deadline);
}

/* NCCL has no all-gather with different counts per rank: one broadcast per rank, grouped. */
int fl_nccl_all_gather(fl_tensor *out, const fl_tensor *t, const int64_t *rows, double deadline) {
  const char *op = "nccl all_gather";
  cu_dev *d;
  ncclDataType_t ty;
  if (nccl_enter(op, t, &d, &ty)) return -1;
  int size, rank;
  NCCL_TRY(op, ncclCommCount(g_comm, &size));
  NCCL_TRY(op, ncclCommUserRank(g_comm, &rank));
  int64_t row = 1;
  for (int k = 1; k < t->ndim; k++) row *= t->shape[k];
  size_t es = fl_dtype_size(t->dtype);
  char *dst = (char *)fl_tensor_data(out);
  NCCL_TRY(op, ncclGroupStart());
  int64_t off = 0;
  for (int r = 0; r < size; r++) {
    size_t count = (size_t)(rows[r] * row);
    const void *src = r == rank ? fl_tensor_data(t) : dst + off * es;
    ncclResult_t res = ncclBroadcast(src, dst + off * es, count, ty, r, g_comm, d->stream);
    if (res != ncclSuccess) { ncclGroupEnd(); return nccl_fail(op, "ncclBroadcast", res); }
    off += (int64_t)count;
  }
  NCCL_TRY(op, ncclGroupEnd());
  return nccl_wait(op, d, deadline);
}

void fl_nccl_finalize(int abort) {
  if (!g_comm) return;
  if (abort) ncclCommAbort(g_comm);
  else ncclCommDestroy(g_comm);
  g_comm = NULL;
}

#else  /* no NCCL in this build */

static int no_nccl(const char *op) {
  return fl_fail("%s: this build has no NCCL (nccl.h was not found under CUDA_HOME); CUDA tensors "
                 "cannot take part in collectives", op);
}
int fl_nccl_unique_id(void *id) { (void)id; return no_nccl("nccl"); }
int fl_nccl_init(const void *id, int rank, int size, int device) {
  (void)id; (void)rank; (void)size; (void)device;
  return no_nccl("nccl init");
}
int fl_nccl_ready(void) { return 0; }
int fl_nccl_device(void) { return -1; }
int fl_nccl_allreduce(fl_tensor *t, fl_dist_op rop, double deadline) {
  (void)t; (void)rop; (void)deadline;
  return no_nccl("nccl allreduce");
}
int fl_nccl_broadcast(fl_tensor *t, int root, double deadline) {
  (void)t; (void)root; (void)deadline;
  return no_nccl("nccl broadcast");
}
int fl_nccl_all_gather(fl_tensor *out, const fl_tensor *t, const int64_t *rows, double deadline) {
  (void)out; (void)t; (void)rows; (void)deadline;
  return no_nccl("nccl all_gather");
}
void fl_nccl_finalize(int abort) { (void)abort; }

#endif
