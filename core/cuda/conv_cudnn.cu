/* Convolutions through cuDNN's v9 graph ("backend") API: forward, backward-data and backward-filter
 * of NHWC activations with KRSC filters (K output channels, R x S window, C/groups input channels,
 * C fastest), grouped convolution for depthwise. nn_conv.cu turns Keras's HWIO / (KH,KW,C,M)
 * kernels into KRSC and back.
 *
 * Each distinct call (direction, dtype, shapes, window, groups, pointer alignment, TF32 and
 * determinism settings) builds an operation graph once, asks cuDNN's heuristics for engine
 * configurations, and keeps the first execution plan that finalizes -- or, in benchmark mode, the
 * fastest of the first few, timed on the call's own buffers. Plans are cached for the process.
 * Engines that would change the precision against the settings are skipped: for float32, tensor-core
 * engines (TF32) unless TF32 is allowed, and always engines that down-convert inputs.
 * If no engine accepts the problem (float64 on some versions, unusual windows), a direct kernel
 * written here computes it (slow, but correct); fl_cuda_conv_stats counts those calls.
 * bfloat16: bfloat16 tensors with float compute (the convolution descriptor's compute type), and
 * engines that reduce in lower precision than float are skipped, so the only rounding is of the
 * output, as on the CPU (float32 convolution, rounded once). */
#include "cuda_internal.h"

#include <mutex>
#include <string>
#include <unordered_map>
#include <vector>
#include <string.h>

enum { CONV_FWD, CONV_BWD_DATA, CONV_BWD_FILTER };

/* ---------------------------------------------------------------- the problem */

typedef struct {
  int kind, dev, dtype, groups, tf32, det;
  int64_t n, h, w, c;          /* x (N,H,W,C) */
  int64_t k, r, s;             /* filter (K,R,S,C/groups) */
  int64_t oh, ow;              /* y (N,OH,OW,K) */
  int64_t sh, sw, dh, dw, pt, pb, pl, pr;
  int64_t align_x, align_w, align_y;
} conv_key;

typedef struct {
  cudnnBackendDescriptor_t plan;                 /* NULL: no engine, use the direct kernel */
  std::vector<cudnnBackendDescriptor_t> owned;   /* everything the plan was built from */
  int64_t workspace;
} conv_plan;

static std::mutex plan_lock;
static std::unordered_map<std::string, conv_plan *> *plans;   /* never freed: see pool_of */
static int n_fallback_calls;

extern "C" int fl_cuda_conv_plan_count(void) {
  std::lock_guard<std::mutex> g(plan_lock);
  return plans ? (int)plans->size() : 0;
}

extern "C" int fl_cuda_conv_fallback_count(void) { return n_fallback_calls; }

extern "C" int64_t fl_cuda_conv_max_workspace(void) {
  std::lock_guard<std::mutex> g(plan_lock);
  int64_t m = 0;
  if (plans)
    for (auto &kv : *plans)
      if (kv.second->workspace > m) m = kv.second->workspace;
  return m;
}

static int64_t ptr_align(const void *p) {
  uintptr_t a = (uintptr_t)p;
  int64_t al = 16;
  while (al > 1 && (a % (uintptr_t)al)) al >>= 1;
  return al;
}

/* ---------------------------------------------------------------- descriptors */

/* A small owner of backend descriptors: everything created through it is destroyed with it unless
 * handed over with release(). */
struct desc_set {
  std::vector<cudnnBackendDescriptor_t> v;
  ~desc_set() { for (auto d : v) cudnnBackendDestroyDescriptor(d); }
  int make(const char *op, cudnnBackendDescriptorType_t type, cudnnBackendDescriptor_t *out) {
    cudnnStatus_t s = cudnnBackendCreateDescriptor(type, out);
    if (s != CUDNN_STATUS_SUCCESS) return cu_fail_dnn(op, "cudnnBackendCreateDescriptor", s);
    v.push_back(*out);
    return 0;
  }
};

#define SET(op, d, name, type, n, ptr) CUDNN_TRY(op, cudnnBackendSetAttribute(d, name, type, n, ptr))

