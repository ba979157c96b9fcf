/* Front of the nn kernels: argument checks, contiguity, output allocation, dispatch to the
 * backend's fl_nn_ops table. Every error names the function and says what was expected and found. */
#include <stddef.h>
#include <string.h>
#include "nn.h"
#include "ops.h"

/* ---- windows ---- */

static int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

int fl_window_out(const fl_window *win, const char *op, int64_t H, int64_t W, int64_t *OH, int64_t *OW) {
  int64_t ekh = (int64_t)(win->kh - 1) * win->dh + 1, ekw = (int64_t)(win->kw - 1) * win->dw + 1;
  int64_t ph = H + win->pt + win->pb, pw = W + win->pl + win->pr;
  if (ph < ekh || pw < ekw)
    return fl_fail("%s: window %dx%d (dilated %lldx%lld) does not fit the input %lldx%lld padded to %lldx%lld",
                   op, win->kh, win->kw, (long long)ekh, (long long)ekw, (long long)H, (long long)W,
                   (long long)ph, (long long)pw);
  *OH = (ph - ekh) / win->sh + 1;
  *OW = (pw - ekw) / win->sw + 1;
  return 0;
}

int fl_window_init(fl_window *win, const char *op, int64_t H, int64_t W, int kh, int kw, int sh, int sw,
                   int dh, int dw, const char *padding, int64_t *OH, int64_t *OW) {
  if (kh < 1 || kw < 1) return fl_fail("%s: window size must be positive, got %dx%d", op, kh, kw);
  if (sh < 1 || sw < 1) return fl_fail("%s: strides must be positive, got %dx%d", op, sh, sw);
  if (dh < 1 || dw < 1) return fl_fail("%s: dilation must be positive, got %dx%d", op, dh, dw);
  if (H < 1 || W < 1) return fl_fail("%s: input spatial size must be positive, got %lldx%lld", op,
                                     (long long)H, (long long)W);
  memset(win, 0, sizeof *win);
  win->kh = kh; win->kw = kw; win->sh = sh; win->sw = sw; win->dh = dh; win->dw = dw;
  if (strcmp(padding, "same") == 0) {
    int64_t oh = ceil_div(H, sh), ow = ceil_div(W, sw);
    int64_t ph = (oh - 1) * sh + (int64_t)(kh - 1) * dh + 1 - H;
    int64_t pw = (ow - 1) * sw + (int64_t)(kw - 1) * dw + 1 - W;
    if (ph < 0) ph = 0;
    if (pw < 0) pw = 0;
    win->pt = (int)(ph / 2); win->pb = (int)(ph - ph / 2);
    win->pl = (int)(pw / 2); win->pr = (int)(pw - pw / 2);
  } else if (strcmp(padding, "valid") != 0) {
    return fl_fail("%s: padding must be 'valid' or 'same', got '%s'", op, padding);
  }
  return fl_window_out(win, op, H, W, OH, OW);
}

/* ---- argument checks ---- */

static const struct fl_nn_ops *nn_ops(const char *op, const fl_tensor *t) {
  if (!t->storage) { fl_fail("%s: tensor is empty (freed)", op); return NULL; }
  const struct fl_nn_ops *ops = t->storage->backend->nn;
  if (!ops) fl_fail("%s: backend '%s' has no nn kernels", op, t->storage->backend->name);
  return ops;
}

/* A backend may leave kernels out of its table: the op then fails naming itself and the backend
 * instead of calling NULL. (All function pointer types share one representation, so the slot is read
 * as a generic one.) */
static const struct fl_nn_ops *with_kernel(const char *op, const fl_tensor *t, const struct fl_nn_ops *ops,
                                           size_t offset) {
  if (!ops) return NULL;
  void (*fn)(void);
  memcpy(&fn, (const char *)ops + offset, sizeof fn);
  if (!fn) { fl_fail("%s: not supported by backend '%s'", op, t->storage->backend->name); return NULL; }
  return ops;
}
#define NN_OPS(op, t, kernel) with_kernel(op, t, nn_ops(op, t), offsetof(struct fl_nn_ops, kernel))

/* Mixed precision: bfloat16 activations go with float32 parameters, statistics and their gradients
 * (per-channel vectors, the float32 master weights' gradients); other dtypes use their own. */
static fl_dtype param_dtype(const fl_tensor *x) { return x->dtype == FL_BF16 ? FL_F32 : x->dtype; }

