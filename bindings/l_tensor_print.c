/* tostring(t), in Torch7's style:
 *    1.5000  2.0000
 *   -3.2500  4.0000
 *   [torch.FloatTensor of size 2x2, device cpu]
 * One format for the whole tensor, so columns align: integers (and floats that are all whole
 * numbers) without decimals, other floats with 4 decimals, or %.4e when magnitudes are very large or
 * small. 1-d tensors print as a column and 3-d and more as 2-d slices headed "(i,j,.,.) = ", as
 * Torch7 did. Above 1000 elements each dim longer than 6 shows its first and last 3 with "...".
 * A device tensor is printed from a host copy; the footer names its device ("device cuda:0"). */
#include "l_tensor.h"

#include <math.h>
#include <stdio.h>
#include <string.h>

#define SUMMARY_NUMEL 1000
#define EDGE 3

typedef struct {
  const fl_tensor *t;
  int summarise;
  int mode;      /* 0: integers, 1: fixed %.4f, 2: %.4e */
  int width;
  luaL_Buffer *b;
} printer;

/* shown indices of a dim: all, or first/last EDGE with -1 marking the "..." */
static int shown(const printer *p, int d, int64_t *idx) {
  int64_t n = p->t->shape[d];
  int k = 0;
  if (p->summarise && n > 2 * EDGE) {
    for (int i = 0; i < EDGE; i++) idx[k++] = i;
    idx[k++] = -1;
    for (int i = EDGE; i > 0; i--) idx[k++] = n - i;
    return k;
  }
  return -1;   /* caller iterates 0..n-1 */
}

static int fmt_value(const printer *p, char *buf, size_t n, const int64_t *index) {
  double v = fl_tensor_get(p->t, index);
  if (p->t->dtype == FL_I64) {
    const fl_tensor *t = p->t;
    int64_t off = t->offset;
    for (int i = 0; i < t->ndim; i++) off += index[i] * t->stride[i];
    return snprintf(buf, n, "%lld", (long long)((const int64_t *)t->storage->data)[off]);
  }
  if (isnan(v)) return snprintf(buf, n, "nan");
  if (isinf(v)) return snprintf(buf, n, v > 0 ? "inf" : "-inf");
  switch (p->mode) {
  case 0: return snprintf(buf, n, "%.0f", v);
  case 1: return snprintf(buf, n, "%.4f", v);
  default: return snprintf(buf, n, "%.4e", v);
  }
}

/* Calls leaf(p, index, ctx) for every shown element (the ones not summarised away by `...`). */
typedef void (*leaf_fn)(printer *p, const int64_t *index, void *ctx);

static void visit_shown(printer *p, int d, int64_t *index, leaf_fn leaf, void *ctx) {
  if (d == p->t->ndim) { leaf(p, index, ctx); return; }
  int64_t idx[2 * EDGE + 1];
  int k = shown(p, d, idx);
  int64_t n = k < 0 ? p->t->shape[d] : k;
  for (int64_t i = 0; i < n; i++) {
    int64_t j = k < 0 ? i : idx[i];
    if (j < 0) continue;
    index[d] = j;
    visit_shown(p, d + 1, index, leaf, ctx);
  }
}

typedef struct { double maxabs, minabs; int allint; } value_range;

/* the range of the shown finite values, and whether they are all integers: picks the format */
static void scan_leaf(printer *p, const int64_t *index, void *ctx) {
  value_range *r = ctx;
  double v = fl_tensor_get(p->t, index);
  if (!isfinite(v)) return;
  double a = fabs(v);
  if (a > r->maxabs) r->maxabs = a;
  if (a > 0 && a < r->minabs) r->minabs = a;
  if (v != floor(v)) r->allint = 0;
}

/* the widest formatted value: the column width */
static void measure_leaf(printer *p, const int64_t *index, void *ctx) {
  (void)ctx;
  char buf[64];
  int w = fmt_value(p, buf, sizeof buf, index);
  if (w > p->width) p->width = w;
}

static void put_value(printer *p, const int64_t *index) {
  char buf[64], out[96];
  fmt_value(p, buf, sizeof buf, index);
  snprintf(out, sizeof out, " %*s", p->width, buf);
  luaL_addstring(p->b, out);
}

static void put_ellipsis_cell(printer *p) {
  char out[96];
  snprintf(out, sizeof out, " %*s", p->width, "...");
  luaL_addstring(p->b, out);
}