static int make_tensor(const char *op, desc_set &ds, cudnnBackendDescriptor_t *t, int64_t uid,
                       cudnnDataType_t dt, const int64_t dims[4], const int64_t strides[4], int64_t align) {
  if (ds.make(op, CUDNN_BACKEND_TENSOR_DESCRIPTOR, t)) return -1;
  SET(op, *t, CUDNN_ATTR_TENSOR_DATA_TYPE, CUDNN_TYPE_DATA_TYPE, 1, &dt);
  SET(op, *t, CUDNN_ATTR_TENSOR_DIMENSIONS, CUDNN_TYPE_INT64, 4, dims);
  SET(op, *t, CUDNN_ATTR_TENSOR_STRIDES, CUDNN_TYPE_INT64, 4, strides);
  SET(op, *t, CUDNN_ATTR_TENSOR_UNIQUE_ID, CUDNN_TYPE_INT64, 1, &uid);
  SET(op, *t, CUDNN_ATTR_TENSOR_BYTE_ALIGNMENT, CUDNN_TYPE_INT64, 1, &align);
  CUDNN_TRY(op, cudnnBackendFinalize(*t));
  return 0;
}

enum { UID_X = 1, UID_W = 2, UID_Y = 3 };

/* Builds the operation graph of key `k`. */
static int make_graph(const char *op, cudnnHandle_t h, const conv_key *k, desc_set &ds,
                      cudnnBackendDescriptor_t *graph) {
  cudnnDataType_t dt = k->dtype == FL_F64 ? CUDNN_DATA_DOUBLE
                     : k->dtype == FL_BF16 ? CUDNN_DATA_BFLOAT16 : CUDNN_DATA_FLOAT;
  /* the arithmetic: the data's own type, float for bfloat16 */
  cudnnDataType_t ct = k->dtype == FL_BF16 ? CUDNN_DATA_FLOAT : dt;
  int64_t cg = k->c / k->groups;
  /* logical NCHW dims with NHWC strides; the filter KCRS with KRSC strides */
  int64_t xd[4] = {k->n, k->c, k->h, k->w}, xs[4] = {k->h * k->w * k->c, 1, k->w * k->c, k->c};
  int64_t wd[4] = {k->k, cg, k->r, k->s}, wst[4] = {k->r * k->s * cg, 1, k->s * cg, cg};
  int64_t yd[4] = {k->n, k->k, k->oh, k->ow}, ys[4] = {k->oh * k->ow * k->k, 1, k->ow * k->k, k->k};
  cudnnBackendDescriptor_t tx, tw, ty, conv, opd;
  if (make_tensor(op, ds, &tx, UID_X, dt, xd, xs, k->align_x) ||
      make_tensor(op, ds, &tw, UID_W, dt, wd, wst, k->align_w) ||
      make_tensor(op, ds, &ty, UID_Y, dt, yd, ys, k->align_y))
    return -1;

  if (ds.make(op, CUDNN_BACKEND_CONVOLUTION_DESCRIPTOR, &conv)) return -1;
  int64_t nsp = 2;
  int64_t dil[2] = {k->dh, k->dw}, str[2] = {k->sh, k->sw}, pre[2] = {k->pt, k->pl}, post[2] = {k->pb, k->pr};
  cudnnConvolutionMode_t mode = CUDNN_CROSS_CORRELATION;
  SET(op, conv, CUDNN_ATTR_CONVOLUTION_COMP_TYPE, CUDNN_TYPE_DATA_TYPE, 1, &ct);
  SET(op, conv, CUDNN_ATTR_CONVOLUTION_CONV_MODE, CUDNN_TYPE_CONVOLUTION_MODE, 1, &mode);
  SET(op, conv, CUDNN_ATTR_CONVOLUTION_SPATIAL_DIMS, CUDNN_TYPE_INT64, 1, &nsp);
  SET(op, conv, CUDNN_ATTR_CONVOLUTION_DILATIONS, CUDNN_TYPE_INT64, 2, dil);
  SET(op, conv, CUDNN_ATTR_CONVOLUTION_FILTER_STRIDES, CUDNN_TYPE_INT64, 2, str);
  SET(op, conv, CUDNN_ATTR_CONVOLUTION_PRE_PADDINGS, CUDNN_TYPE_INT64, 2, pre);
  SET(op, conv, CUDNN_ATTR_CONVOLUTION_POST_PADDINGS, CUDNN_TYPE_INT64, 2, post);
  CUDNN_TRY(op, cudnnBackendFinalize(conv));

  /* alpha/beta: double for float64, float otherwise (bfloat16 included: the compute type's) */
  float af = 1, bf = 0;
  double ad = 1, bd = 0;
  cudnnBackendAttributeType_t st = k->dtype == FL_F64 ? CUDNN_TYPE_DOUBLE : CUDNN_TYPE_FLOAT;
  const void *alpha = k->dtype == FL_F64 ? (const void *)&ad : (const void *)&af;
  const void *beta = k->dtype == FL_F64 ? (const void *)&bd : (const void *)&bf;
  if (k->kind == CONV_FWD) {
    if (ds.make(op, CUDNN_BACKEND_OPERATION_CONVOLUTION_FORWARD_DESCRIPTOR, &opd)) return -1;
    SET(op, opd, CUDNN_ATTR_OPERATION_CONVOLUTION_FORWARD_X, CUDNN_TYPE_BACKEND_DESCRIPTOR, 1, &tx);
    SET(op, opd, CUDNN_ATTR_OPERATION_CONVOLUTION_FORWARD_W, CUDNN_TYPE_BACKEND_DESCRIPTOR, 1, &tw);
    SET(op, opd, CUDNN_ATTR_OPERATION_CONVOLUTION_FORWARD_Y, CUDNN_TYPE_BACKEND_DESCRIPTOR, 1, &ty);
    SET(op, opd, CUDNN_ATTR_OPERATION_CONVOLUTION_FORWARD_CONV_DESC, CUDNN_TYPE_BACKEND_DESCRIPTOR, 1, &conv);
    SET(op, opd, CUDNN_ATTR_OPERATION_CONVOLUTION_FORWARD_ALPHA, st, 1, alpha);
    SET(op, opd, CUDNN_ATTR_OPERATION_CONVOLUTION_FORWARD_BETA, st, 1, beta);
  } else if (k->kind == CONV_BWD_DATA) {
    if (ds.make(op, CUDNN_BACKEND_OPERATION_CONVOLUTION_BACKWARD_DATA_DESCRIPTOR, &opd)) return -1;
    SET(op, opd, CUDNN_ATTR_OPERATION_CONVOLUTION_BWD_DATA_DX, CUDNN_TYPE_BACKEND_DESCRIPTOR, 1, &tx);
    SET(op, opd, CUDNN_ATTR_OPERATION_CONVOLUTION_BWD_DATA_W, CUDNN_TYPE_BACKEND_DESCRIPTOR, 1, &tw);
    SET(op, opd, CUDNN_ATTR_OPERATION_CONVOLUTION_BWD_DATA_DY, CUDNN_TYPE_BACKEND_DESCRIPTOR, 1, &ty);
    SET(op, opd, CUDNN_ATTR_OPERATION_CONVOLUTION_BWD_DATA_CONV_DESC, CUDNN_TYPE_BACKEND_DESCRIPTOR, 1, &conv);
    SET(op, opd, CUDNN_ATTR_OPERATION_CONVOLUTION_BWD_DATA_ALPHA, st, 1, alpha);
    SET(op, opd, CUDNN_ATTR_OPERATION_CONVOLUTION_BWD_DATA_BETA, st, 1, beta);
  } else {
    if (ds.make(op, CUDNN_BACKEND_OPERATION_CONVOLUTION_BACKWARD_FILTER_DESCRIPTOR, &opd)) return -1;
    SET(op, opd, CUDNN_ATTR_OPERATION_CONVOLUTION_BWD_FILTER_X, CUDNN_TYPE_BACKEND_DESCRIPTOR, 1, &tx);
    SET(op, opd, CUDNN_ATTR_OPERATION_CONVOLUTION_BWD_FILTER_DW, CUDNN_TYPE_BACKEND_DESCRIPTOR, 1, &tw);
    SET(op, opd, CUDNN_ATTR_OPERATION_CONVOLUTION_BWD_FILTER_DY, CUDNN_TYPE_BACKEND_DESCRIPTOR, 1, &ty);
    SET(op, opd, CUDNN_ATTR_OPERATION_CONVOLUTION_BWD_FILTER_CONV_DESC, CUDNN_TYPE_BACKEND_DESCRIPTOR, 1, &conv);
    SET(op, opd, CUDNN_ATTR_OPERATION_CONVOLUTION_BWD_FILTER_ALPHA, st, 1, alpha);
    SET(op, opd, CUDNN_ATTR_OPERATION_CONVOLUTION_BWD_FILTER_BETA, st, 1, beta);
  }
  CUDNN_TRY(op, cudnnBackendFinalize(opd));

  if (ds.make(op, CUDNN_BACKEND_OPERATIONGRAPH_DESCRIPTOR, graph)) return -1;
  SET(op, *graph, CUDNN_ATTR_OPERATIONGRAPH_OPS, CUDNN_TYPE_BACKEND_DESCRIPTOR, 1, &opd);
  SET(op, *graph, CUDNN_ATTR_OPERATIONGRAPH_HANDLE, CUDNN_TYPE_HANDLE, 1, &h);
  CUDNN_TRY(op, cudnnBackendFinalize(*graph));
  return 0;
}

