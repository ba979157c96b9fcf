/* float32 convolutions through oneDNN (Debian's libdnnl, C API), on our own NHWC activations and
 * HWIO kernels: oneDNN's memory descriptors describe both layouts directly (format tags nhwc, hwio,
 * and hwigo for depthwise kernels (KH,KW,C,M) as a convolution with C groups), so activations are
 * never copied. Kernels are reordered into the blocked layout the chosen implementation wants on
 * every call (a kernel changes at every optimizer step, so a cached copy could go stale); that
 * costs one pass over the weights, small beside one over the activations.
 *
 * Primitives cost from tens of microseconds to milliseconds to create, so each (operation, shapes,
 * window, fused epilogue) keeps its primitive, reorders and memory objects in a small cache, least
 * recently used out, all freed at exit. Buffers (the blocked kernel, partial gradients) are one
 * grow-only allocation shared by every entry. A mutex serialises callers: the primitives and the
 * shared buffer are used by one call at a time, and each call is parallel inside.
 *
 * Threads: the Debian build runs on OpenMP (libgomp, the one OpenBLAS and our kernels use), and
 * takes omp_get_max_threads() of the calling thread, which fl_set_num_threads sets; idle threads
 * follow OMP_WAIT_POLICY like ours. nn_conv.c decides which convolutions come here (see there). */
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <dnnl.h>
#include "cpu.h"
#include "../nn.h"

enum { OP_FWD, OP_BWD_DATA, OP_BWD_FILTER };

/* What a primitive depends on. Zeroed before filling so that memcmp compares keys. */
typedef struct {
  int op, groups;                 /* groups: 1, or C for depthwise */
  int64_t n, h, w, c, oh, ow, f;  /* x (N,H,W,C), y (N,OH,OW,F); depthwise F = C*M */
  fl_window win;
  int scale, shift, relu;         /* forward: the fused epilogue */
  double beta;                    /* backward filter: gw = beta*gw + dL/dw */
} dnnl_key;

typedef struct {
  dnnl_key key;
  uint64_t used;                 /* last use, for eviction */
  dnnl_primitive_desc_t hint;    /* the forward descriptor a backward one was made from */
  dnnl_primitive_t prim;
  /* the kernel as the user has it (HWIO) and as the primitive wants it; the reorder between them,
   * NULL when they are the same layout. Forward and backward data read it, backward filter writes
   * it (the reorder then goes blocked -> HWIO, summing into gw when beta != 0). */
  dnnl_memory_t w_user, w_prim;
  dnnl_primitive_t w_reorder;
  size_t w_prim_bytes;
  dnnl_memory_t x, y, bias, scale, shift;   /* y: dst or diff_dst; x: src or diff_src */
} dnnl_entry;

#define DNNL_CACHE 128

static pthread_mutex_t dnnl_lock = PTHREAD_MUTEX_INITIALIZER;
static dnnl_engine_t engine;
static dnnl_stream_t stream;
static int engine_failed;
static dnnl_entry *cache[DNNL_CACHE];
static int ncache;
static uint64_t clock_tick;
static void *shared_buf;         /* the kernel (or its gradient) in the primitive's layout */
static size_t shared_cap;

static void entry_free(dnnl_entry *e) {
  if (!e) return;
  dnnl_primitive_destroy(e->prim);
  dnnl_primitive_destroy(e->w_reorder);
  dnnl_primitive_desc_destroy(e->hint);
  dnnl_memory_t *mems[] = {&e->w_user, &e->w_prim, &e->x, &e->y, &e->bias, &e->scale, &e->shift};
  for (size_t i = 0; i < sizeof mems / sizeof *mems; i++) dnnl_memory_destroy(*mems[i]);
  free(e);
}

/* Everything goes at exit (and when libflower.so or the Lua module is unloaded). */
__attribute__((destructor)) static void dnnl_teardown(void) {
  for (int i = 0; i < ncache; i++) entry_free(cache[i]);
  ncache = 0;
  if (stream) dnnl_stream_destroy(stream);
  if (engine) dnnl_engine_destroy(engine);
  stream = NULL;
  engine = NULL;
  free(shared_buf);
  shared_buf = NULL;
  shared_cap = 0;
}

