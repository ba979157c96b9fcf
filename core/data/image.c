/* JPEG decoding/encoding and resampling for the data pipeline. See image.h for the pipeline. */
#include <errno.h>
#include <limits.h>
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <jpeglib.h>
#include <jerror.h>

#include "image.h"
#include "tensor.h"

/* Hot loops: let GCC vectorise them even at -O2. */
#define FL_HOT __attribute__((optimize("O3")))

static const char *status_names[FL_IMG_NSTATUS] = {
  "ok", "missing", "io", "empty", "not_jpeg", "truncated", "corrupt", "too_large", "nomem", "bad_arg",
  "not_file",
};

const char *fl_img_status_name(int s) {
  return (s >= 0 && s < FL_IMG_NSTATUS) ? status_names[s] : "unknown";
}

static const char *filter_names[FL_NFILTERS] = { "box", "bilinear", "bicubic", "lanczos" };

const char *fl_filter_name(int f) { return (f >= 0 && f < FL_NFILTERS) ? filter_names[f] : "unknown"; }

int fl_filter_from_name(const char *name) {
  for (int i = 0; i < FL_NFILTERS; i++)
    if (strcmp(name, filter_names[i]) == 0) return i;
  return -1;
}

/* Records the reason of a failure the way the rest of core does (fl_fail: a thread-local message,
 * so loader workers fail without racing; fl_fail_oom when out of memory) and returns `status`. */