/* 1 if the engine configuration may be used under the current precision/determinism settings */
static int engine_allowed(const conv_key *k, cudnnBackendDescriptor_t cfg) {
  cudnnBackendDescriptor_t eng;
  if (cudnnBackendCreateDescriptor(CUDNN_BACKEND_ENGINE_DESCRIPTOR, &eng) != CUDNN_STATUS_SUCCESS) return 0;
  int ok = 1;
  int64_t n = 0;
  cudnnBackendNumericalNote_t notes[CUDNN_NUMERICAL_NOTE_TYPE_COUNT];
  if (cudnnBackendGetAttribute(cfg, CUDNN_ATTR_ENGINECFG_ENGINE, CUDNN_TYPE_BACKEND_DESCRIPTOR, 1, &n, &eng) ==
          CUDNN_STATUS_SUCCESS &&
      cudnnBackendGetAttribute(eng, CUDNN_ATTR_ENGINE_NUMERICAL_NOTE, CUDNN_TYPE_NUMERICAL_NOTE,
                               CUDNN_NUMERICAL_NOTE_TYPE_COUNT, &n, notes) == CUDNN_STATUS_SUCCESS) {
    for (int64_t i = 0; i < n; i++) {
      if (notes[i] == CUDNN_NUMERICAL_NOTE_DOWN_CONVERT_INPUTS) ok = 0;
      if (notes[i] == CUDNN_NUMERICAL_NOTE_TENSOR_CORE && k->dtype == FL_F32 && !k->tf32) ok = 0;
      /* bfloat16 promises float accumulation (tensor cores are what it is for: allowed) */
      if (notes[i] == CUDNN_NUMERICAL_NOTE_REDUCED_PRECISION_REDUCTION && k->dtype == FL_BF16) ok = 0;
      if (notes[i] == CUDNN_NUMERICAL_NOTE_NONDETERMINISTIC && k->det) ok = 0;
    }
  } else {
    ok = 0;   /* cannot tell what it does: do not use it */
  }
  cudnnBackendDestroyDescriptor(eng);
  return ok;
}