static void *shared(size_t nbytes) {
  if (nbytes <= shared_cap) return shared_buf;
  void *p = NULL;
  if (posix_memalign(&p, 64, nbytes) != 0) return NULL;
  free(shared_buf);
  shared_buf = p;
  shared_cap = nbytes;
  return p;
}

/* md of an activation (N,H,W,C) in oneDNN's logical order (N,C,H,W) */
static void md_act(dnnl_memory_desc_t *md, int64_t n, int64_t h, int64_t w, int64_t c) {
  dnnl_dims_t d = {n, c, h, w};
  dnnl_memory_desc_init_by_tag(md, 4, d, dnnl_f32, dnnl_nhwc);
}

/* md of the kernel: (KH,KW,C,F) as (F,C,KH,KW) hwio, or depthwise (KH,KW,C,M) as (C,M,1,KH,KW) hwigo;
 * any: whatever layout the primitive prefers (blocked) */
static void md_kernel(dnnl_memory_desc_t *md, const dnnl_key *k, int any) {
  dnnl_format_tag_t tag = any ? dnnl_format_tag_any : k->groups > 1 ? dnnl_hwigo : dnnl_hwio;
  if (k->groups > 1) {
    dnnl_dims_t d = {k->groups, k->f / k->groups, k->c / k->groups, k->win.kh, k->win.kw};
    dnnl_memory_desc_init_by_tag(md, 5, d, dnnl_f32, tag);
  } else {
    dnnl_dims_t d = {k->f, k->c, k->win.kh, k->win.kw};
    dnnl_memory_desc_init_by_tag(md, 4, d, dnnl_f32, tag);
  }
}

static void md_vec(dnnl_memory_desc_t *md, int64_t f) {
  dnnl_dims_t d = {f};
  dnnl_memory_desc_init_by_tag(md, 1, d, dnnl_f32, dnnl_a);
}

/* the convolution's descriptor for op (OP_FWD, OP_BWD_DATA, OP_BWD_FILTER): activations NHWC, the
 * kernel in the layout the implementation prefers; TF's asymmetric padding as padding_l / padding_r,
 * dilation counted from 0 as oneDNN does */
static int conv_desc(dnnl_convolution_desc_t *cd, const dnnl_key *k, int op, const dnnl_memory_desc_t *bias) {
  const fl_window *w = &k->win;
  dnnl_memory_desc_t x, y, wt;
  md_act(&x, k->n, k->h, k->w, k->c);
  md_act(&y, k->n, k->oh, k->ow, k->f);
  md_kernel(&wt, k, 1);
  dnnl_dims_t strides = {w->sh, w->sw}, dil = {w->dh - 1, w->dw - 1}, pl = {w->pt, w->pl}, pr = {w->pb, w->pr};
  dnnl_status_t s;
  if (op == OP_FWD)
    s = dnnl_dilated_convolution_forward_desc_init(cd, dnnl_forward_training, dnnl_convolution_direct, &x, &wt,
                                                   bias, &y, strides, dil, pl, pr);
  else if (op == OP_BWD_DATA)
    s = dnnl_dilated_convolution_backward_data_desc_init(cd, dnnl_convolution_direct, &x, &wt, &y, strides, dil,
                                                         pl, pr);
  else
    s = dnnl_dilated_convolution_backward_weights_desc_init(cd, dnnl_convolution_direct, &x, &wt, bias, &y,
                                                            strides, dil, pl, pr);
  return s == dnnl_success ? 0 : -1;
}

static int mem(dnnl_memory_t *m, const dnnl_memory_desc_t *md) {
  return dnnl_memory_create(m, md, engine, DNNL_MEMORY_NONE) == dnnl_success ? 0 : -1;
}

