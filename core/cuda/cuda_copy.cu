/* Copies (device<->device, host<->device, strided, with dtype conversion) and fill.
 * A host side that is not a plain contiguous block goes through a contiguous host buffer handled by
 * the CPU backend's own copy (strides and dtypes exactly as the CPU does them); the device side
 * goes through a strided conversion kernel. */
#include "cuda_internal.h"

#include <mutex>
#include <stdlib.h>
#include <string.h>

/* ---------------------------------------------------------------- device kernels */

template <class D, class S> struct cvt_fn {
  D *o;
  const S *a;
  __device__ void operator()(const int64_t *off) const { o[off[0]] = cu_cvt<D, S>(a[off[1]]); }
};

template <class T> struct fill_fn {
  T *o;
  T v;
  __device__ void operator()(const int64_t *off) const { o[off[0]] = v; }
};

/* same device, shapes equal */
int cu_copy_dev(const char *op, fl_tensor *dst, const fl_tensor *src) {
  const fl_tensor *t[2] = {dst, src};
  if (dst->dtype == src->dtype && fl_tensor_is_contiguous(dst) && fl_tensor_is_contiguous(src)) {
    int64_t n = fl_tensor_numel(dst);
    if (n == 0 || cu_ptr(dst) == cu_ptr(src)) return 0;
    cu_dev *d;
    if (cu_enter(op, dst->storage->device, &d)) return -1;
    CU_TRY(op, cudaMemcpyAsync(cu_ptr(dst), cu_ptr(src), (size_t)n * fl_dtype_size(dst->dtype),
                               cudaMemcpyDeviceToDevice, d->stream));
    return 0;
  }
  return cu_visit(dst->dtype, [&](auto dt) {
    typedef typename decltype(dt)::type D;
    return cu_visit(src->dtype, [&](auto st) {
      typedef typename decltype(st)::type S;
      cvt_fn<D, S> f{(D *)cu_ptr(dst), (const S *)cu_ptr(src)};
      return cu_foreach<2>(op, t, f);
    });
  });
}

int cu_fill_dev(const char *op, fl_tensor *t, double v) {
  int64_t n = fl_tensor_numel(t);
  if (n == 0) return 0;
  /* zero of every dtype is all-zero bytes (+0.0 for floats, bfloat16 included) */
  if (v == 0 && !signbit(v) && fl_tensor_is_contiguous(t)) {
    cu_dev *d;
    if (cu_enter(op, t->storage->device, &d)) return -1;
    CU_TRY(op, cudaMemsetAsync(cu_ptr(t), 0, (size_t)n * fl_dtype_size(t->dtype), d->stream));
    return 0;
  }
  const fl_tensor *ts[1] = {t};
  return cu_visit(t->dtype, [&](auto tag) {
    typedef typename decltype(tag)::type T;
    fill_fn<T> f{(T *)cu_ptr(t), cu_from_double<T>(v)};
    return cu_foreach<1>(op, ts, f);
  });
}

/* out = alpha*out + beta*src (floats; same dtype; bfloat16 computed in float, rounded once) */
template <class T> struct axpby_fn {
  typedef cu_acc_t<T> A;
  T *o;
  const T *s;
  A alpha, beta;
  __device__ void operator()(const int64_t *off) const {
    /* alpha == 0 overwrites (NaN in out must not survive, as with GEMM's beta == 0) */
    A src = cu_load(s[off[1]]);
    o[off[0]] = cu_store<T>(alpha == (A)0 ? beta * src : alpha * cu_load(o[off[0]]) + beta * src);
  }
};

int cu_axpby(const char *op, fl_tensor *out, double alpha, const fl_tensor *src, double beta) {
  const fl_tensor *t[2] = {out, src};
  return cu_visit_act(op, out->dtype, [&](auto tag) {
    typedef typename decltype(tag)::type T;
    typedef cu_acc_t<T> A;
    axpby_fn<T> f{(T *)cu_ptr(out), (const T *)cu_ptr(src), (A)alpha, (A)beta};
    return cu_foreach<2>(op, t, f);
  });
}

/* ---------------------------------------------------------------- host <-> device */