/* Candidate execution plans for the graph, in the heuristics' order (at most `want`). */
static int make_plans(const char *op, cudnnHandle_t h, const conv_key *k, cudnnBackendDescriptor_t graph,
                      cudnnBackendHeurMode_t mode, int want, desc_set &ds,
                      std::vector<cudnnBackendDescriptor_t> &out) {
  cudnnBackendDescriptor_t heur;
  if (ds.make(op, CUDNN_BACKEND_ENGINEHEUR_DESCRIPTOR, &heur)) return -1;
  SET(op, heur, CUDNN_ATTR_ENGINEHEUR_OPERATION_GRAPH, CUDNN_TYPE_BACKEND_DESCRIPTOR, 1, &graph);
  SET(op, heur, CUDNN_ATTR_ENGINEHEUR_MODE, CUDNN_TYPE_HEUR_MODE, 1, &mode);
  if (cudnnBackendFinalize(heur) != CUDNN_STATUS_SUCCESS) return 0;   /* no results in this mode */
  int64_t count = 0;
  CUDNN_TRY(op, cudnnBackendGetAttribute(heur, CUDNN_ATTR_ENGINEHEUR_RESULTS, CUDNN_TYPE_BACKEND_DESCRIPTOR, 0,
                                         &count, NULL));
  if (count <= 0) return 0;
  std::vector<cudnnBackendDescriptor_t> cfgs((size_t)count);
  for (int64_t i = 0; i < count; i++)
    if (ds.make(op, CUDNN_BACKEND_ENGINECFG_DESCRIPTOR, &cfgs[(size_t)i])) return -1;
  int64_t got = 0;
  CUDNN_TRY(op, cudnnBackendGetAttribute(heur, CUDNN_ATTR_ENGINEHEUR_RESULTS, CUDNN_TYPE_BACKEND_DESCRIPTOR,
                                         count, &got, cfgs.data()));
  for (int64_t i = 0; i < got && (int)out.size() < want; i++) {
    if (!engine_allowed(k, cfgs[(size_t)i])) continue;
    cudnnBackendDescriptor_t plan;
    if (ds.make(op, CUDNN_BACKEND_EXECUTION_PLAN_DESCRIPTOR, &plan)) return -1;
    if (cudnnBackendSetAttribute(plan, CUDNN_ATTR_EXECUTION_PLAN_ENGINE_CONFIG, CUDNN_TYPE_BACKEND_DESCRIPTOR, 1,
                                 &cfgs[(size_t)i]) != CUDNN_STATUS_SUCCESS ||
        cudnnBackendSetAttribute(plan, CUDNN_ATTR_EXECUTION_PLAN_HANDLE, CUDNN_TYPE_HANDLE, 1, &h) !=
            CUDNN_STATUS_SUCCESS ||
        cudnnBackendFinalize(plan) != CUDNN_STATUS_SUCCESS)
      continue;   /* this engine does not support the problem after all */
    out.push_back(plan);
  }
  return 0;
}