/* Builds the primitive for key k; NULL if oneDNN cannot do it (the caller then uses our kernels). */
static dnnl_entry *entry_new(const dnnl_key *k) {
  dnnl_entry *e = calloc(1, sizeof *e);
  if (!e) return NULL;
  e->key = *k;
  dnnl_convolution_desc_t cd;
  dnnl_memory_desc_t vec, wuser, one;
  dnnl_primitive_attr_t attr = NULL;
  dnnl_post_ops_t po = NULL;
  dnnl_primitive_desc_t pd = NULL;
  int ok = 0;
  md_vec(&vec, k->f);
  md_kernel(&wuser, k, 0);
  if (k->op == OP_FWD) {
    /* y = conv*scale + shift, ReLU: the shift alone is the primitive's bias; with a scale, both are
     * binary post-ops (the bias would come before the scale) */
    int bias = k->shift && !k->scale;
    if (conv_desc(&cd, k, OP_FWD, bias ? &vec : NULL)) goto done;
    if (dnnl_primitive_attr_create(&attr) || dnnl_post_ops_create(&po)) goto done;
    dnnl_dims_t d1 = {1, k->f, 1, 1};
    dnnl_memory_desc_init_by_tag(&one, 4, d1, dnnl_f32, dnnl_nchw);
    if (k->scale && dnnl_post_ops_append_binary(po, dnnl_binary_mul, &one)) goto done;
    if (k->scale && k->shift && dnnl_post_ops_append_binary(po, dnnl_binary_add, &one)) goto done;
    if (k->relu && dnnl_post_ops_append_eltwise(po, 1.0f, dnnl_eltwise_relu, 0.0f, 0.0f)) goto done;
    if (dnnl_primitive_attr_set_post_ops(attr, po)) goto done;
    if (dnnl_primitive_desc_create(&pd, &cd, attr, engine, NULL)) goto done;
    if (bias && mem(&e->bias, &vec)) goto done;
    if (k->scale && (mem(&e->scale, &one) || (k->shift && mem(&e->shift, &one)))) goto done;
  } else {
    dnnl_convolution_desc_t fd;
    if (conv_desc(&fd, k, OP_FWD, NULL)) goto done;
    if (dnnl_primitive_desc_create(&e->hint, &fd, NULL, engine, NULL)) goto done;
    if (conv_desc(&cd, k, k->op, NULL)) goto done;
    if (dnnl_primitive_desc_create(&pd, &cd, NULL, engine, e->hint)) goto done;
  }
  const dnnl_memory_desc_t *wprim = dnnl_primitive_desc_query_md(
      pd, k->op == OP_BWD_FILTER ? dnnl_query_diff_weights_md : dnnl_query_weights_md, 0);
  dnnl_memory_desc_t xmd, ymd;
  md_act(&xmd, k->n, k->h, k->w, k->c);
  md_act(&ymd, k->n, k->oh, k->ow, k->f);
  if (mem(&e->x, &xmd) || mem(&e->y, &ymd) || mem(&e->w_user, &wuser) || mem(&e->w_prim, wprim)) goto done;
  e->w_prim_bytes = dnnl_memory_desc_get_size(wprim);
  /* a reorder when the layouts differ, and for an accumulated gradient (the reorder sums) */
  int same = dnnl_memory_desc_equal(wprim, &wuser);
  if (!same || (k->op == OP_BWD_FILTER && k->beta != 0)) {
    dnnl_primitive_attr_t rattr = NULL;
    dnnl_post_ops_t rpo = NULL;
    dnnl_primitive_desc_t rpd = NULL;
    int rok = 0;
    if (k->op == OP_BWD_FILTER && k->beta != 0) {
      if (dnnl_primitive_attr_create(&rattr) || dnnl_post_ops_create(&rpo) ||
          dnnl_post_ops_append_sum(rpo, (float)k->beta) || dnnl_primitive_attr_set_post_ops(rattr, rpo))
        goto rdone;
    }
    if (k->op == OP_BWD_FILTER) rok = !dnnl_reorder_primitive_desc_create(&rpd, wprim, engine, &wuser, engine, rattr);
    else rok = !dnnl_reorder_primitive_desc_create(&rpd, &wuser, engine, wprim, engine, rattr);
    rok = rok && !dnnl_primitive_create(&e->w_reorder, rpd);
  rdone:
    dnnl_primitive_desc_destroy(rpd);
    dnnl_post_ops_destroy(rpo);
    dnnl_primitive_attr_destroy(rattr);
    if (!rok) goto done;
  }
  if (dnnl_primitive_create(&e->prim, pd)) goto done;
  ok = 1;
done:
  dnnl_primitive_desc_destroy(pd);
  dnnl_post_ops_destroy(po);
  dnnl_primitive_attr_destroy(attr);
  if (!ok) {
    entry_free(e);
    return NULL;
  }
  return e;
}