/* t must be a live tensor of dtype `want` on ref's backend and device, with `ndim` dims (ndim < 0: any) */
static int check_arg_as(const char *op, const char *name, const fl_tensor *t, int ndim, const fl_tensor *ref,
                        fl_dtype want) {
  char buf[128];
  if (!t->storage) return fl_fail("%s: %s is empty (freed)", op, name);
  if (t->dtype != want && want == ref->dtype)
    return fl_fail("%s: %s has dtype %s, expected %s like the input", op, name, fl_dtype_name(t->dtype),
                   fl_dtype_name(want));
  if (t->dtype != want)
    return fl_fail("%s: %s has dtype %s, expected %s (parameters of a %s input are %s)", op, name,
                   fl_dtype_name(t->dtype), fl_dtype_name(want), fl_dtype_name(ref->dtype), fl_dtype_name(want));
  if (t->storage->backend != ref->storage->backend || t->storage->device != ref->storage->device)
    return fl_fail("%s: %s is on %s:%d, the input on %s:%d", op, name, t->storage->backend->name,
                   t->storage->device, ref->storage->backend->name, ref->storage->device);
  if (ndim >= 0 && t->ndim != ndim) {
    fl_shape_str(buf, sizeof buf, t->ndim, t->shape);
    return fl_fail("%s: %s must have %d dims, got %d (shape %s)", op, name, ndim, t->ndim, buf);
  }
  return 0;
}

/* t must be a live float tensor of `ndim` dims (ndim < 0: any) with ref's dtype and backend; without
 * ref, of any float dtype (bfloat16 included) */
static int check_arg(const char *op, const char *name, const fl_tensor *t, int ndim, const fl_tensor *ref) {
  char buf[128];
  if (!t->storage) return fl_fail("%s: %s is empty (freed)", op, name);
  if (ref) return check_arg_as(op, name, t, ndim, ref, ref->dtype);
  if (!fl_dtype_is_float(t->dtype))
    return fl_fail("%s: %s must be float32, float64 or bfloat16, got %s", op, name, fl_dtype_name(t->dtype));
  if (ndim >= 0 && t->ndim != ndim) {
    fl_shape_str(buf, sizeof buf, t->ndim, t->shape);
    return fl_fail("%s: %s must have %d dims, got %d (shape %s)", op, name, ndim, t->ndim, buf);
  }
  return 0;
}

/* float32 or float64: losses and optimizer state stay out of bfloat16 */
static int check_wide(const char *op, const char *name, const fl_tensor *t) {
  if (check_arg(op, name, t, -1, NULL)) return -1;
  if (t->dtype == FL_BF16)
    return fl_fail("%s: %s must be float32 or float64, got bfloat16 (mixed precision keeps losses and optimizer "
                   "state in float32: convert with :float())", op, name);
  return 0;
}

/* an optional per-channel vector of size c: a parameter or statistic of input ref (param_dtype) */
static int check_vec(const char *op, const char *name, const fl_tensor *t, int64_t c, const fl_tensor *ref) {
  if (!t) return 0;
  if (check_arg_as(op, name, t, 1, ref, param_dtype(ref))) return -1;
  if (t->shape[0] != c)
    return fl_fail("%s: %s has %lld elements, expected %lld (one per channel)", op, name,
                   (long long)t->shape[0], (long long)c);
  return 0;
}

static int check_shape(const char *op, const char *name, const fl_tensor *t, int ndim, const int64_t *want) {
  if (t->ndim == ndim && memcmp(t->shape, want, sizeof(int64_t) * (size_t)ndim) == 0) return 0;
  char a[128], b[128];
  fl_shape_str(a, sizeof a, t->ndim, t->shape);
  fl_shape_str(b, sizeof b, ndim, want);
  return fl_fail("%s: %s has shape %s, expected %s", op, name, a, b);
}

/* Contiguous versions of up to 6 inputs, held for the duration of one call. NULL entries stay NULL. */
typedef struct { fl_tensor t[6]; const fl_tensor *p[6]; int n; } cont_set;

static int cont_add(cont_set *cs, const fl_tensor *src, const fl_tensor **dst) {
  if (!src) { *dst = NULL; return 0; }
  if (fl_tensor_is_contiguous(src)) { *dst = src; return 0; }
  fl_tensor *t = &cs->t[cs->n];
  memset(t, 0, sizeof *t);
  if (fl_contiguous(t, src)) return -1;
  cs->n++;
  *dst = t;
  return 0;
}

static void cont_free(cont_set *cs) {
  for (int i = 0; i < cs->n; i++) fl_tensor_free(&cs->t[i]);
  cs->n = 0;
}

/* an output that must be contiguous and of the given shape */
static int check_out(const char *op, const char *name, const fl_tensor *t, int ndim, const int64_t *shape,
                     const fl_tensor *ref) {
  if (check_arg(op, name, t, ndim, ref)) return -1;
  if (check_shape(op, name, t, ndim, shape)) return -1;
  if (!fl_tensor_is_contiguous(t)) return fl_fail("%s: %s must be contiguous", op, name);
  return 0;
}

static int new_of(fl_tensor *out, const fl_tensor *ref, fl_dtype dt, int ndim, const int64_t *shape) {
  return fl_tensor_init(out, ref->storage->backend, ref->storage->device, dt, ndim, shape);
}
static int new_like(fl_tensor *out, const fl_tensor *ref, int ndim, const int64_t *shape) {
  return new_of(out, ref, ref->dtype, ndim, shape);
}