static int64_t plan_workspace(cudnnBackendDescriptor_t plan) {
  int64_t ws = 0, n = 0;
  if (cudnnBackendGetAttribute(plan, CUDNN_ATTR_EXECUTION_PLAN_WORKSPACE_SIZE, CUDNN_TYPE_INT64, 1, &n, &ws) !=
      CUDNN_STATUS_SUCCESS)
    return -1;
  return ws;
}

static int execute(const char *op, cudnnHandle_t h, cudnnBackendDescriptor_t plan, void *x, void *w, void *y,
                   void *ws) {
  cudnnBackendDescriptor_t vp;
  CUDNN_TRY(op, cudnnBackendCreateDescriptor(CUDNN_BACKEND_VARIANT_PACK_DESCRIPTOR, &vp));
  int64_t uids[3] = {UID_X, UID_W, UID_Y};
  void *ptrs[3] = {x, w, y};
  cudnnStatus_t s = cudnnBackendSetAttribute(vp, CUDNN_ATTR_VARIANT_PACK_DATA_POINTERS, CUDNN_TYPE_VOID_PTR, 3, ptrs);
  if (s == CUDNN_STATUS_SUCCESS)
    s = cudnnBackendSetAttribute(vp, CUDNN_ATTR_VARIANT_PACK_UNIQUE_IDS, CUDNN_TYPE_INT64, 3, uids);
  if (s == CUDNN_STATUS_SUCCESS)
    s = cudnnBackendSetAttribute(vp, CUDNN_ATTR_VARIANT_PACK_WORKSPACE, CUDNN_TYPE_VOID_PTR, 1, &ws);
  if (s == CUDNN_STATUS_SUCCESS) s = cudnnBackendFinalize(vp);
  if (s == CUDNN_STATUS_SUCCESS) s = cudnnBackendExecute(h, plan, vp);
  cudnnBackendDestroyDescriptor(vp);
  if (s != CUDNN_STATUS_SUCCESS) return cu_fail_dnn(op, "cudnnBackendExecute", s);
  return 0;
}

/* Times the candidates on the call's buffers (outputs are overwritten by every run, as they will be
 * by the real call after) and returns the index of the fastest, -1 if none ran. */