static int fail(int status, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static int fail(int status, const char *fmt, ...) {
  char buf[400];
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(buf, sizeof buf, fmt, ap);
  va_end(ap);
  if (status == FL_IMG_NOMEM) fl_fail_oom("%s", buf);
  else fl_fail("%s", buf);
  return status;
}

/* ------------------------------------------------------------------------------------------------
 * Images and random numbers */

void fl_image_free(fl_image *im) {
  free(im->data);
  im->data = NULL;
  im->cap = 0;
  im->w = im->h = 0;
}

int fl_image_reserve(fl_image *im, int w, int h) {
  size_t need = (size_t)w * (size_t)h * 3;
  if (need > im->cap) {
    uint8_t *p = realloc(im->data, need);
    if (!p) return -1;
    im->data = p;
    im->cap = need;
  }
  im->w = w;
  im->h = h;
  return 0;
}

uint64_t fl_rng_next(uint64_t *state) {
  uint64_t z = (*state += 0x9E3779B97F4A7C15ull);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

double fl_rng_uniform(uint64_t *state) { return (double)(fl_rng_next(state) >> 11) * 0x1.0p-53; }

uint64_t fl_rng_below(uint64_t *state, uint64_t n) {
  /* reject the top partial block so every residue is equally likely */
  uint64_t limit = UINT64_MAX - UINT64_MAX % n;
  uint64_t x;
  do x = fl_rng_next(state); while (x >= limit);
  return x % n;
}

uint64_t fl_rng_sample_seed(uint64_t seed, int64_t epoch, int64_t index) {
  /* three rounds of the splitmix output mix, each folding in one coordinate */
  uint64_t s = seed;
  uint64_t a = fl_rng_next(&s);
  s = a ^ (uint64_t)epoch;
  uint64_t b = fl_rng_next(&s);
  s = b ^ (uint64_t)index;
  return fl_rng_next(&s);
}

/* ------------------------------------------------------------------------------------------------
 * Resampling. The coefficients are computed exactly as Pillow's Resample.c computes them
 * (precompute_coeffs / normalize_coeffs_8bpc), written here from its documented behaviour:
 *   scale = (in1 - in0) / out; filterscale = max(scale, 1); support = filter_support * filterscale
 *   for each output pixel xx: center = in0 + (xx + 0.5) * scale,
 *     taps x in [max(int(center - support + 0.5), 0), min(int(center + support + 0.5), in)),
 *     weight filter((x - center + 0.5) / filterscale), normalised to sum 1,
 *   then rounded to fixed point with 22 fractional bits; sums start at 1/2 and are clipped to 0..255.
 * The horizontal pass runs first, over only the rows the vertical pass will read, and stores 8 bits.
 * Like Pillow, the box's coordinates are single precision and their difference is taken in single
 * precision: with the box filter a tap sits exactly on the edge of the support often enough that
 * the last bit decides whether it is in. */

#define PRECISION_BITS (32 - 8 - 2)

static double filter_box(double x) { return (x > -0.5 && x <= 0.5) ? 1.0 : 0.0; }
static double filter_bilinear(double x) {
  if (x < 0) x = -x;
  return x < 1.0 ? 1.0 - x : 0.0;
}
static double filter_bicubic(double x) {
  const double a = -0.5;
  if (x < 0) x = -x;
  if (x < 1.0) return ((a + 2.0) * x - (a + 3.0)) * x * x + 1;
  if (x < 2.0) return (((x - 5) * x + 8) * x - 4) * a;
  return 0.0;
}
static double sinc(double x) {
  if (x == 0.0) return 1.0;
  x *= M_PI;
  return sin(x) / x;
}
static double filter_lanczos(double x) {
  if (-3.0 <= x && x < 3.0) return sinc(x) * sinc(x / 3);
  return 0.0;
}

static const struct { double (*fn)(double); double support; } filters[FL_NFILTERS] = {
  { filter_box, 0.5 }, { filter_bilinear, 1.0 }, { filter_bicubic, 2.0 }, { filter_lanczos, 3.0 },
};

struct fl_resize_ws {
  double *pre; size_t precap;       /* float weights, one axis at a time */
  int32_t *kh, *kv; size_t khcap, kvcap;
  int *bh, *bv; size_t bhcap, bvcap;
  uint8_t *tmp; size_t tmpcap;      /* transposed source columns */
  uint8_t *tmp2; size_t tmp2cap;    /* horizontal pass output, transposed */
  uint8_t *tmp3; size_t tmp3cap;    /* horizontal pass output */
  int32_t *acc; size_t acccap;      /* vertical pass accumulators, one output row */
};

fl_resize_ws *fl_resize_ws_new(void) { return calloc(1, sizeof(fl_resize_ws)); }

void fl_resize_ws_free(fl_resize_ws *ws) {
  if (!ws) return;
  free(ws->pre); free(ws->kh); free(ws->kv); free(ws->bh); free(ws->bv);
  free(ws->tmp); free(ws->tmp2); free(ws->tmp3); free(ws->acc);
  free(ws);
}

static int grow(void **p, size_t *cap, size_t need) {
  if (need <= *cap) return 0;
  void *q = realloc(*p, need);
  if (!q) return -1;
  *p = q;
  *cap = need;
  return 0;
}

/* Coefficients for one axis: returns ksize (> 0) or -1 when out of memory. bounds[2*xx] is the
 * first tap, bounds[2*xx+1] the number of taps, in source coordinates of a size-`in` axis. */
static int precompute_coeffs(fl_resize_ws *ws, int in, float in0, float in1, int out, fl_filter f,
                             int **bounds, size_t *bcap, int32_t **kk, size_t *kcap) {
  double scale = (double)(in1 - in0) / out;
  double filterscale = scale < 1.0 ? 1.0 : scale;
  double support = filters[f].support * filterscale;
  int ksize = (int)ceil(support) * 2 + 1;
  if (grow((void **)&ws->pre, &ws->precap, (size_t)out * ksize * sizeof(double)) ||
      grow((void **)bounds, bcap, (size_t)out * 2 * sizeof(int)) ||
      grow((void **)kk, kcap, (size_t)out * ksize * sizeof(int32_t)))
    return -1;
  double *pre = ws->pre;
  int *b = *bounds;
  for (int xx = 0; xx < out; xx++) {
    double center = in0 + (xx + 0.5) * scale;
    double ww = 0.0, ss = 1.0 / filterscale;
    int xmin = (int)(center - support + 0.5);
    if (xmin < 0) xmin = 0;
    int xmax = (int)(center + support + 0.5);
    if (xmax > in) xmax = in;
    xmax -= xmin;
    double *k = pre + (size_t)xx * ksize;
    int x;
    for (x = 0; x < xmax; x++) {
      double w = filters[f].fn((x + xmin - center + 0.5) * ss);
      k[x] = w;
      ww += w;
    }
    for (x = 0; x < xmax; x++)
      if (ww != 0.0) k[x] /= ww;
    for (; x < ksize; x++) k[x] = 0;
    b[xx * 2] = xmin;
    b[xx * 2 + 1] = xmax;
  }
  int32_t *q = *kk;
  for (size_t i = 0; i < (size_t)out * ksize; i++)
    q[i] = pre[i] < 0 ? (int32_t)(-0.5 + pre[i] * (1 << PRECISION_BITS))
                      : (int32_t)(0.5 + pre[i] * (1 << PRECISION_BITS));
  return ksize;
}

static inline uint8_t clip8(int32_t v) {
  if (v >= (1 << PRECISION_BITS << 8)) return 255;
  if (v <= 0) return 0;
  return (uint8_t)(v >> PRECISION_BITS);
}

/* dst (w rows of h pixels) = src (h rows of w pixels) transposed; 3-byte pixels, in 16x16 blocks
 * so that both sides stay in cache. Pixels move as 4-byte words (twice as fast as bytes), except
 * the last source column (whose 4th byte may lie past the buffer) and the last pixel of each
 * destination row (whose 4th byte would land on the next row). */
FL_HOT static void transpose3(uint8_t *dst, size_t dstride, const uint8_t *src, size_t sstride, int w, int h) {
  enum { B = 16 };
  for (int y0 = 0; y0 < h; y0 += B)
    for (int x0 = 0; x0 < w; x0 += B) {
      int y1 = y0 + B < h ? y0 + B : h, x1 = x0 + B < w ? x0 + B : w;
      for (int x = x0; x < x1; x++) {
        uint8_t *d = dst + (size_t)x * dstride + (size_t)y0 * 3;
        const uint8_t *p = src + (size_t)y0 * sstride + (size_t)x * 3;
        int yw = (x == w - 1 || y1 == h) ? y1 - 1 : y1;  /* rows moved as words */
        int y = y0;
        for (; y < yw; y++, d += 3, p += sstride) {
          uint32_t v;
          memcpy(&v, p, 4);
          memcpy(d, &v, 4);
        }
        for (; y < y1; y++, d += 3, p += sstride) {
          d[0] = p[0];
          d[1] = p[1];
          d[2] = p[2];
        }
      }
    }
}

/* One pass along the rows: output row yy = sum over its taps of whole source rows times the
 * tap's weight (rowbytes bytes each, any channel layout). Both passes of the resampler use it --
 * the horizontal one on a transposed copy -- because summing whole rows vectorises (an AVX2 clone
 * is picked at run time where the CPU has it). Integer sums, so the order changes nothing. */
__attribute__((target_clones("avx2", "default")))
FL_HOT static void resample_v(uint8_t *dst, size_t dstride, int dh, int rowbytes, const uint8_t *src,
                              size_t sstride, int ksize, const int *b, const int32_t *kk, int32_t *acc) {
  for (int yy = 0; yy < dh; yy++) {
    const int32_t *k = kk + (size_t)yy * ksize;
    int ymin = b[2 * yy], n = b[2 * yy + 1];
    for (int i = 0; i < rowbytes; i++) acc[i] = 1 << (PRECISION_BITS - 1);
    for (int y = 0; y < n; y++) {
      const uint8_t *row = src + (size_t)(ymin + y) * sstride;
      int32_t w = k[y];
      for (int i = 0; i < rowbytes; i++) acc[i] += row[i] * w;
    }
    uint8_t *o = dst + (size_t)yy * dstride;
    for (int i = 0; i < rowbytes; i++) o[i] = clip8(acc[i]);
  }
}

/* The general form: src holds the window [wx, wx + ww) x [wy, wy + wh) of a virtual image of
 * size vw x vh; box and the filter taps are in virtual coordinates, and every tap must fall
 * inside the window. Used by the decoder to resample a partially decoded image. */
static int resize_window(fl_resize_ws *ws, const uint8_t *src, int vw, int vh, size_t sstride,
                         int wx, int wy, int ww, int wh, const double box[4],
                         uint8_t *dst, int dw, int dh, size_t dstride, fl_filter f) {
  if (dw <= 0 || dh <= 0 || f < 0 || f >= FL_NFILTERS) return FL_IMG_BAD_ARG;
  if (!(box[0] >= 0 && box[1] >= 0 && box[2] <= vw && box[3] <= vh && box[0] < box[2] && box[1] < box[3]))
    return FL_IMG_BAD_ARG;
  int need_h = dw != vw || (float)box[0] != 0 || (float)box[2] != dw;
  int need_v = dh != vh || (float)box[1] != 0 || (float)box[3] != dh;
  int kh = precompute_coeffs(ws, vw, (float)box[0], (float)box[2], dw, f, &ws->bh, &ws->bhcap, &ws->kh, &ws->khcap);
  if (kh < 0) return FL_IMG_NOMEM;
  int kv = precompute_coeffs(ws, vh, (float)box[1], (float)box[3], dh, f, &ws->bv, &ws->bvcap, &ws->kv, &ws->kvcap);
  if (kv < 0) return FL_IMG_NOMEM;
  int y_first = ws->bv[0], y_last = ws->bv[2 * dh - 2] + ws->bv[2 * dh - 1];
  int x_first = ws->bh[0], x_last = ws->bh[2 * dw - 2] + ws->bh[2 * dw - 1];
  if (!need_h) { x_first = (int)box[0]; x_last = x_first + dw; }
  if (!need_v) { y_first = (int)box[1]; y_last = y_first + dh; }
  if (x_first < wx || x_last > wx + ww || y_first < wy || y_last > wy + wh) return FL_IMG_BAD_ARG;
  const uint8_t *s = src + (size_t)(y_first - wy) * sstride + (size_t)(x_first - wx) * 3;
  size_t s_stride = sstride;
  if (need_h) {
    /* horizontal pass: transpose the columns the taps read, resample those rows, transpose back */
    int rows = need_v ? y_last - y_first : dh, cols = x_last - x_first;
    size_t acc_n = (size_t)(rows > dw ? rows : dw) * 3;
    if (grow((void **)&ws->tmp, &ws->tmpcap, (size_t)cols * rows * 3) ||
        grow((void **)&ws->tmp2, &ws->tmp2cap, (size_t)dw * rows * 3) ||
        grow((void **)&ws->acc, &ws->acccap, acc_n * sizeof(int32_t)))
      return FL_IMG_NOMEM;
    for (int i = 0; i < dw; i++) ws->bh[2 * i] -= x_first;
    transpose3(ws->tmp, (size_t)rows * 3, s, sstride, cols, rows);
    resample_v(ws->tmp2, (size_t)rows * 3, dw, rows * 3, ws->tmp, (size_t)rows * 3, kh, ws->bh, ws->kh, ws->acc);
    if (!need_v) {
      transpose3(dst, dstride, ws->tmp2, (size_t)rows * 3, rows, dw);
      return 0;
    }
    if (grow((void **)&ws->tmp3, &ws->tmp3cap, (size_t)rows * dw * 3)) return FL_IMG_NOMEM;
    transpose3(ws->tmp3, (size_t)dw * 3, ws->tmp2, (size_t)rows * 3, rows, dw);
    s = ws->tmp3;
    s_stride = (size_t)dw * 3;
  }
  if (need_v) {
    for (int i = 0; i < dh; i++) ws->bv[2 * i] -= y_first;
    if (grow((void **)&ws->acc, &ws->acccap, (size_t)dw * 3 * sizeof(int32_t))) return FL_IMG_NOMEM;
    resample_v(dst, dstride, dh, dw * 3, s, s_stride, kv, ws->bv, ws->kv, ws->acc);
  } else {
    for (int y = 0; y < dh; y++) memcpy(dst + (size_t)y * dstride, s + (size_t)y * s_stride, (size_t)dw * 3);
  }
  return 0;
}

int fl_resize(fl_resize_ws *ws, const uint8_t *src, int sw, int sh, size_t sstride, const double box[4],
              uint8_t *dst, int dw, int dh, size_t dstride, fl_filter filter) {
  return resize_window(ws, src, sw, sh, sstride, 0, 0, sw, sh, box, dst, dw, dh, dstride, filter);
}

/* The source interval [lo, hi) that resampling [in0, in1) of a size-`in` axis to `out` pixels reads,
 * by the same arithmetic as precompute_coeffs (centers are increasing, so the ends suffice). */
static void taps_range(int in, float in0, float in1, int out, fl_filter f, int *lo, int *hi) {
  double scale = (double)(in1 - in0) / out;
  double filterscale = scale < 1.0 ? 1.0 : scale;
  double support = filters[f].support * filterscale;
  double c0 = in0 + 0.5 * scale, c1 = in0 + (out - 1 + 0.5) * scale;
  int a = (int)(c0 - support + 0.5), b = (int)(c1 + support + 0.5);
  *lo = a < 0 ? 0 : a;
  *hi = b > in ? in : b;
}

/* ------------------------------------------------------------------------------------------------
 * Orientation, flips and colour */

void fl_image_orient(const uint8_t *src, int sw, int sh, int o, uint8_t *dst, int *dw, int *dh) {
  int W = (o >= 5) ? sh : sw, H = (o >= 5) ? sw : sh;
  *dw = W;
  *dh = H;
  for (int y = 0; y < H; y++) {
    uint8_t *out = dst + (size_t)y * W * 3;
    for (int x = 0; x < W; x++) {
      int sx, sy;  /* stored pixel shown at displayed (x, y); see EXIF 2.3 tag 0x0112 */
      switch (o) {
        case 2: sx = sw - 1 - x; sy = y; break;
        case 3: sx = sw - 1 - x; sy = sh - 1 - y; break;
        case 4: sx = x; sy = sh - 1 - y; break;
        case 5: sx = y; sy = x; break;
        case 6: sx = y; sy = sh - 1 - x; break;
        case 7: sx = sw - 1 - y; sy = sh - 1 - x; break;
        case 8: sx = sw - 1 - y; sy = x; break;
        default: sx = x; sy = y; break;
      }
      const uint8_t *p = src + ((size_t)sy * sw + sx) * 3;
      out[3 * x] = p[0];
      out[3 * x + 1] = p[1];
      out[3 * x + 2] = p[2];
    }
  }
}

void fl_image_hflip(uint8_t *rgb, int w, int h) {
  for (int y = 0; y < h; y++) {
    uint8_t *a = rgb + (size_t)y * w * 3, *b = a + (size_t)(w - 1) * 3;
    for (; a < b; a += 3, b -= 3) {
      uint8_t t0 = a[0], t1 = a[1], t2 = a[2];
      a[0] = b[0]; a[1] = b[1]; a[2] = b[2];
      b[0] = t0; b[1] = t1; b[2] = t2;
    }
  }
}

static inline uint8_t round_clip(float v) {
  if (v <= 0.f) return 0;
  if (v >= 255.f) return 255;
  return (uint8_t)(v + 0.5f);
}

void fl_image_jitter(uint8_t *rgb, int w, int h, double brightness, double contrast, double saturation) {
  size_t n = (size_t)w * h;
  if (brightness != 1.0) {
    float b = (float)brightness;
    for (size_t i = 0; i < 3 * n; i++) rgb[i] = round_clip(rgb[i] * b);
  }
  if (contrast != 1.0 && n > 0) {
    double sum = 0;
    for (size_t i = 0; i < n; i++)
      sum += 0.299 * rgb[3 * i] + 0.587 * rgb[3 * i + 1] + 0.114 * rgb[3 * i + 2];
    float m = (float)(sum / n), c = (float)contrast;
    for (size_t i = 0; i < 3 * n; i++) rgb[i] = round_clip(m + (rgb[i] - m) * c);
  }
  if (saturation != 1.0) {
    float s = (float)saturation;
    for (size_t i = 0; i < n; i++) {
      uint8_t *p = rgb + 3 * i;
      float g = 0.299f * p[0] + 0.587f * p[1] + 0.114f * p[2];
      p[0] = round_clip(g + (p[0] - g) * s);
      p[1] = round_clip(g + (p[1] - g) * s);
      p[2] = round_clip(g + (p[2] - g) * s);
    }
  }
}

/* ------------------------------------------------------------------------------------------------
 * Transform parameters */

void fl_transform_defaults(fl_transform *t) {
  memset(t, 0, sizeof *t);
  t->mode = FL_TF_CENTER;
  t->out_w = t->out_h = 224;
  t->crop_frac = 0.875;
  t->scale_lo = 0.08;
  t->scale_hi = 1.0;
  t->ratio_lo = 3.0 / 4.0;
  t->ratio_hi = 4.0 / 3.0;
  t->filter = FL_FILTER_BILINEAR;
  t->dct_scaling = 1;
}

int fl_transform_check(const fl_transform *t) {
  if (t->mode < 0 || t->mode >= FL_NTF) {
    return fail(FL_IMG_BAD_ARG, "unknown transform mode %d", t->mode);
  }
  if (t->mode != FL_TF_NONE && (t->out_w < 1 || t->out_h < 1 || t->out_w > 65535 || t->out_h > 65535)) {
    return fail(FL_IMG_BAD_ARG, "output size must be 1..65535, got %dx%d", t->out_w, t->out_h);
  }
  if (t->mode == FL_TF_CENTER && !(t->crop_frac > 0 && t->crop_frac <= 1)) {
    return fail(FL_IMG_BAD_ARG, "crop_frac must be in (0, 1], got %g", t->crop_frac);
  }
  if (t->mode == FL_TF_RANDOM_RESIZED &&
      !(t->scale_lo > 0 && t->scale_lo <= t->scale_hi && t->scale_hi <= 1 && t->ratio_lo > 0 &&
        t->ratio_lo <= t->ratio_hi)) {
    return fail(FL_IMG_BAD_ARG, "random-resized crop needs 0 < scale_lo <= scale_hi <= 1 and 0 < ratio_lo <= ratio_hi, "
         "got scale %g..%g ratio %g..%g", t->scale_lo, t->scale_hi, t->ratio_lo, t->ratio_hi);
  }
  if (!(t->brightness >= 0 && t->brightness < 1 && t->contrast >= 0 && t->contrast < 1 &&
        t->saturation >= 0 && t->saturation <= 1)) {
    return fail(FL_IMG_BAD_ARG, "jitter must be brightness, contrast in [0, 1) and saturation in [0, 1], got %g, %g, %g",
         t->brightness, t->contrast, t->saturation);
  }
  if (t->filter < 0 || t->filter >= FL_NFILTERS) {
    return fail(FL_IMG_BAD_ARG, "unknown filter %d", t->filter);
  }
  if (t->none_scale < 0 || t->none_scale > 8) {
    return fail(FL_IMG_BAD_ARG, "scale must be 1..8 (eighths), got %d", t->none_scale);
  }
  return 0;
}

/* ------------------------------------------------------------------------------------------------
 * The decoder */

struct fl_jerr {
  struct jpeg_error_mgr pub;
  jmp_buf jb;
  int status;
};

struct fl_decoder {
  struct jpeg_decompress_struct cinfo;
  struct fl_jerr jerr;
  uint8_t *file; size_t filecap;
  fl_image raw;        /* decoded pixels in stored orientation (possibly a window) */
  fl_image oriented;   /* after EXIF orientation */
  uint8_t *row4; size_t row4cap; /* one CMYK row */
  fl_resize_ws *ws;
  int orientation;     /* of the image whose header was read last */
};

static void jerr_fail(j_common_ptr c, int status) {
  struct fl_jerr *e = (struct fl_jerr *)c->err;
  char buf[JMSG_LENGTH_MAX];
  (*c->err->format_message)(c, buf);
  e->status = fail(status, "%s", buf);
  longjmp(e->jb, 1);
}

static void jerr_exit(j_common_ptr c) {
  /* JERR_INPUT_EMPTY / EOF-like errors mean the data ended early */
  int code = c->err->msg_code;
  jerr_fail(c, (code == JERR_INPUT_EOF || code == JERR_INPUT_EMPTY) ? FL_IMG_TRUNCATED : FL_IMG_CORRUPT);
}

/* Warnings: libjpeg keeps decoding past damaged data (inventing gray pixels); we refuse such
 * images. Harmless warnings (extra bytes between markers, unknown JFIF revision) are ignored. */
static void jerr_emit(j_common_ptr c, int level) {
  if (level >= 0) return;  /* trace messages */
  switch (c->err->msg_code) {
    case JWRN_JPEG_EOF:
      jerr_fail(c, FL_IMG_TRUNCATED);
      break;
    case JWRN_HIT_MARKER: case JWRN_HUFF_BAD_CODE: case JWRN_MUST_RESYNC: case JWRN_NOT_SEQUENTIAL:
    case JWRN_ARITH_BAD_CODE: case JWRN_BOGUS_PROGRESSION:
      jerr_fail(c, FL_IMG_CORRUPT);
      break;
    default:
      c->err->num_warnings++;
  }
}

static void jerr_output(j_common_ptr c) { (void)c; }  /* never print */

/* jpeg_create_decompress fails (longjmp) only when out of memory; d is not a local of the
 * function that calls setjmp here, so it survives the jump. */
static int decoder_create(fl_decoder *d) {
  if (setjmp(d->jerr.jb)) {
    fl_resize_ws_free(d->ws);
    free(d);
    return 0;
  }
  jpeg_create_decompress(&d->cinfo);
  jpeg_save_markers(&d->cinfo, JPEG_APP0 + 1, 0xFFFF);  /* EXIF */
  return 1;
}

fl_decoder *fl_decoder_new(void) {
  fl_decoder *d = calloc(1, sizeof *d);
  if (!d) return NULL;
  d->ws = fl_resize_ws_new();
  if (!d->ws) { free(d); return NULL; }
  d->cinfo.err = jpeg_std_error(&d->jerr.pub);
  d->jerr.pub.error_exit = jerr_exit;
  d->jerr.pub.emit_message = jerr_emit;
  d->jerr.pub.output_message = jerr_output;
  return decoder_create(d) ? d : NULL;
}

void fl_decoder_free(fl_decoder *d) {
  if (!d) return;
  jpeg_destroy_decompress(&d->cinfo);
  free(d->file);
  fl_image_free(&d->raw);
  fl_image_free(&d->oriented);
  free(d->row4);
  fl_resize_ws_free(d->ws);
  free(d);
}


/* EXIF orientation from the APP1 markers that libjpeg saved: "Exif\0\0", then a TIFF header
 * ("II" little- or "MM" big-endian, 42, offset of IFD0), then IFD0's 12-byte entries; tag 0x0112
 * (SHORT) holds 1..8. Anything malformed counts as "no orientation". */
static int exif_orientation(j_decompress_ptr cinfo) {
  for (jpeg_saved_marker_ptr m = cinfo->marker_list; m; m = m->next) {
    if (m->marker != JPEG_APP0 + 1 || m->data_length < 14 || memcmp(m->data, "Exif\0\0", 6) != 0) continue;
    const uint8_t *t = m->data + 6;
    size_t n = m->data_length - 6;
    int le;
    if (t[0] == 'I' && t[1] == 'I') le = 1;
    else if (t[0] == 'M' && t[1] == 'M') le = 0;
    else continue;
#define U16(p) (le ? (unsigned)((p)[0] | (p)[1] << 8) : (unsigned)((p)[0] << 8 | (p)[1]))
#define U32(p) (le ? ((uint32_t)(p)[0] | (uint32_t)(p)[1] << 8 | (uint32_t)(p)[2] << 16 | (uint32_t)(p)[3] << 24) \
                   : ((uint32_t)(p)[0] << 24 | (uint32_t)(p)[1] << 16 | (uint32_t)(p)[2] << 8 | (uint32_t)(p)[3]))
    if (U16(t + 2) != 42) continue;
    uint32_t ifd = U32(t + 4);
    if (ifd > n - 2 || ifd < 8) continue;
    unsigned count = U16(t + ifd);
    for (unsigned i = 0; i < count; i++) {
      size_t e = ifd + 2 + (size_t)i * 12;
      if (e + 12 > n) break;
      if (U16(t + e) == 0x0112 && U16(t + e + 2) == 3) {
        unsigned o = U16(t + e + 8);
        return (o >= 1 && o <= 8) ? (int)o : 1;
      }
    }
#undef U16
#undef U32
  }
  return 1;
}

static int check_soi(const uint8_t *buf, size_t len) {
  if (len == 0) return fail(FL_IMG_EMPTY, "empty file (0 bytes)");
  if (len >= 2 && buf[0] == 0xFF && buf[1] == 0xD8) {
    if (len < 3) return fail(FL_IMG_TRUNCATED, "truncated: 2 bytes, the JPEG start marker and nothing after it");
    return 0;
  }
  const char *kind = "";
  if (len >= 8 && memcmp(buf, "\x89PNG\r\n\x1a\n", 8) == 0) kind = " (it is a PNG)";
  else if (len >= 6 && (memcmp(buf, "GIF87a", 6) == 0 || memcmp(buf, "GIF89a", 6) == 0)) kind = " (it is a GIF)";
  else if (len >= 2 && buf[0] == 'B' && buf[1] == 'M') kind = " (it is a BMP)";
  else if (len >= 12 && memcmp(buf, "RIFF", 4) == 0 && memcmp(buf + 8, "WEBP", 4) == 0) kind = " (it is a WebP)";
  if (len >= 2)
    return fail(FL_IMG_NOT_JPEG, "not a JPEG file: starts with bytes %02X %02X, expected FF D8%s", buf[0], buf[1], kind);
  return fail(FL_IMG_NOT_JPEG, "not a JPEG file: only 1 byte (%02X)", buf[0]);
}

static const char *file_kind(mode_t m) {
  if (S_ISDIR(m)) return "a directory";
  if (S_ISFIFO(m)) return "a FIFO";
  if (S_ISCHR(m)) return "a character device";
  if (S_ISBLK(m)) return "a block device";
  if (S_ISSOCK(m)) return "a socket";
  return "not a regular file";
}

static int open_failed(int err) {
  return fail(err == ENOENT || err == ENOTDIR ? FL_IMG_MISSING : FL_IMG_IO, "%s", strerror(err));
}

/* read(2) until n bytes or the end of the file; -1 on an error */
static ssize_t read_full(int fd, uint8_t *p, size_t n) {
  size_t got = 0;
  while (got < n) {
    ssize_t r = read(fd, p + got, n - got);
    if (r < 0 && errno == EINTR) continue;
    if (r < 0) return -1;
    if (r == 0) break;
    got += (size_t)r;
  }
  return (ssize_t)got;
}

/* What is not a regular file is refused before it is opened (a FIFO blocks, a device never ends);
 * the open is non-blocking and the type is checked again on the descriptor (a file swapped for a
 * FIFO in between cannot block either). The first bytes and the size are checked before the rest
 * is read, so a large file of another kind costs no memory. */
int fl_decoder_read_file(fl_decoder *d, const char *path, const uint8_t **buf, size_t *len) {
  struct stat st;
  if (stat(path, &st) != 0) return open_failed(errno);
  if (!S_ISREG(st.st_mode)) return fail(FL_IMG_NOT_FILE, "%s, not an image file", file_kind(st.st_mode));
  int fd = open(path, O_RDONLY | O_NONBLOCK | O_NOCTTY | O_CLOEXEC);
  if (fd < 0) return open_failed(errno);
  uint8_t head[16];
  ssize_t nhead = 0, nrest = 0;
  int s = 0;
  if (fstat(fd, &st) != 0) s = open_failed(errno);
  else if (!S_ISREG(st.st_mode)) s = fail(FL_IMG_NOT_FILE, "%s, not an image file", file_kind(st.st_mode));
  else if ((nhead = read_full(fd, head, sizeof head)) < 0) s = fail(FL_IMG_IO, "read error: %s", strerror(errno));
  else if ((s = check_soi(head, (size_t)nhead))) {}
  else if (st.st_size > FL_IMG_MAX_FILE_BYTES)
    s = fail(FL_IMG_TOO_LARGE, "the file is %lld bytes, more than %lld", (long long)st.st_size,
             (long long)FL_IMG_MAX_FILE_BYTES);
  /* room for the whole file plus one byte, which tells whether it grew since fstat */
  size_t want = (size_t)(st.st_size > nhead ? st.st_size : nhead) + 1;
  if (!s && want > d->filecap) {
    uint8_t *p = malloc(want);
    if (!p) s = fail(FL_IMG_NOMEM, "out of memory for a file of %zu bytes", want - 1);
    else { free(d->file); d->file = p; d->filecap = want; }
  }
  if (!s) {
    memcpy(d->file, head, (size_t)nhead);
    nrest = read_full(fd, d->file + nhead, want - (size_t)nhead);
    if (nrest < 0) s = fail(FL_IMG_IO, "read error: %s", strerror(errno));
  }
  close(fd);
  if (s) return s;
  size_t n = (size_t)nhead + (size_t)nrest;
  if (n == want) return fail(FL_IMG_IO, "the file grew while it was read (more than %zu bytes)", want - 1);
  *buf = d->file;
  *len = n;
  return FL_IMG_OK;
}

/* Reads the header of buf into d->cinfo. Must run under the caller's setjmp. */
static void read_header(fl_decoder *d, const uint8_t *buf, size_t len) {
  jpeg_mem_src(&d->cinfo, buf, (unsigned long)len);
  jpeg_read_header(&d->cinfo, TRUE);
  d->orientation = exif_orientation(&d->cinfo);
}

int fl_decoder_info(fl_decoder *d, const uint8_t *buf, size_t len, fl_jpeg_info *info) {
  int s = check_soi(buf, len);
  if (s) return s;
  d->jerr.status = 0;
  if (setjmp(d->jerr.jb)) {
    jpeg_abort_decompress(&d->cinfo);
    return d->jerr.status;
  }
  read_header(d, buf, len);
  struct jpeg_decompress_struct *c = &d->cinfo;
  info->stored_width = (int)c->image_width;
  info->stored_height = (int)c->image_height;
  info->orientation = d->orientation;
  info->width = d->orientation >= 5 ? info->stored_height : info->stored_width;
  info->height = d->orientation >= 5 ? info->stored_width : info->stored_height;
  info->components = c->num_components;
  info->progressive = c->progressive_mode ? 1 : 0;
  jpeg_abort_decompress(c);
  return 0;
}

/* The crop box (pixel edges, displayed full-resolution coordinates) for transform t on a W x H
 * image, drawing from rng as torchvision's RandomResizedCrop.get_params does. */
static void choose_box(const fl_transform *t, int W, int H, uint64_t *rng, double box[4]) {
  box[0] = 0; box[1] = 0; box[2] = W; box[3] = H;
  if (t->mode == FL_TF_CENTER) {
    double shorter = t->out_w < t->out_h ? t->out_w : t->out_h;
    double f = shorter / t->crop_frac / (W < H ? W : H);  /* resize factor */
    double cw = t->out_w / f, ch = t->out_h / f;
    if (cw > W) cw = W;
    if (ch > H) ch = H;
    box[0] = (W - cw) / 2; box[2] = box[0] + cw;
    box[1] = (H - ch) / 2; box[3] = box[1] + ch;
  } else if (t->mode == FL_TF_RANDOM_RESIZED) {
    double area = (double)W * H, lr0 = log(t->ratio_lo), lr1 = log(t->ratio_hi);
    for (int attempt = 0; attempt < 10; attempt++) {
      double target = area * (t->scale_lo + (t->scale_hi - t->scale_lo) * fl_rng_uniform(rng));
      double aspect = exp(lr0 + (lr1 - lr0) * fl_rng_uniform(rng));
      long w = lround(sqrt(target * aspect)), h = lround(sqrt(target / aspect));
      if (w > 0 && w <= W && h > 0 && h <= H) {
        long y = (long)fl_rng_below(rng, (uint64_t)(H - h + 1));
        long x = (long)fl_rng_below(rng, (uint64_t)(W - w + 1));
        box[0] = x; box[1] = y; box[2] = x + w; box[3] = y + h;
        return;
      }
    }
    /* fallback: the central crop with the aspect ratio clamped into range */
    double in_ratio = (double)W / H;
    long w = W, h = H;
    if (in_ratio < t->ratio_lo) h = lround(w / t->ratio_lo);
    else if (in_ratio > t->ratio_hi) w = lround(h * t->ratio_hi);
    box[0] = (double)((W - w) / 2); box[1] = (double)((H - h) / 2);
    box[2] = box[0] + w; box[3] = box[1] + h;
  }
}

/* Decodes rows [y0, y1) and columns covering [x0, x1) of the (scaled) stored image into d->raw.
 * On return *wx is the first decoded column (libjpeg aligns it to an iMCU boundary). Runs under
 * the caller's setjmp, after jpeg_calc_output_dimensions. */
static int decode_rows(fl_decoder *d, int x0, int x1, int y0, int y1, int *wx) {
  struct jpeg_decompress_struct *c = &d->cinfo;
  jpeg_start_decompress(c);
  JDIMENSION xoff = (JDIMENSION)x0, width = (JDIMENSION)(x1 - x0);
  if (x0 > 0 || (JDIMENSION)x1 < c->output_width) jpeg_crop_scanline(c, &xoff, &width);
  *wx = (int)xoff;
  int w = (int)c->output_width, rows = y1 - y0;
  if (fl_image_reserve(&d->raw, w, rows)) {
    jpeg_abort_decompress(c);
    return fail(FL_IMG_NOMEM, "out of memory for a %dx%d image", w, rows);
  }
  int cmyk = c->out_color_space == JCS_CMYK;
  if (cmyk && grow((void **)&d->row4, &d->row4cap, (size_t)w * 4 * 16)) {
    jpeg_abort_decompress(c);
    return fail(FL_IMG_NOMEM, "out of memory for a %dx%d image", w, rows);
  }
  if (y0 > 0) jpeg_skip_scanlines(c, (JDIMENSION)y0);
  int y = 0;
  while (y < rows) {
    JSAMPROW ptrs[16];
    int want = rows - y < 16 ? rows - y : 16;
    for (int i = 0; i < want; i++)
      ptrs[i] = cmyk ? d->row4 + (size_t)i * w * 4 : d->raw.data + (size_t)(y + i) * w * 3;
    int got = (int)jpeg_read_scanlines(c, ptrs, (JDIMENSION)want);
    if (cmyk) {
      /* Pillow's convention: stored CMYK is inverted (Adobe); R = (255-K) - (C (255-K) / 255) */
      for (int i = 0; i < got; i++) {
        const uint8_t *p = d->row4 + (size_t)i * w * 4;
        uint8_t *o = d->raw.data + (size_t)(y + i) * w * 3;
        for (int x = 0; x < w; x++, p += 4, o += 3) {
          int nk = p[3];  /* 255 - K, where K = 255 - stored */
          for (int ch = 0; ch < 3; ch++) {
            int cc = 255 - p[ch];
            int tmp = cc * nk + 128;
            int v = nk - (((tmp >> 8) + tmp) >> 8);
            o[ch] = (uint8_t)(v < 0 ? 0 : v);
          }
        }
      }
    }
    if (got <= 0) {  /* a memory source never suspends: no rows means the data ran out */
      jpeg_abort_decompress(c);
      return fail(FL_IMG_TRUNCATED, "the decoder returned no rows at row %d of %d", y, rows);
    }
    y += got;
  }
  if ((int)c->output_scanline == (int)c->output_height) jpeg_finish_decompress(c);
  else jpeg_abort_decompress(c);
  return 0;
}

/* Sets decompression parameters (colour space, DCT method) after the header is read. */
static void set_params(fl_decoder *d, int fast) {
  struct jpeg_decompress_struct *c = &d->cinfo;
  if (c->jpeg_color_space == JCS_CMYK || c->jpeg_color_space == JCS_YCCK) c->out_color_space = JCS_CMYK;
  else c->out_color_space = JCS_EXT_RGB;
  c->dct_method = fast ? JDCT_IFAST : JDCT_ISLOW;
  c->do_fancy_upsampling = fast ? FALSE : TRUE;
}

#define CROP_MARGIN 8  /* scaled pixels decoded beyond the filter's taps */

static int decode_transform(fl_decoder *d, const uint8_t *buf, size_t len, const fl_transform *t,
                            uint64_t *rng, fl_image *out) {
  struct jpeg_decompress_struct *c = &d->cinfo;
  read_header(d, buf, len);
  int o = d->orientation;
  int sw0 = (int)c->image_width, sh0 = (int)c->image_height;
  if ((int64_t)sw0 * sh0 > FL_IMG_MAX_PIXELS) {
    jpeg_abort_decompress(c);
    return fail(FL_IMG_TOO_LARGE, "image is %dx%d, more than %lld pixels", sw0, sh0,
                (long long)FL_IMG_MAX_PIXELS);
  }
  int W = o >= 5 ? sh0 : sw0, H = o >= 5 ? sw0 : sh0;  /* displayed */
  set_params(d, t->fast);

  double box[4];
  choose_box(t, W, H, rng, box);
  int M = 8;
  if (t->mode == FL_TF_NONE) {
    if (t->none_scale > 0) M = t->none_scale;
  } else if (t->dct_scaling) {
    /* smallest M/8 whose decoded crop still covers the output in both directions, among the
     * scales libjpeg-turbo has SIMD code for: 1/8, 1/4, 1/2 and 1/1. The others (3/8, 5/8, 6/8,
     * 7/8) run a plain-C IDCT, and a 4:2:0 image's chroma at twice that size: decoding a 600x450
     * photo at 5/8 takes 1.4x as long as decoding it whole (measured, libjpeg-turbo 2.1). */
    static const int simd_scales[4] = { 1, 2, 4, 8 };
    for (int k = 0; k < 4; k++) {
      int m = simd_scales[k];
      c->scale_num = (unsigned)m;
      c->scale_denom = 8;
      jpeg_calc_output_dimensions(c);
      double fx = (double)(o >= 5 ? c->output_height : c->output_width) / W;
      double fy = (double)(o >= 5 ? c->output_width : c->output_height) / H;
      if ((box[2] - box[0]) * fx >= t->out_w && (box[3] - box[1]) * fy >= t->out_h) { M = m; break; }
    }
  }
  c->scale_num = (unsigned)M;
  c->scale_denom = 8;
  jpeg_calc_output_dimensions(c);
  int sw = (int)c->output_width, sh = (int)c->output_height;   /* scaled, stored */
  int vw = o >= 5 ? sh : sw, vh = o >= 5 ? sw : sh;            /* scaled, displayed */
  double fx = (double)vw / W, fy = (double)vh / H;
  double sbox[4] = { box[0] * fx, box[1] * fy, box[2] * fx, box[3] * fy };
  if (sbox[2] > vw) sbox[2] = vw;
  if (sbox[3] > vh) sbox[3] = vh;

  if (t->mode == FL_TF_NONE) {
    int wx, s = decode_rows(d, 0, sw, 0, sh, &wx);
    if (s) return s;
    if (o == 1) {
      if (fl_image_reserve(out, sw, sh)) return fail(FL_IMG_NOMEM, "out of memory");
      memcpy(out->data, d->raw.data, (size_t)sw * sh * 3);
    } else {
      if (fl_image_reserve(out, vw, vh)) return fail(FL_IMG_NOMEM, "out of memory");
      fl_image_orient(d->raw.data, sw, sh, o, out->data, &out->w, &out->h);
    }
    return 0;
  }

  if (fl_image_reserve(out, t->out_w, t->out_h)) return fail(FL_IMG_NOMEM, "out of memory");
  int s;
  if (o == 1 && !t->full_decode) {
    /* decode only the window the filter taps read */
    int x0, x1, y0, y1, wx;
    taps_range(vw, (float)sbox[0], (float)sbox[2], t->out_w, t->filter, &x0, &x1);
    taps_range(vh, (float)sbox[1], (float)sbox[3], t->out_h, t->filter, &y0, &y1);
    if (t->out_w == vw && sbox[0] == 0 && sbox[2] == vw) { x0 = 0; x1 = vw; }
    if (t->out_h == vh && sbox[1] == 0 && sbox[3] == vh) { y0 = 0; y1 = vh; }
    /* fancy (triangular) chroma upsampling treats the edge of a cropped or skipped region as
     * the image's edge; a margin keeps those pixels out of the filter's reach */
    x0 = x0 - CROP_MARGIN < 0 ? 0 : x0 - CROP_MARGIN;
    x1 = x1 + CROP_MARGIN > sw ? sw : x1 + CROP_MARGIN;
    y0 = y0 - CROP_MARGIN < 0 ? 0 : y0 - CROP_MARGIN;
    y1 = y1 + CROP_MARGIN > sh ? sh : y1 + CROP_MARGIN;
    s = decode_rows(d, x0, x1, y0, y1, &wx);
    if (s) return s;
    s = resize_window(d->ws, d->raw.data, vw, vh, (size_t)d->raw.w * 3, wx, y0, d->raw.w, y1 - y0, sbox,
                      out->data, t->out_w, t->out_h, (size_t)t->out_w * 3, t->filter);
  } else {
    int wx;
    s = decode_rows(d, 0, sw, 0, sh, &wx);
    if (s) return s;
    if (fl_image_reserve(&d->oriented, vw, vh)) return fail(FL_IMG_NOMEM, "out of memory");
    fl_image_orient(d->raw.data, sw, sh, o, d->oriented.data, &d->oriented.w, &d->oriented.h);
    s = fl_resize(d->ws, d->oriented.data, vw, vh, (size_t)vw * 3, sbox, out->data, t->out_w, t->out_h,
                  (size_t)t->out_w * 3, t->filter);
  }
  if (s) return fail(s, "resampling failed (%s)", fl_img_status_name(s));
  return 0;
}

int fl_decoder_transform(fl_decoder *d, const uint8_t *buf, size_t len, const fl_transform *t,
                         uint64_t *rng, fl_image *out) {
  int s = fl_transform_check(t);
  if (s) return s;
  if ((s = check_soi(buf, len))) return s;
  d->jerr.status = 0;
  if (setjmp(d->jerr.jb)) {
    jpeg_abort_decompress(&d->cinfo);
    return d->jerr.status;
  }
  s = decode_transform(d, buf, len, t, rng, out);
  if (s) return s;
  if (t->mode == FL_TF_NONE) return 0;
  /* random choices after the crop: flip, then the three jitter factors (always drawn in this
   * order when enabled, so turning one on does not change the others' numbers) */
  if (t->hflip && (fl_rng_next(rng) >> 63)) fl_image_hflip(out->data, out->w, out->h);
  if (t->brightness > 0 || t->contrast > 0 || t->saturation > 0) {
    double b = 1, ct = 1, sa = 1;
    if (t->brightness > 0) b = 1 - t->brightness + 2 * t->brightness * fl_rng_uniform(rng);
    if (t->contrast > 0) ct = 1 - t->contrast + 2 * t->contrast * fl_rng_uniform(rng);
    if (t->saturation > 0) sa = 1 - t->saturation + 2 * t->saturation * fl_rng_uniform(rng);
    fl_image_jitter(out->data, out->w, out->h, b, ct, sa);
  }
  return 0;
}

/* ------------------------------------------------------------------------------------------------
 * Encoding */

struct enc_err { struct jpeg_error_mgr pub; jmp_buf jb; char msg[JMSG_LENGTH_MAX]; };

static void enc_exit(j_common_ptr c) {
  struct enc_err *e = (struct enc_err *)c->err;
  (*c->err->format_message)(c, e->msg);
  longjmp(e->jb, 1);
}

int fl_jpeg_encode(const uint8_t *pixels, int w, int h, int channels, int quality, int progressive,
                   int subsample, unsigned char **out, size_t *outlen) {
  if (w < 1 || h < 1 || w > 65500 || h > 65500 || (channels != 1 && channels != 3) || quality < 1 || quality > 100)
    return fl_fail("jpeg_encode: expected 1..65500 pixels per side, 1 or 3 channels, quality 1..100; "
                   "got %dx%dx%d, quality %d", w, h, channels, quality);
  struct jpeg_compress_struct c;
  struct enc_err e;
  /* volatile: read after a longjmp */
  unsigned char *volatile buf = NULL;
  unsigned long volatile size = 0;
  c.err = jpeg_std_error(&e.pub);
  e.pub.error_exit = enc_exit;
  e.pub.output_message = jerr_output;
  if (setjmp(e.jb)) {
    jpeg_destroy_compress(&c);
    free(buf);
    return fl_fail("jpeg_encode: %s", e.msg);
  }
  jpeg_create_compress(&c);
  jpeg_mem_dest(&c, (unsigned char **)&buf, (unsigned long *)&size);
  c.image_width = (JDIMENSION)w;
  c.image_height = (JDIMENSION)h;
  c.input_components = channels;
  c.in_color_space = channels == 3 ? JCS_EXT_RGB : JCS_GRAYSCALE;
  jpeg_set_defaults(&c);
  jpeg_set_quality(&c, quality, TRUE);
  c.dct_method = JDCT_ISLOW;
  if (channels == 3 && !subsample) {
    c.comp_info[0].h_samp_factor = 1;
    c.comp_info[0].v_samp_factor = 1;
  }
  if (progressive) jpeg_simple_progression(&c);
  jpeg_start_compress(&c, TRUE);
  while (c.next_scanline < c.image_height) {
    JSAMPROW row = (JSAMPROW)(pixels + (size_t)c.next_scanline * w * channels);
    jpeg_write_scanlines(&c, &row, 1);
  }
  jpeg_finish_compress(&c);
  jpeg_destroy_compress(&c);
  *out = buf;
  *outlen = size;
  return 0;
}