/* A host tensor over `data` (a stack storage: not retained or released by anyone). */
static void host_view(fl_storage *st, fl_tensor *t, void *data, size_t nbytes, fl_dtype dt, int ndim,
                      const int64_t *shape) {
  memset(st, 0, sizeof *st);
  st->refcount = 1;
  st->data = data;
  st->nbytes = nbytes;
  st->backend = &fl_cpu_backend;
  memset(t, 0, sizeof *t);
  t->storage = st;
  t->ndim = ndim;
  t->dtype = dt;
  for (int i = 0; i < ndim; i++) t->shape[i] = shape[i];
  fl_contiguous_strides(ndim, t->shape, t->stride);
}

/* host src -> device dst */
static int copy_h2d(fl_tensor *dst, const fl_tensor *src) {
  const char *op = "cuda copy (host to device)";
  int64_t n = fl_tensor_numel(dst);
  if (n == 0) return 0;
  cu_dev *d;
  if (cu_enter(op, dst->storage->device, &d)) return -1;
  size_t snb = (size_t)n * fl_dtype_size(src->dtype);
  /* 1. the source as one contiguous host block in its own dtype */
  void *hbuf = NULL;
  const void *hsrc = fl_tensor_data(src);
  if (!fl_tensor_is_contiguous(src)) {
    hbuf = malloc(snb);
    if (!hbuf) return fl_fail_oom("%s: out of host memory (%zu bytes of staging)", op, snb);
    fl_storage hs;
    fl_tensor ht;
    host_view(&hs, &ht, hbuf, snb, src->dtype, src->ndim, src->shape);
    if (fl_cpu_backend.copy(&ht, src)) { free(hbuf); return -1; }
    hsrc = hbuf;
  }
  /* 2. straight into dst when it is contiguous of the same dtype, else into device staging and a
   * conversion kernel. Pageable host memory: cudaMemcpyAsync returns once the host buffer has been
   * staged by the driver, so freeing hbuf right after is safe. */
  int rc = 0;
  if (dst->dtype == src->dtype && fl_tensor_is_contiguous(dst)) {
    cudaError_t e = cudaMemcpyAsync(cu_ptr(dst), hsrc, snb, cudaMemcpyHostToDevice, d->stream);
    if (e != cudaSuccess) rc = cu_fail(op, "cudaMemcpyAsync", e);
  } else {
    cu_tmp tmp;
    if (tmp.init(op, dst->storage->device, src->dtype, dst->ndim, dst->shape)) {
      rc = -1;
    } else {
      cudaError_t e = cudaMemcpyAsync(tmp.buf.p, hsrc, snb, cudaMemcpyHostToDevice, d->stream);
      if (e != cudaSuccess) rc = cu_fail(op, "cudaMemcpyAsync", e);
      else rc = cu_copy_dev(op, dst, &tmp.t);
    }
  }
  free(hbuf);
  return rc;
}

/* device src -> host dst; waits for the stream (the caller reads the host memory next) */
static int copy_d2h(fl_tensor *dst, const fl_tensor *src) {
  const char *op = "cuda copy (device to host)";
  int64_t n = fl_tensor_numel(dst);
  if (n == 0) return 0;
  cu_dev *d;
  if (cu_enter(op, src->storage->device, &d)) return -1;
  size_t dnb = (size_t)n * fl_dtype_size(dst->dtype);
  /* 1. a contiguous device block in dst's dtype (src itself when it already is one) */
  cu_tmp tmp;
  const void *dsrc = cu_ptr(src);
  if (!(src->dtype == dst->dtype && fl_tensor_is_contiguous(src))) {
    if (tmp.init(op, src->storage->device, dst->dtype, src->ndim, src->shape)) return -1;
    if (cu_copy_dev(op, &tmp.t, src)) return -1;
    dsrc = tmp.buf.p;
  }
  /* 2. download into dst directly, or into host staging and a strided CPU copy */
  if (fl_tensor_is_contiguous(dst)) {
    CU_TRY(op, cudaMemcpyAsync(fl_tensor_data(dst), dsrc, dnb, cudaMemcpyDeviceToHost, d->stream));
    CU_TRY(op, cudaStreamSynchronize(d->stream));
    return 0;
  }
  void *hbuf = malloc(dnb);
  if (!hbuf) return fl_fail_oom("%s: out of host memory (%zu bytes of staging)", op, dnb);
  int rc = 0;
  cudaError_t e = cudaMemcpyAsync(hbuf, dsrc, dnb, cudaMemcpyDeviceToHost, d->stream);
  if (e == cudaSuccess) e = cudaStreamSynchronize(d->stream);
  if (e != cudaSuccess) {
    rc = cu_fail(op, "cudaMemcpyAsync", e);
  } else {
    fl_storage hs;
    fl_tensor ht;
    host_view(&hs, &ht, hbuf, dnb, dst->dtype, dst->ndim, dst->shape);
    rc = fl_cpu_backend.copy(dst, &ht);
  }
  free(hbuf);
  return rc;
}