static int fastest(const char *op, cu_dev *d, const std::vector<cudnnBackendDescriptor_t> &cands, void *x, void *w,
                   void *y) {
  cudaEvent_t e0, e1;
  if (cudaEventCreate(&e0) != cudaSuccess) { cudaGetLastError(); return cands.empty() ? -1 : 0; }
  if (cudaEventCreate(&e1) != cudaSuccess) { cudaGetLastError(); cudaEventDestroy(e0); return cands.empty() ? -1 : 0; }
  int best = -1;
  float best_ms = 0;
  for (size_t i = 0; i < cands.size(); i++) {
    int64_t wsz = plan_workspace(cands[i]);
    if (wsz < 0) continue;
    cu_buf ws;
    if (wsz > 0 && ws.get(op, d->index, (size_t)wsz)) continue;   /* too big for the free memory: skip */
    if (execute(op, d->dnn, cands[i], x, w, y, ws.p)) continue;  /* warm-up (and first-use setup) */
    cudaEventRecord(e0, d->stream);
    int bad = execute(op, d->dnn, cands[i], x, w, y, ws.p);
    cudaEventRecord(e1, d->stream);
    if (bad || cudaEventSynchronize(e1) != cudaSuccess) { cudaGetLastError(); continue; }
    float ms = 0;
    cudaEventElapsedTime(&ms, e0, e1);
    if (best < 0 || ms < best_ms) { best = (int)i; best_ms = ms; }
  }
  cudaEventDestroy(e0);
  cudaEventDestroy(e1);
  return best;
}

/* The cached plan for key k (built on first use; x, w, y are only used for benchmarking). */
static int get_plan(const char *op, cu_dev *d, const conv_key *k, void *x, void *w, void *y, conv_plan **out) {
  std::string key((const char *)k, sizeof *k);
  std::lock_guard<std::mutex> g(plan_lock);
  if (!plans) plans = new std::unordered_map<std::string, conv_plan *>();
  auto it = plans->find(key);
  if (it != plans->end()) { *out = it->second; return 0; }

  desc_set ds;
  cudnnBackendDescriptor_t graph;
  if (make_graph(op, d->dnn, k, ds, &graph)) return -1;
  std::vector<cudnnBackendDescriptor_t> cands;
  int want = cu_benchmark ? 8 : 1;
  if (make_plans(op, d->dnn, k, graph, CUDNN_HEUR_MODE_A, want, ds, cands)) return -1;
  if (cands.empty() && make_plans(op, d->dnn, k, graph, CUDNN_HEUR_MODE_FALLBACK, want, ds, cands)) return -1;
  conv_plan *p = new conv_plan();
  p->plan = NULL;
  p->workspace = 0;
  if (!cands.empty()) {
    int pick = cands.size() > 1 ? fastest(op, d, cands, x, w, y) : 0;
    if (pick >= 0) {
      p->plan = cands[(size_t)pick];
      p->workspace = plan_workspace(p->plan);
      if (p->workspace < 0) { p->plan = NULL; p->workspace = 0; }
    }
  }
  /* keep every descriptor the plan came from alive with it; drop the rest only if there is no plan */
  if (p->plan) { p->owned.swap(ds.v); }
  (*plans)[key] = p;
  *out = p;
  return 0;
}

/* ---------------------------------------------------------------- direct kernels (fallback) */

/* y[n,oh,ow,k] = sum_{r,s,cg} x[n, oh*sh-pt+r*dh, ow*sw-pl+s*dw, g*Cg+cg] * w[k,r,s,cg], g = k / Kg */
template <class T> __global__ void direct_fwd(T *y, const T *x, const T *w, conv_key k) {
  int64_t total = k.n * k.oh * k.ow * k.k, step = (int64_t)gridDim.x * blockDim.x;
  int64_t cg = k.c / k.groups, kg = k.k / k.groups;
  for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < total; i += step) {
    int64_t f = i % k.k, q = i / k.k, ow = q % k.ow, oh = (q / k.ow) % k.oh, n = q / (k.ow * k.oh);
    int64_t g = f / kg;
    double acc = 0;
    for (int64_t r = 0; r < k.r; r++) {
      int64_t ih = oh * k.sh - k.pt + r * k.dh;
      if (ih < 0 || ih >= k.h) continue;
      for (int64_t s = 0; s < k.s; s++) {
        int64_t iw = ow * k.sw - k.pl + s * k.dw;
        if (iw < 0 || iw >= k.w) continue;
        const T *xp = x + ((n * k.h + ih) * k.w + iw) * k.c + g * cg;
        const T *wp = w + ((f * k.r + r) * k.s + s) * cg;
        for (int64_t c = 0; c < cg; c++) acc += (double)cu_load(xp[c]) * (double)cu_load(wp[c]);
      }
    }
    y[i] = cu_from_double<T>(acc);
  }
}