/* The cached entry for k, made if needed; NULL when oneDNN does not handle it. Under dnnl_lock. */
static dnnl_entry *entry_get(const dnnl_key *k) {
  if (engine_failed) return NULL;
  if (!engine) {
    if (dnnl_engine_create(&engine, dnnl_cpu, 0) || dnnl_stream_create(&stream, engine, dnnl_stream_default_flags)) {
      engine_failed = 1;
      return NULL;
    }
  }
  for (int i = 0; i < ncache; i++)
    if (memcmp(&cache[i]->key, k, sizeof *k) == 0) {
      cache[i]->used = ++clock_tick;
      return cache[i];
    }
  dnnl_entry *e = entry_new(k);
  if (!e) return NULL;
  if (ncache == DNNL_CACHE) {
    int old = 0;
    for (int i = 1; i < ncache; i++)
      if (cache[i]->used < cache[old]->used) old = i;
    entry_free(cache[old]);
    cache[old] = cache[--ncache];
  }
  e->used = ++clock_tick;
  cache[ncache++] = e;
  return e;
}

static void key_init(dnnl_key *k, int op, int depthwise, const fl_tensor *x, const fl_tensor *y,
                     const fl_window *win) {
  memset(k, 0, sizeof *k);
  k->op = op;
  k->n = x->shape[0]; k->h = x->shape[1]; k->w = x->shape[2]; k->c = x->shape[3];
  k->oh = y->shape[1]; k->ow = y->shape[2]; k->f = y->shape[3];
  k->groups = depthwise ? (int)k->c : 1;
  k->win = *win;
}

static int run(dnnl_primitive_t p, int nargs, const dnnl_exec_arg_t *args) {
  if (dnnl_primitive_execute(p, stream, nargs, args) != dnnl_success) return -1;
  return dnnl_stream_wait(stream) == dnnl_success ? 0 : -1;
}

/* Puts the kernel w into e->w_prim (through the reorder, or as it is) for the forward and backward
 * data primitives; -1 without memory */
static int kernel_in(dnnl_entry *e, const fl_tensor *w) {
  dnnl_memory_set_data_handle(e->w_user, fl_tensor_data(w));
  if (!e->w_reorder) {
    dnnl_memory_set_data_handle(e->w_prim, fl_tensor_data(w));
    return 0;
  }
  void *buf = shared(e->w_prim_bytes);
  if (!buf) return -1;
  dnnl_memory_set_data_handle(e->w_prim, buf);
  dnnl_exec_arg_t a[] = {{DNNL_ARG_FROM, e->w_user}, {DNNL_ARG_TO, e->w_prim}};
  return run(e->w_reorder, 2, a);
}

/* 1 when oneDNN cannot take the call (the caller uses its own kernel), 0 done, -1 failed */
static int finish(int rc, const char *op) {
  if (rc < 0) return fl_fail_oom("%s: oneDNN failed (out of memory?)", op);
  return rc;
}