static int check_window(const char *op, const fl_window *win) {
  if (win->kh < 1 || win->kw < 1 || win->sh < 1 || win->sw < 1 || win->dh < 1 || win->dw < 1 ||
      win->pt < 0 || win->pb < 0 || win->pl < 0 || win->pr < 0)
    return fl_fail("%s: invalid window (size %dx%d, strides %dx%d, dilation %dx%d, pads %d,%d,%d,%d)", op,
                   win->kh, win->kw, win->sh, win->sw, win->dh, win->dw, win->pt, win->pb, win->pl, win->pr);
  /* a pad as large as the dilated window would make outputs that see only padding */
  if (win->pt >= (win->kh - 1) * win->dh + 1 || win->pb >= (win->kh - 1) * win->dh + 1 ||
      win->pl >= (win->kw - 1) * win->dw + 1 || win->pr >= (win->kw - 1) * win->dw + 1)
    return fl_fail("%s: padding %d,%d,%d,%d must be smaller than the window %dx%d", op, win->pt, win->pb,
                   win->pl, win->pr, win->kh, win->kw);
  return 0;
}

/* ---- convolution ---- */

/* Checks x (N,H,W,C) against kernel w (KH,KW,C,F|M) and the window; gives the output shape. */
static int conv_shapes(const char *op, const fl_tensor *x_or_null, const int64_t *xshape, const fl_tensor *w,
                       const fl_window *win, int depthwise, int64_t *yshape) {
  char a[128], b[128];
  if (check_window(op, win)) return -1;
  if (w->shape[0] != win->kh || w->shape[1] != win->kw)
    return fl_fail("%s: kernel is %lldx%lld, the window says %dx%d", op, (long long)w->shape[0],
                   (long long)w->shape[1], win->kh, win->kw);
  if (xshape[3] != w->shape[2]) {
    fl_shape_str(a, sizeof a, 4, xshape);
    fl_shape_str(b, sizeof b, 4, w->shape);
    return fl_fail("%s: input has %lld channels, kernel expects %lld (input %s, kernel %s)", op,
                   (long long)xshape[3], (long long)w->shape[2], a, b);
  }
  int64_t oh, ow;
  if (fl_window_out(win, op, xshape[1], xshape[2], &oh, &ow)) return -1;
  yshape[0] = xshape[0]; yshape[1] = oh; yshape[2] = ow;
  yshape[3] = depthwise ? w->shape[2] * w->shape[3] : w->shape[3];
  (void)x_or_null;
  return 0;
}

typedef int (*fwd_fn)(fl_tensor *, const fl_tensor *, const fl_tensor *, const fl_tensor *, const fl_tensor *,
                      int, const fl_window *);

static int conv_forward_any(const char *op, int depthwise, fl_tensor *y, const fl_tensor *x, const fl_tensor *w,
                            const fl_tensor *scale, const fl_tensor *shift, int relu, const fl_window *win) {
  const struct fl_nn_ops *ops =
      depthwise ? NN_OPS(op, x, depthwise_forward) : NN_OPS(op, x, conv2d_forward);
  int64_t ys[4];
  if (!ops || check_arg(op, "input", x, 4, NULL) || check_arg(op, "kernel", w, 4, x)) return -1;
  if (conv_shapes(op, x, x->shape, w, win, depthwise, ys)) return -1;
  if (check_vec(op, "scale", scale, ys[3], x) || check_vec(op, "shift", shift, ys[3], x)) return -1;
  fwd_fn fn = depthwise ? ops->depthwise_forward : ops->conv2d_forward;
  cont_set cs = {0};
  const fl_tensor *cx, *cw, *csc, *csh;
  int rc = -1;
  if (cont_add(&cs, x, &cx) || cont_add(&cs, w, &cw) || cont_add(&cs, scale, &csc) || cont_add(&cs, shift, &csh))
    goto done;
  if (new_like(y, x, 4, ys)) goto done;
  rc = fn(y, cx, cw, csc, csh, relu, win);
  if (rc) fl_tensor_free(y);
done:
  cont_free(&cs);
  return rc ? fl_fail_prefix(op) : 0;
}

int fl_conv2d_forward(fl_tensor *y, const fl_tensor *x, const fl_tensor *w, const fl_tensor *scale,
                      const fl_tensor *shift, int relu, const fl_window *win) {
  return conv_forward_any("conv2d_forward", 0, y, x, w, scale, shift, relu, win);
}

int fl_depthwise_forward(fl_tensor *y, const fl_tensor *x, const fl_tensor *w, const fl_tensor *scale,
                         const fl_tensor *shift, int relu, const fl_window *win) {
  return conv_forward_any("depthwise_forward", 1, y, x, w, scale, shift, relu, win);
}