/* device -> another device: through a contiguous block copied peer to peer */
static int copy_d2d_peer(fl_tensor *dst, const fl_tensor *src) {
  const char *op = "cuda copy (device to device)";
  int64_t n = fl_tensor_numel(dst);
  if (n == 0) return 0;
  int sd = src->storage->device, dd = dst->storage->device;
  cu_dev *ds, *dd_;
  if (cu_enter(op, dd, &dd_) || cu_enter(op, sd, &ds)) return -1;
  /* contiguous in dst's dtype on the source device */
  cu_tmp a;
  const void *p = cu_ptr(src);
  if (!(src->dtype == dst->dtype && fl_tensor_is_contiguous(src))) {
    if (a.init(op, sd, dst->dtype, src->ndim, src->shape) || cu_copy_dev(op, &a.t, src)) return -1;
    p = a.buf.p;
  }
  size_t nb = (size_t)n * fl_dtype_size(dst->dtype);
  /* the destination stream must not start before the source's work is done */
  CU_TRY(op, cudaStreamSynchronize(ds->stream));
  if (fl_tensor_is_contiguous(dst)) {
    CU_TRY(op, cudaMemcpyPeerAsync(cu_ptr(dst), dd, p, sd, nb, dd_->stream));
    CU_TRY(op, cudaStreamSynchronize(dd_->stream));   /* keeps `a` alive until the copy is done */
    return 0;
  }
  cu_tmp b;
  if (b.init(op, dd, dst->dtype, dst->ndim, dst->shape)) return -1;
  CU_TRY(op, cudaMemcpyPeerAsync(b.buf.p, dd, p, sd, nb, dd_->stream));
  if (cu_copy_dev(op, dst, &b.t)) return -1;
  CU_TRY(op, cudaStreamSynchronize(dd_->stream));
  return 0;
}

int cu_backend_copy(fl_tensor *dst, const fl_tensor *src) {
  int dd = cu_is_dev(dst), sd = cu_is_dev(src);
  if (!fl_tensor_same_shape(dst, src)) {
    char a[200], b[200];
    fl_shape_str(a, sizeof a, dst->ndim, dst->shape);
    fl_shape_str(b, sizeof b, src->ndim, src->shape);
    return fl_fail("cuda copy: destination %s and source %s differ in shape", a, b);
  }
  if (dd && sd) {
    if (dst->storage->device != src->storage->device) return copy_d2d_peer(dst, src);
    return cu_copy_dev("cuda copy", dst, src);
  }
  if (dd && src->storage->backend == &fl_cpu_backend) return copy_h2d(dst, src);
  if (sd && dst->storage->backend == &fl_cpu_backend) return copy_d2h(dst, src);
  return fl_fail("cuda copy: cannot copy from %s to %s", src->storage->backend->name, dst->storage->backend->name);
}

/* ---------------------------------------------------------------- asynchronous host -> device */

/* Per device: a copy stream and a ring of CU_RING landing buffers on the device. A batch goes
 *   host block --(copy stream)--> landing[j] --(compute stream, after waiting for the copy)--> dst
 * so the host never waits, the compute stream waits (on the device) only for its own batch's copy,
 * and the copy stream waits only for the device copy that last read landing[j], CU_RING batches
 * ago -- not for the compute queued meanwhile, so a batch's copy overlaps the previous step's
 * backward pass. Writing dst directly on the copy stream would not be safe: dst comes from the
 * caching allocator, whose free blocks may still be used by kernels queued on the compute stream
 * (stream order is what makes reusing them safe). The extra device copy costs microseconds. */
#define CU_RING 3