/* one row (last dim) of the matrix at index[0..ndim-2] */
static void put_row(printer *p, int64_t *index) {
  int d = p->t->ndim - 1;
  int64_t idx[2 * EDGE + 1];
  int k = shown(p, d, idx);
  int64_t n = k < 0 ? p->t->shape[d] : k;
  for (int64_t i = 0; i < n; i++) {
    int64_t j = k < 0 ? i : idx[i];
    if (j < 0) { put_ellipsis_cell(p); continue; }
    index[d] = j;
    put_value(p, index);
  }
  luaL_addchar(p->b, '\n');
}

static void put_matrix(printer *p, int64_t *index) {
  int d = p->t->ndim - 2;
  int64_t idx[2 * EDGE + 1];
  int k = shown(p, d, idx);
  int64_t n = k < 0 ? p->t->shape[d] : k;
  for (int64_t i = 0; i < n; i++) {
    int64_t j = k < 0 ? i : idx[i];
    if (j < 0) { luaL_addstring(p->b, " ...\n"); continue; }
    index[d] = j;
    put_row(p, index);
  }
}

/* dims 0..ndim-3 pick a slice, printed with a "(i,j,.,.) = " header */
static void put_slices(printer *p, int d, int64_t *index, int *first) {
  if (d == p->t->ndim - 2) {
    char head[256];
    size_t k = 0;
    if (!*first) luaL_addchar(p->b, '\n');
    *first = 0;
    k += (size_t)snprintf(head + k, sizeof head - k, "(");
    for (int i = 0; i < d; i++) k += (size_t)snprintf(head + k, sizeof head - k, "%lld,", (long long)index[i] + 1);
    snprintf(head + k, sizeof head - k, ".,.) = \n");
    luaL_addstring(p->b, head);
    put_matrix(p, index);
    return;
  }
  int64_t idx[2 * EDGE + 1];
  int k = shown(p, d, idx);
  int64_t n = k < 0 ? p->t->shape[d] : k;
  for (int64_t i = 0; i < n; i++) {
    int64_t j = k < 0 ? i : idx[i];
    if (j < 0) { luaL_addstring(p->b, "\n ...\n"); continue; }
    index[d] = j;
    put_slices(p, d + 1, index, first);
  }
}

int fl_lua_tensor_tostring(lua_State *L) {
  fl_tensor *t = luaL_checkudata(L, 1, FL_TENSOR_MT);
  if (!t->storage) {
    lua_pushliteral(L, "[flower.Tensor (freed)]");
    return 1;
  }
  /* elements are read from host memory: a device tensor's copy (pushed before the buffer, which
   * owns the stack above it) */
  const fl_tensor *h = fl_lua_tohost(L, t, "tostring");
  luaL_Buffer b;
  luaL_buffinit(L, &b);
  printer p = {h, fl_tensor_numel(t) > SUMMARY_NUMEL, 0, 0, &b};
  int64_t index[FL_MAXDIM] = {0};
  int64_t numel = fl_tensor_numel(t);
  if (numel > 0) {
    if (fl_dtype_is_float(t->dtype)) {
      value_range r = {0, HUGE_VAL, 1};
      visit_shown(&p, 0, index, scan_leaf, &r);
      if (r.allint && r.maxabs < 1e9) p.mode = 0;
      else if (r.maxabs >= 1e5 || r.minabs < 1e-4) p.mode = 2;
      else p.mode = 1;
    }
    visit_shown(&p, 0, index, measure_leaf, NULL);
    if (t->ndim == 0) {
      put_value(&p, index);
      luaL_addchar(&b, '\n');
    } else if (t->ndim == 1) {   /* a column, as in Torch7 */
      int64_t idx[2 * EDGE + 1];
      int k = shown(&p, 0, idx);
      int64_t n = k < 0 ? t->shape[0] : k;
      for (int64_t i = 0; i < n; i++) {
        int64_t j = k < 0 ? i : idx[i];
        if (j < 0) { luaL_addstring(&b, " ...\n"); continue; }
        index[0] = j;
        put_value(&p, index);
        luaL_addchar(&b, '\n');
      }
    } else if (t->ndim == 2) {
      put_matrix(&p, index);
    } else {
      int first = 1;
      put_slices(&p, 0, index, &first);
    }
  }
  char tail[300], sh[220];
  if (t->ndim == 0) {
    snprintf(sh, sizeof sh, "[]");
  } else {
    size_t k = 0;
    sh[0] = 0;
    for (int i = 0; i < t->ndim; i++)
      k += (size_t)snprintf(sh + k, sizeof sh - k, i ? "x%lld" : "%lld", (long long)t->shape[i]);
  }
  char dev[80];
  fl_device_str(dev, sizeof dev, t);
  snprintf(tail, sizeof tail, "[%s of size %s, device %s]", fl_lua_torch_name(t->dtype), sh, dev);
  luaL_addstring(&b, tail);
  luaL_pushresult(&b);
  return 1;
}