template <class T> __global__ void direct_bwd_data(T *gx, const T *gy, const T *w, conv_key k) {
  int64_t total = k.n * k.h * k.w * k.c, step = (int64_t)gridDim.x * blockDim.x;
  int64_t cg = k.c / k.groups, kg = k.k / k.groups;
  for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < total; i += step) {
    int64_t c = i % k.c, q = i / k.c, iw = q % k.w, ih = (q / k.w) % k.h, n = q / (k.w * k.h);
    int64_t g = c / cg, ci = c % cg;
    double acc = 0;
    for (int64_t r = 0; r < k.r; r++) {
      int64_t th = ih + k.pt - r * k.dh;
      if (th < 0 || th % k.sh) continue;
      int64_t oh = th / k.sh;
      if (oh >= k.oh) continue;
      for (int64_t s = 0; s < k.s; s++) {
        int64_t tw = iw + k.pl - s * k.dw;
        if (tw < 0 || tw % k.sw) continue;
        int64_t ow = tw / k.sw;
        if (ow >= k.ow) continue;
        const T *gp = gy + ((n * k.oh + oh) * k.ow + ow) * k.k;
        for (int64_t f = g * kg; f < (g + 1) * kg; f++)
          acc += (double)cu_load(gp[f]) * (double)cu_load(w[((f * k.r + r) * k.s + s) * cg + ci]);
      }
    }
    gx[i] = cu_from_double<T>(acc);
  }
}

template <class T> __global__ void direct_bwd_filter(T *gw, const T *x, const T *gy, conv_key k) {
  int64_t cg = k.c / k.groups, kg = k.k / k.groups;
  int64_t total = k.k * k.r * k.s * cg, step = (int64_t)gridDim.x * blockDim.x;
  for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < total; i += step) {
    int64_t ci = i % cg, q = i / cg, s = q % k.s, r = (q / k.s) % k.r, f = q / (k.s * k.r);
    int64_t c = (f / kg) * cg + ci;
    double acc = 0;
    for (int64_t n = 0; n < k.n; n++)
      for (int64_t oh = 0; oh < k.oh; oh++) {
        int64_t ih = oh * k.sh - k.pt + r * k.dh;
        if (ih < 0 || ih >= k.h) continue;
        for (int64_t ow = 0; ow < k.ow; ow++) {
          int64_t iw = ow * k.sw - k.pl + s * k.dw;
          if (iw < 0 || iw >= k.w) continue;
          acc += (double)cu_load(gy[((n * k.oh + oh) * k.ow + ow) * k.k + f]) *
                 (double)cu_load(x[((n * k.h + ih) * k.w + iw) * k.c + c]);
        }
      }
    gw[i] = cu_from_double<T>(acc);
  }
}

static int run_direct(const char *op, cu_dev *d, const conv_key *k, void *x, void *w, void *y) {
  __atomic_add_fetch(&n_fallback_calls, 1, __ATOMIC_RELAXED);
  return cu_visit_act(op, (fl_dtype)k->dtype, [&](auto tag) {
    typedef typename decltype(tag)::type T;
    if (k->kind == CONV_FWD)
      direct_fwd<T><<<cu_grid(d, k->n * k->oh * k->ow * k->k, CU_THREADS), CU_THREADS, 0, d->stream>>>(
          (T *)y, (const T *)x, (const T *)w, *k);
    else if (k->kind == CONV_BWD_DATA)
      direct_bwd_data<T><<<cu_grid(d, k->n * k->h * k->w * k->c, CU_THREADS), CU_THREADS, 0, d->stream>>>(
          (T *)x, (const T *)y, (const T *)w, *k);
    else
      direct_bwd_filter<T><<<cu_grid(d, k->k * k->r * k->s * (k->c / k->groups), CU_THREADS), CU_THREADS, 0,
                             d->stream>>>((T *)w, (const T *)x, (const T *)y, *k);
    return cu_launched(op);
  });
}