static int conv_backward_data_any(const char *op, int depthwise, fl_tensor *gx, const fl_tensor *gy,
                                  const fl_tensor *w, const int64_t *xshape, const fl_window *win) {
  const struct fl_nn_ops *ops =
      depthwise ? NN_OPS(op, gy, depthwise_backward_data) : NN_OPS(op, gy, conv2d_backward_data);
  int64_t ys[4];
  if (!ops || check_arg(op, "gradOutput", gy, 4, NULL) || check_arg(op, "kernel", w, 4, gy)) return -1;
  for (int i = 0; i < 4; i++)
    if (xshape[i] < 1) return fl_fail("%s: input shape must be positive, got dim %d = %lld", op, i + 1,
                                      (long long)xshape[i]);
  if (conv_shapes(op, NULL, xshape, w, win, depthwise, ys) || check_shape(op, "gradOutput", gy, 4, ys)) return -1;
  int (*fn)(fl_tensor *, const fl_tensor *, const fl_tensor *, const fl_window *) =
      depthwise ? ops->depthwise_backward_data : ops->conv2d_backward_data;
  cont_set cs = {0};
  const fl_tensor *cgy, *cw;
  int rc = -1;
  if (cont_add(&cs, gy, &cgy) || cont_add(&cs, w, &cw)) goto done;
  if (new_like(gx, gy, 4, xshape)) goto done;
  rc = fn(gx, cgy, cw, win);
  if (rc) fl_tensor_free(gx);
done:
  cont_free(&cs);
  return rc ? fl_fail_prefix(op) : 0;
}

int fl_conv2d_backward_data(fl_tensor *gx, const fl_tensor *gy, const fl_tensor *w, const int64_t *xshape,
                            const fl_window *win) {
  return conv_backward_data_any("conv2d_backward_data", 0, gx, gy, w, xshape, win);
}

int fl_depthwise_backward_data(fl_tensor *gx, const fl_tensor *gy, const fl_tensor *w, const int64_t *xshape,
                               const fl_window *win) {
  return conv_backward_data_any("depthwise_backward_data", 1, gx, gy, w, xshape, win);
}

typedef int (*filter_fn)(fl_tensor *, fl_tensor *, const fl_tensor *, const fl_tensor *, const fl_window *,
                         double);

/* g = beta*g + fresh (float32 g, fresh of any float dtype) */
static int accumulate(const struct fl_nn_ops *ops, fl_tensor *g, const fl_tensor *fresh, double beta) {
  const fl_backend *be = g->storage->backend;
  if (beta == 0) return be->copy(g, fresh);
  fl_tensor wide;
  if (fl_cast(&wide, fresh, g->dtype)) return -1;
  int rc = ops->axpby(g, 1, &wide, beta);
  fl_tensor_free(&wide);
  return rc;
}

/* bfloat16 x and gy: the kernel writes a fresh bfloat16 gradient (gw) and float32 bias gradient,
 * which are added to the float32 master gradients here (the kernels' bfloat16 contract: beta 0) */
static int filter_bf16(const struct fl_nn_ops *ops, filter_fn fn, fl_tensor *gw, fl_tensor *gb, const fl_tensor *x,
                       const fl_tensor *gy, const fl_window *win, double beta) {
  fl_tensor tw, tb;
  memset(&tb, 0, sizeof tb);
  /* the float32 bias gradient goes straight into gb when it is overwritten, through a temporary
   * when it accumulates */
  int gb_tmp = gb && beta != 0;
  if (new_of(&tw, x, FL_BF16, gw->ndim, gw->shape)) return -1;
  if (gb_tmp && new_of(&tb, gb, gb->dtype, 1, gb->shape)) { fl_tensor_free(&tw); return -1; }
  int rc = fn(&tw, gb_tmp ? &tb : gb, x, gy, win, 0);
  if (!rc) rc = accumulate(ops, gw, &tw, beta);
  if (!rc && gb_tmp) rc = accumulate(ops, gb, &tb, beta);
  fl_tensor_free(&tw);
  fl_tensor_free(&tb);
  return rc;
}

static int conv_backward_filter_any(const char *op, int depthwise, fl_tensor *gw, fl_tensor *gb,
                                    const fl_tensor *x, const fl_tensor *gy, const fl_window *win, double beta) {
  const struct fl_nn_ops *ops =
      depthwise ? NN_OPS(op, x, depthwise_backward_filter) : NN_OPS(op, x, conv2d_backward_filter);
  int64_t ys[4];
  if (!ops || check_arg(op, "input", x, 4, NULL) || check_arg(op, "gradOutput", gy, 4, x) ||
      check_arg_as(op, "gradKernel", gw, 4, x, param_dtype(x)))
    return -1;
  if (conv_shapes(op, x, x->shape, gw, win, depthwise, ys) || check_shape(op, "gradOutput", gy, 4, ys)) return -1;
  if (!fl_tensor_is_contiguous(gw)) return fl_fail("%s: gradKernel must be contiguous", op);
  if (gb) {
    if (check_vec(op, "gradBias", gb, ys[3], x)) return -1;
    if (!fl_tensor_is_contiguous(gb)) return fl_fail("%s: gradBias must be contiguous", op);
  }
  filter_fn fn = depthwise ? ops->depthwise_backward_filter : ops->conv2d_backward_filter;
  cont_set cs = {0};
  const fl_tensor *cx, *cgy;
  int rc = -1;
  if (cont_add(&cs, x, &cx) || cont_add(&cs, gy, &cgy)) goto done;
  rc = x->dtype == FL_BF16 ? filter_bf16(ops, fn, gw, gb, cx, cgy, win, beta) : fn(gw, gb, cx, cgy, win, beta);
done:
  cont_free(&cs);
  return rc ? fl_fail_prefix(op) : 0;
}