struct cu_landing {
  void *buf;
  size_t cap;
  cudaEvent_t copied;      /* recorded on the copy stream after the upload into buf */
  cudaEvent_t consumed;    /* recorded on the compute stream after buf was copied into dst */
};

struct cu_copier {
  std::mutex lock;
  int ready;
  cudaStream_t stream;
  cu_landing ring[CU_RING];
  int next;
};

static cu_copier copiers[CU_MAXDEV];

/* caller holds c->lock and has entered d */
static int copier_init(const char *op, cu_copier *c) {
  if (c->ready) return 0;
  CU_TRY(op, cudaStreamCreateWithFlags(&c->stream, cudaStreamNonBlocking));
  for (int j = 0; j < CU_RING; j++) {
    CU_TRY(op, cudaEventCreateWithFlags(&c->ring[j].copied, cudaEventDisableTiming));
    CU_TRY(op, cudaEventCreateWithFlags(&c->ring[j].consumed, cudaEventDisableTiming));
  }
  c->ready = 1;
  return 0;
}

int cu_backend_copy_async(fl_tensor *dst, const fl_tensor *src) {
  const char *op = "cuda copy_async (host to device)";
  /* only the plain case is asynchronous; the rest is the ordinary copy */
  if (!(cu_is_dev(dst) && src->storage && src->storage->backend == &fl_cpu_backend && dst->dtype == src->dtype &&
        fl_tensor_same_shape(dst, src) && fl_tensor_is_contiguous(dst) && fl_tensor_is_contiguous(src)))
    return cu_backend_copy(dst, src);
  int64_t n = fl_tensor_numel(dst);
  if (n == 0) return 0;
  size_t nb = (size_t)n * fl_dtype_size(dst->dtype);
  cu_dev *d;
  if (cu_enter(op, dst->storage->device, &d)) return -1;
  cu_copier *c = &copiers[d->index];
  std::lock_guard<std::mutex> g(c->lock);
  if (copier_init(op, c)) return -1;
  cu_landing *l = &c->ring[c->next];
  c->next = (c->next + 1) % CU_RING;
  if (l->cap < nb) {
    /* the old buffer was last read on the compute stream: back to the cache in stream order */
    if (l->buf) cu_free(d->index, l->buf);
    l->buf = cu_malloc(op, d->index, nb);
    l->cap = l->buf ? nb : 0;
    if (!l->buf) return -1;
    /* a block from the cache may still be used by kernels queued on the compute stream: this once,
     * the copy stream waits for them */
    CU_TRY(op, cudaEventRecord(l->consumed, d->stream));
  }
  CU_TRY(op, cudaStreamWaitEvent(c->stream, l->consumed, 0));
  CU_TRY(op, cudaMemcpyAsync(l->buf, fl_tensor_data(src), nb, cudaMemcpyHostToDevice, c->stream));
  /* a page-locked source is read after we return: its block remembers this copy (host_wait).
   * A pageable one has been staged by the driver before cudaMemcpyAsync returned. */
  int known;
  if (cu_host_record(op, src->storage->data, d, c->stream, &known)) return -1;
  CU_TRY(op, cudaEventRecord(l->copied, c->stream));
  CU_TRY(op, cudaStreamWaitEvent(d->stream, l->copied, 0));
  CU_TRY(op, cudaMemcpyAsync(cu_ptr(dst), l->buf, nb, cudaMemcpyDeviceToDevice, d->stream));
  CU_TRY(op, cudaEventRecord(l->consumed, d->stream));
  return 0;
}

int cu_async_release(int device) {
  const char *op = "cuda.empty_cache";
  if (device < 0 || device >= CU_MAXDEV) return 0;
  cu_copier *c = &copiers[device];
  std::lock_guard<std::mutex> g(c->lock);
  if (!c->ready) return 0;
  cu_dev *d;
  if (cu_enter(op, device, &d)) return -1;
  CU_TRY(op, cudaStreamSynchronize(c->stream));
  for (int j = 0; j < CU_RING; j++) {
    cu_landing *l = &c->ring[j];
    if (l->buf) cu_free(device, l->buf);   /* the caller waits for the compute stream next */
    l->buf = NULL;
    l->cap = 0;
  }
  return 0;
}

int cu_backend_fill(fl_tensor *t, double value) { return cu_fill_dev("cuda fill", t, value); }