/* ---------------------------------------------------------------- entry points */

/* x (N,H,W,C), w (K,R,S,C/groups), y (N,OH,OW,K): all contiguous, one dtype, one device */
static int conv_run(const char *op, int kind, const fl_tensor *x, const fl_tensor *w, const fl_tensor *y,
                    int groups, const fl_window *win) {
  cu_dev *d;
  if (cu_enter(op, x->storage->device, &d)) return -1;
  if (x->ndim != 4 || w->ndim != 4 || y->ndim != 4)
    return fl_fail("%s: expected 4-d NHWC tensors and a KRSC filter", op);
  if (w->dtype != x->dtype || y->dtype != x->dtype)
    return fl_fail("%s: input, filter and output must share a dtype, got %s, %s and %s", op,
                   fl_dtype_name(x->dtype), fl_dtype_name(w->dtype), fl_dtype_name(y->dtype));
  if (x->dtype != FL_F32 && x->dtype != FL_F64 && x->dtype != FL_BF16)
    return fl_fail("%s: expected float32, float64 or bfloat16, got %s", op, fl_dtype_name(x->dtype));
  conv_key k;
  memset(&k, 0, sizeof k);   /* padding bytes are part of the cache key */
  k.kind = kind;
  k.dev = d->index;
  k.dtype = x->dtype;
  k.groups = groups;
  k.tf32 = cu_allow_tf32;
  k.det = cu_deterministic;
  k.n = x->shape[0]; k.h = x->shape[1]; k.w = x->shape[2]; k.c = x->shape[3];
  k.k = w->shape[0]; k.r = w->shape[1]; k.s = w->shape[2];
  k.oh = y->shape[1]; k.ow = y->shape[2];
  k.sh = win->sh; k.sw = win->sw; k.dh = win->dh; k.dw = win->dw;
  k.pt = win->pt; k.pb = win->pb; k.pl = win->pl; k.pr = win->pr;
  void *px = cu_ptr(x), *pw = cu_ptr(w), *py = cu_ptr(y);
  k.align_x = ptr_align(px); k.align_w = ptr_align(pw); k.align_y = ptr_align(py);
  if (groups < 1 || k.c % groups || k.k % groups || w->shape[3] != k.c / groups || y->shape[3] != k.k)
    return fl_fail("%s: inconsistent channels: input %lld, filter %lldx%lld, output %lld, groups %d", op,
                   (long long)k.c, (long long)k.k, (long long)w->shape[3], (long long)y->shape[3], groups);
  if (fl_tensor_numel(x) == 0 || fl_tensor_numel(y) == 0 || fl_tensor_numel(w) == 0) {
    /* an empty sum: the direction's output is zero (it may be accumulated into by the caller) */
    const fl_tensor *o = kind == CONV_FWD ? y : kind == CONV_BWD_DATA ? x : w;
    return cu_fill_dev(op, (fl_tensor *)o, 0);
  }
  if (cu_dnn(op, d)) return -1;
  conv_plan *p;
  if (get_plan(op, d, &k, px, pw, py, &p)) return -1;
  if (!p->plan) return run_direct(op, d, &k, px, pw, py);
  cu_buf ws;
  if (p->workspace > 0 && ws.get(op, d->index, (size_t)p->workspace)) return -1;
  return execute(op, d->dnn, p->plan, px, pw, py, ws.p);
}

int cu_conv_forward(const char *op, fl_tensor *y, const fl_tensor *x, const fl_tensor *w_krsc, int groups,
                    const fl_window *win) {
  return conv_run(op, CONV_FWD, x, w_krsc, y, groups, win);
}

int cu_conv_backward_data(const char *op, fl_tensor *gx, const fl_tensor *gy, const fl_tensor *w_krsc, int groups,
                          const fl_window *win) {
  return conv_run(op, CONV_BWD_DATA, gx, w_krsc, gy, groups, win);
}

int cu_conv_backward_filter(const char *op, fl_tensor *gw_krsc, const fl_tensor *x, const fl_tensor *gy, int groups,
                            const fl_window *win) {
  return conv_run(op, CONV_BWD_FILTER, x, gw_krsc, gy, groups, win);
}