int fl_conv2d_backward_filter_into(fl_tensor *gw, fl_tensor *gb, const fl_tensor *x, const fl_tensor *gy,
                                   const fl_window *win, double beta) {
  return conv_backward_filter_any("conv2d_backward_filter", 0, gw, gb, x, gy, win, beta);
}

int fl_depthwise_backward_filter_into(fl_tensor *gw, fl_tensor *gb, const fl_tensor *x, const fl_tensor *gy,
                                      const fl_window *win, double beta) {
  return conv_backward_filter_any("depthwise_backward_filter", 1, gw, gb, x, gy, win, beta);
}

/* ---- pooling ---- */

static int pool_shapes(const char *op, const fl_tensor *x, fl_pool_kind kind, const fl_window *win,
                       int64_t *ys) {
  if (kind != FL_POOL_MAX && kind != FL_POOL_AVG) return fl_fail("%s: unknown pooling kind %d", op, (int)kind);
  if (check_window(op, win)) return -1;
  if (fl_window_out(win, op, x->shape[1], x->shape[2], &ys[1], &ys[2])) return -1;
  ys[0] = x->shape[0]; ys[3] = x->shape[3];
  return 0;
}

int fl_pool2d_forward(fl_tensor *y, fl_tensor *argmax, const fl_tensor *x, fl_pool_kind kind, const fl_window *win) {
  const char *op = kind == FL_POOL_AVG ? "avg_pool2d" : "max_pool2d";
  const struct fl_nn_ops *ops = NN_OPS(op, x, pool2d_forward);
  int64_t ys[4];
  if (!ops || check_arg(op, "input", x, 4, NULL) || pool_shapes(op, x, kind, win, ys)) return -1;
  if (argmax && kind != FL_POOL_MAX) return fl_fail("%s: argmax is for max pooling only", op);
  if (argmax && x->shape[1] * x->shape[2] * x->shape[3] > INT32_MAX)
    return fl_fail("%s: an image of %lld values is too large for int32 argmax positions", op,
                   (long long)(x->shape[1] * x->shape[2] * x->shape[3]));
  cont_set cs = {0};
  const fl_tensor *cx;
  int rc = -1;
  if (cont_add(&cs, x, &cx)) goto done;
  if (new_like(y, x, 4, ys)) goto done;
  if (argmax && fl_tensor_init(argmax, x->storage->backend, x->storage->device, FL_I32, 4, ys)) {
    fl_tensor_free(y);
    goto done;
  }
  rc = ops->pool2d_forward(y, argmax, cx, kind, win);
  if (rc) { fl_tensor_free(y); if (argmax) fl_tensor_free(argmax); }
done:
  cont_free(&cs);
  return rc ? fl_fail_prefix(op) : 0;
}

int fl_pool2d_backward(fl_tensor *gx, const fl_tensor *gy, const fl_tensor *x, const fl_tensor *argmax,
                       const int64_t *xshape, fl_pool_kind kind, const fl_window *win) {
  const char *op = kind == FL_POOL_AVG ? "avg_pool2d_backward" : "max_pool2d_backward";
  const struct fl_nn_ops *ops = NN_OPS(op, gy, pool2d_backward);
  int64_t ys[4];
  if (!ops || check_arg(op, "gradOutput", gy, 4, NULL)) return -1;
  if (kind == FL_POOL_MAX && !x && !argmax) return fl_fail("%s: max pooling needs the input or its argmax", op);
  if (kind != FL_POOL_MAX) x = argmax = NULL;
  if (argmax) x = NULL;
  if (x) {
    if (check_arg(op, "input", x, 4, gy)) return -1;
    xshape = x->shape;
  }
  for (int i = 0; i < 4; i++)
    if (xshape[i] < 1) return fl_fail("%s: input shape must be positive, got dim %d = %lld", op, i + 1,
                                      (long long)xshape[i]);
  fl_tensor shape_only = {0};
  shape_only.ndim = 4;
  memcpy(shape_only.shape, xshape, sizeof(int64_t) * 4);
  if (pool_shapes(op, &shape_only, kind, win, ys) || check_shape(op, "gradOutput", gy, 4, ys)) return -1;
  if (argmax) {
    if (!argmax->storage || argmax->dtype != FL_I32) return fl_fail("%s: argmax must be an int32 tensor", op);
    if (check_shape(op, "argmax", argmax, 4, ys)) return -1;
  }
  cont_set cs = {0};
  const fl_tensor *cx, *cgy, *ca;
  int rc = -1;
  if (cont_add(&cs, x, &cx) || cont_add(&cs, gy, &cgy) || cont_add(&cs, argmax, &ca)) goto done;
  if (new_like(gx, gy, 4, xshape)) goto done;
  rc = ops->pool2d_backward(gx, cgy, cx, ca, kind, win);
  if (rc) fl_tensor_free(gx);
done:
  cont_free(&cs);
  return rc ? fl_fail_prefix(op) : 0;
}