int cpu_dnnl_conv_forward(fl_tensor *y, const fl_tensor *x, const fl_tensor *w, const fl_tensor *scale,
                          const fl_tensor *shift, int relu, const fl_window *win, int depthwise) {
  dnnl_key k;
  key_init(&k, OP_FWD, depthwise, x, y, win);
  k.scale = scale != NULL;
  k.shift = shift != NULL;
  k.relu = relu != 0;
  pthread_mutex_lock(&dnnl_lock);
  int rc = 1;
  dnnl_entry *e = entry_get(&k);
  if (e) {
    rc = -1;
    if (kernel_in(e, w) == 0) {
      dnnl_memory_set_data_handle(e->x, fl_tensor_data(x));
      dnnl_memory_set_data_handle(e->y, fl_tensor_data(y));
      dnnl_exec_arg_t a[6] = {{DNNL_ARG_SRC, e->x}, {DNNL_ARG_WEIGHTS, e->w_prim}, {DNNL_ARG_DST, e->y}};
      int na = 3;
      if (e->bias) {
        dnnl_memory_set_data_handle(e->bias, fl_tensor_data(shift));
        a[na++] = (dnnl_exec_arg_t){DNNL_ARG_BIAS, e->bias};
      }
      if (e->scale) {
        dnnl_memory_set_data_handle(e->scale, fl_tensor_data(scale));
        a[na++] = (dnnl_exec_arg_t){DNNL_ARG_ATTR_MULTIPLE_POST_OP(0) | DNNL_ARG_SRC_1, e->scale};
      }
      if (e->shift) {
        dnnl_memory_set_data_handle(e->shift, fl_tensor_data(shift));
        a[na++] = (dnnl_exec_arg_t){DNNL_ARG_ATTR_MULTIPLE_POST_OP(1) | DNNL_ARG_SRC_1, e->shift};
      }
      rc = run(e->prim, na, a);
    }
  }
  pthread_mutex_unlock(&dnnl_lock);
  return finish(rc, depthwise ? "depthwise_forward" : "conv2d_forward");
}

int cpu_dnnl_conv_backward_data(fl_tensor *gx, const fl_tensor *gy, const fl_tensor *w, const fl_window *win,
                                int depthwise) {
  dnnl_key k;
  key_init(&k, OP_BWD_DATA, depthwise, gx, gy, win);
  pthread_mutex_lock(&dnnl_lock);
  int rc = 1;
  dnnl_entry *e = entry_get(&k);
  if (e) {
    rc = -1;
    if (kernel_in(e, w) == 0) {
      dnnl_memory_set_data_handle(e->x, fl_tensor_data(gx));
      dnnl_memory_set_data_handle(e->y, fl_tensor_data(gy));
      dnnl_exec_arg_t a[] = {{DNNL_ARG_DIFF_DST, e->y}, {DNNL_ARG_WEIGHTS, e->w_prim}, {DNNL_ARG_DIFF_SRC, e->x}};
      rc = run(e->prim, 3, a);
    }
  }
  pthread_mutex_unlock(&dnnl_lock);
  return finish(rc, depthwise ? "depthwise_backward_data" : "conv2d_backward_data");
}

int cpu_dnnl_conv_backward_filter(fl_tensor *gw, const fl_tensor *x, const fl_tensor *gy, const fl_window *win,
                                  double beta, int depthwise) {
  dnnl_key k;
  key_init(&k, OP_BWD_FILTER, depthwise, x, gy, win);
  k.beta = beta;
  pthread_mutex_lock(&dnnl_lock);
  int rc = 1;
  dnnl_entry *e = entry_get(&k);
  if (e) {
    rc = -1;
    /* with a reorder (blocked layout, or a sum into gw) the gradient goes to the shared buffer first */
    void *buf = e->w_reorder ? shared(e->w_prim_bytes) : fl_tensor_data(gw);
    if (buf) {
      dnnl_memory_set_data_handle(e->w_user, fl_tensor_data(gw));
      dnnl_memory_set_data_handle(e->w_prim, buf);
      dnnl_memory_set_data_handle(e->x, fl_tensor_data(x));
      dnnl_memory_set_data_handle(e->y, fl_tensor_data(gy));
      dnnl_exec_arg_t a[] = {{DNNL_ARG_SRC, e->x}, {DNNL_ARG_DIFF_DST, e->y}, {DNNL_ARG_DIFF_WEIGHTS, e->w_prim}};
      rc = run(e->prim, 3, a);
      if (rc == 0 && e->w_reorder) {
        dnnl_exec_arg_t r[] = {{DNNL_ARG_FROM, e->w_prim}, {DNNL_ARG_TO, e->w_user}};
        rc = run(e->w_reorder, 2, r);
      }
    }
  }
  pthread_mutex_unlock(&dnnl_lock);
  return finish(rc, depthwise ? "depthwise_backward_filter" : "conv2d_backward_filter");
}