/* ---- batch normalisation ---- */

static int check_channels_last(const char *op, const fl_tensor *x) {
  if (check_arg(op, "input", x, -1, NULL)) return -1;
  if (x->ndim < 2) return fl_fail("%s: input must have at least 2 dims (..., C), got %d", op, x->ndim);
  return 0;
}

int fl_batchnorm_forward_train(fl_tensor *y, fl_tensor *mean, fl_tensor *invstd, const fl_tensor *x,
                               const fl_tensor *gamma, const fl_tensor *beta, fl_tensor *running_mean,
                               fl_tensor *running_var, double momentum, double eps, int unbiased, int relu) {
  const char *op = "batchnorm_forward";
  const struct fl_nn_ops *ops = NN_OPS(op, x, batchnorm_forward_train);
  if (!ops || check_channels_last(op, x)) return -1;
  int64_t c = x->shape[x->ndim - 1];
  if (check_vec(op, "gamma", gamma, c, x) || check_vec(op, "beta", beta, c, x) ||
      check_vec(op, "moving_mean", running_mean, c, x) || check_vec(op, "moving_variance", running_var, c, x))
    return -1;
  if ((running_mean == NULL) != (running_var == NULL))
    return fl_fail("%s: give both moving_mean and moving_variance or neither", op);
  if ((running_mean && !fl_tensor_is_contiguous(running_mean)) || (running_var && !fl_tensor_is_contiguous(running_var)))
    return fl_fail("%s: moving statistics must be contiguous", op);
  if (!(eps > 0)) return fl_fail("%s: epsilon must be positive, got %g", op, eps);
  if (!(momentum >= 0 && momentum <= 1)) return fl_fail("%s: momentum must be in [0,1], got %g", op, momentum);
  if (fl_tensor_numel(x) / c < 1) return fl_fail("%s: input has no rows to normalise", op);
  cont_set cs = {0};
  const fl_tensor *cx, *cg, *cb;
  int rc = -1;
  if (cont_add(&cs, x, &cx) || cont_add(&cs, gamma, &cg) || cont_add(&cs, beta, &cb)) goto done;
  if (new_like(y, x, x->ndim, x->shape)) goto done;
  if (new_of(mean, x, param_dtype(x), 1, &c)) { fl_tensor_free(y); goto done; }
  if (new_of(invstd, x, param_dtype(x), 1, &c)) { fl_tensor_free(y); fl_tensor_free(mean); goto done; }
  rc = ops->batchnorm_forward_train(y, mean, invstd, cx, cg, cb, running_mean, running_var, momentum, eps,
                                    unbiased, relu);
  if (rc) { fl_tensor_free(y); fl_tensor_free(mean); fl_tensor_free(invstd); }
done:
  cont_free(&cs);
  return rc ? fl_fail_prefix(op) : 0;
}

int fl_batchnorm_backward(fl_tensor *gx, fl_tensor *ggamma, fl_tensor *gbeta, const fl_tensor *x,
                          const fl_tensor *gy, const fl_tensor *mean, const fl_tensor *invstd,
                          const fl_tensor *gamma, int training, double beta_acc, const fl_tensor *relu_y) {
  const char *op = "batchnorm_backward";
  const struct fl_nn_ops *ops = NN_OPS(op, x, batchnorm_backward);
  if (!ops || check_channels_last(op, x) || check_arg(op, "gradOutput", gy, -1, x)) return -1;
  if (!fl_tensor_same_shape(x, gy)) return check_shape(op, "gradOutput", gy, x->ndim, x->shape);
  int64_t c = x->shape[x->ndim - 1];
  if (check_vec(op, "mean", mean, c, x) || check_vec(op, "invstd", invstd, c, x) ||
      check_vec(op, "gamma", gamma, c, x) || check_vec(op, "gradGamma", ggamma, c, x) ||
      check_vec(op, "gradBeta", gbeta, c, x))
    return -1;
  if (!mean || !invstd) return fl_fail("%s: mean and invstd are required", op);
  if (relu_y) {
    if (check_arg(op, "relu output", relu_y, -1, x)) return -1;
    if (!fl_tensor_same_shape(relu_y, x)) return check_shape(op, "relu output", relu_y, x->ndim, x->shape);
  }
  if ((ggamma && !fl_tensor_is_contiguous(ggamma)) || (gbeta && !fl_tensor_is_contiguous(gbeta)))
    return fl_fail("%s: gradGamma/gradBeta must be contiguous", op);
  cont_set cs = {0};
  const fl_tensor *cx, *cgy, *cm, *ci, *cg, *cr;
  int rc = -1;
  if (cont_add(&cs, x, &cx) || cont_add(&cs, gy, &cgy) || cont_add(&cs, mean, &cm) ||
      cont_add(&cs, invstd, &ci) || cont_add(&cs, gamma, &cg) || cont_add(&cs, relu_y, &cr))
    goto done;
  if (gx && new_like(gx, x, x->ndim, x->shape)) goto done;
  rc = ops->batchnorm_backward(gx, ggamma, gbeta, cx, cgy, cm, ci, cg, training, beta_acc, cr);
  if (rc && gx) fl_tensor_free(gx);
done:
  cont_free(&cs);
  return rc ? fl_fail_prefix(op) : 0;
}

/* ---- elementwise helpers ---- */

int fl_add_act_into(fl_tensor *y, const fl_tensor *a, const fl_tensor *b, double scale, int relu) {
  const char *op = "add_act";
  const struct fl_nn_ops *ops = NN_OPS(op, a, add_act);
  if (!ops || check_arg(op, "a", a, -1, NULL) || check_arg(op, "b", b, -1, a)) return -1;
  if (!fl_tensor_same_shape(a, b)) return check_shape(op, "b", b, a->ndim, a->shape);
  if (check_out(op, "output", y, a->ndim, a->shape, a)) return -1;
  if ((y != a && fl_tensor_partial_overlap(y, a)) || (y != b && fl_tensor_partial_overlap(y, b)))
    return fl_fail("%s: output partially overlaps an input", op);
  cont_set cs = {0};
  const fl_tensor *ca, *cb;
  int rc = -1;
  if (cont_add(&cs, a, &ca) || cont_add(&cs, b, &cb)) goto done;
  rc = ops->add_act(y, ca, cb, scale, relu);
done:
  cont_free(&cs);
  return rc ? fl_fail_prefix(op) : 0;
}

int fl_add_act(fl_tensor *y, const fl_tensor *a, const fl_tensor *b, double scale, int relu) {
  if (check_arg("add_act", "a", a, -1, NULL)) return -1;
  if (new_like(y, a, a->ndim, a->shape)) return -1;
  if (fl_add_act_into(y, a, b, scale, relu)) { fl_tensor_free(y); return -1; }
  return 0;
}

int fl_channel_affine_into(fl_tensor *y, const fl_tensor *x, const fl_tensor *scale, const fl_tensor *shift,
                           int relu) {
  const char *op = "channel_affine";
  const struct fl_nn_ops *ops = NN_OPS(op, x, channel_affine);
  if (!ops || check_channels_last(op, x) || check_out(op, "output", y, x->ndim, x->shape, x)) return -1;
  int64_t c = x->shape[x->ndim - 1];
  if (check_vec(op, "scale", scale, c, x) || check_vec(op, "shift", shift, c, x)) return -1;
  if (y != x && fl_tensor_partial_overlap(y, x)) return fl_fail("%s: output partially overlaps the input", op);
  cont_set cs = {0};
  const fl_tensor *cx, *csc, *csh;
  int rc = -1;
  if (cont_add(&cs, x, &cx) || cont_add(&cs, scale, &csc) || cont_add(&cs, shift, &csh)) goto done;
  rc = ops->channel_affine(y, cx, csc, csh, relu);
done:
  cont_free(&cs);
  return rc ? fl_fail_prefix(op) : 0;
}

int fl_channel_affine(fl_tensor *y, const fl_tensor *x, const fl_tensor *scale, const fl_tensor *shift, int relu) {
  if (check_channels_last("channel_affine", x)) return -1;
  if (new_like(y, x, x->ndim, x->shape)) return -1;
  if (fl_channel_affine_into(y, x, scale, shift, relu)) { fl_tensor_free(y); return -1; }
  return 0;
}

int fl_act_backward(fl_act_kind act, fl_tensor *gx, const fl_tensor *gy, const fl_tensor *y) {
  const char *op = "activation_backward";
  const struct fl_nn_ops *ops = NN_OPS(op, y, act_backward);
  if (!ops || check_arg(op, "output", y, -1, NULL) || check_arg(op, "gradOutput", gy, -1, y)) return -1;
  if (act < FL_ACT_RELU || act > FL_ACT_SOFTMAX) return fl_fail("%s: unknown activation %d", op, (int)act);
  if (!fl_tensor_same_shape(y, gy)) return check_shape(op, "gradOutput", gy, y->ndim, y->shape);
  if (act == FL_ACT_SOFTMAX && y->ndim < 1) return fl_fail("%s: softmax needs at least 1 dim", op);
  cont_set cs = {0};
  const fl_tensor *cy, *cgy;
  int rc = -1;
  if (cont_add(&cs, y, &cy) || cont_add(&cs, gy, &cgy)) goto done;
  if (new_like(gx, y, y->ndim, y->shape)) goto done;
  rc = ops->act_backward(act, gx, cgy, cy);
  if (rc) fl_tensor_free(gx);
done:
  cont_free(&cs);
  return rc ? fl_fail_prefix(op) : 0;
}

int fl_softmax_xent(fl_tensor *loss, fl_tensor *grad, const fl_tensor *logits, const fl_tensor *target,
                    double smoothing, double grad_scale) {
  const char *op = "softmax_cross_entropy";
  char a[128], b[128];
  const struct fl_nn_ops *ops = NN_OPS(op, logits, softmax_xent);
  if (!ops || check_wide(op, "logits", logits) || check_arg(op, "logits", logits, 2, NULL)) return -1;
  if (!target->storage) return fl_fail("%s: target is empty (freed)", op);
  if (target->storage->backend != logits->storage->backend)
    return fl_fail("%s: target is on %s, logits on %s", op, target->storage->backend->name,
                   logits->storage->backend->name);
  int64_t n = logits->shape[0], k = logits->shape[1];
  if (k < 1) return fl_fail("%s: logits need at least one class", op);
  fl_shape_str(a, sizeof a, logits->ndim, logits->shape);
  fl_shape_str(b, sizeof b, target->ndim, target->shape);
  if (target->dtype == FL_I32 || target->dtype == FL_I64) {
    if (target->ndim != 1 || target->shape[0] != n)
      return fl_fail("%s: integer labels must have shape [%lld] for logits %s, got %s", op, (long long)n, a, b);
  } else if (target->dtype == logits->dtype) {
    if (!fl_tensor_same_shape(target, logits))
      return fl_fail("%s: target probabilities must have the logits' shape %s, got %s", op, a, b);
  } else {
    return fl_fail("%s: target must be int32/int64 labels or %s probabilities, got %s", op,
                   fl_dtype_name(logits->dtype), fl_dtype_name(target->dtype));
  }
  if (!(smoothing >= 0 && smoothing <= 1)) return fl_fail("%s: label smoothing must be in [0,1], got %g", op, smoothing);
  cont_set cs = {0};
  const fl_tensor *cl, *ct;
  int rc = -1;
  if (cont_add(&cs, logits, &cl) || cont_add(&cs, target, &ct)) goto done;
  if (new_like(loss, logits, 1, &n)) goto done;
  if (grad && new_like(grad, logits, 2, logits->shape)) { fl_tensor_free(loss); goto done; }
  rc = ops->softmax_xent(loss, grad, cl, ct, smoothing, grad_scale);
  if (rc) { fl_tensor_free(loss); if (grad) fl_tensor_free(grad); }
done:
  cont_free(&cs);
  return rc ? fl_fail_prefix(op) : 0;
}

/* ---- optimizer kernels ---- */

/* t is a live, contiguous float32/float64 tensor with ref's shape and dtype (ref NULL: either) */
static int check_same(const char *op, const char *name, const fl_tensor *t, const fl_tensor *ref) {
  if (ref ? check_arg(op, name, t, -1, ref) : check_wide(op, name, t)) return -1;
  if (!fl_tensor_is_contiguous(t)) return fl_fail("%s: %s must be contiguous", op, name);
  if (ref && !fl_tensor_same_shape(t, ref)) return check_shape(op, name, t, ref->ndim, ref->shape);
  return 0;
}

int fl_axpby(fl_tensor *y, double a, const fl_tensor *x, double b) {
  const char *op = "axpby";
  const struct fl_nn_ops *ops = NN_OPS(op, y, axpby);
  if (!ops || check_same(op, "y", y, NULL) || check_same(op, "x", x, y)) return -1;
  if (x != y && fl_tensor_partial_overlap(y, x)) return fl_fail("%s: x partially overlaps y", op);
  return ops->axpby(y, a, x, b) ? fl_fail_prefix(op) : 0;
}

int fl_sumsq(const fl_tensor *x, double *out) {
  const char *op = "sumsq";
  const struct fl_nn_ops *ops = NN_OPS(op, x, sumsq);
  if (!ops || check_same(op, "x", x, NULL)) return -1;
  return ops->sumsq(x, out) ? fl_fail_prefix(op) : 0;
}

int fl_sgd_step(fl_tensor *w, const fl_tensor *g, fl_tensor *m, double lr, double momentum, int nesterov) {
  const char *op = "sgd_step";
  const struct fl_nn_ops *ops = NN_OPS(op, w, sgd_step);
  if (!ops || check_same(op, "weight", w, NULL) || check_same(op, "gradient", g, w)) return -1;
  if (m && check_same(op, "momentum", m, w)) return -1;
  if (!m && momentum != 0) return fl_fail("%s: momentum %g needs a momentum buffer", op, momentum);
  return ops->sgd_step(w, g, m, lr, momentum, nesterov) ? fl_fail_prefix(op) : 0;
}

int fl_adam_step(fl_tensor *w, const fl_tensor *g, fl_tensor *m, fl_tensor *v, double alpha, double beta1,
                 double beta2, double eps) {
  const char *op = "adam_step";
  const struct fl_nn_ops *ops = NN_OPS(op, w, adam_step);
  if (!ops || check_same(op, "weight", w, NULL) || check_same(op, "gradient", g, w) ||
      check_same(op, "m", m, w) || check_same(op, "v", v, w))
    return -1;
  return ops->adam_step(w, g, m, v, alpha, beta1, beta2, eps) ? fl_fail_prefix(op) : 0;
}
