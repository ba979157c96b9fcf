/* Procedural flower photographs (see flowers.h). Everything is drawn on a float RGB canvas in
 * [0, 1]: background, stem and leaves, one or two flowers, then lighting, blur, noise, and 8-bit
 * rounding. Each pixel of a flower finds the petals that may cover it from its polar angle, so the
 * cost is a few dozen flops per pixel of the flower's bounding box. */
#include <errno.h>
#include <math.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "flowers.h"
#include "image.h"
#include "tensor.h"

#define TWO_PI 6.283185307179586

/* ---------------------------------------------------------------------------------------------
 * Classes */

/* Orders chosen so that small sets already get well separated values. */
static const int petal_counts[] = { 5, 8, 3, 12, 6, 4, 10, 7 };
#define NCOUNTS ((int)(sizeof petal_counts / sizeof petal_counts[0]))

enum { SH_OVAL, SH_POINTED, SH_STRAP, SH_SPATULATE, SH_NOTCHED, SH_FRINGED, NSHAPES };
static const char *shape_names[NSHAPES] = { "oval", "pointed", "strap", "spatulate", "notched", "fringed" };

/* Petal colour (HSV: hue degrees, saturation, value), tip colour shift, centre colour (RGB). */
typedef struct { const char *name; float h, s, v, tip_dh, tip_dv; float cr, cg, cb; } palette;
static const palette palettes[] = {
  { "red",       356, .85f, .88f,   0, .05f,  .95f, .80f, .15f },
  { "yellow",     50, .88f, .96f,  -8, .00f,  .40f, .22f, .08f },
  { "violet",    272, .62f, .72f,   8, .12f,  .98f, .86f, .20f },
  { "white",      40, .05f, .97f,   0, .00f,  .96f, .72f, .10f },
  { "orange",     26, .92f, .96f,  10, .00f,  .18f, .10f, .06f },
  { "pink",      335, .42f, .96f,   0, .03f,  .95f, .85f, .30f },
  { "blue",      218, .62f, .86f,  -6, .10f,  .96f, .96f, .90f },
  { "magenta",   305, .82f, .70f,   0, .15f,  .15f, .08f, .12f },
  { "crimson",   345, .90f, .55f,   0, .10f,  .98f, .90f, .40f },
  { "cream",      48, .28f, .98f,   0, .00f,  .85f, .45f, .10f },
  { "lilac",     285, .30f, .90f,   5, .05f,  .99f, .95f, .60f },
  { "salmon",     12, .55f, .97f,   6, .02f,  .55f, .30f, .10f },
  { "gold",       40, .95f, .85f,  10, .10f,  .25f, .12f, .05f },
  { "sky",       200, .45f, .95f,   0, .03f,  .98f, .98f, .60f },
  { "scarlet",     5, .95f, .95f,  20, .00f,  .08f, .06f, .06f },
  { "lavender",  258, .35f, .80f,   0, .10f,  .90f, .70f, .15f },
  { "peach",      22, .35f, .99f,   0, .00f,  .90f, .55f, .15f },
  { "wine",      330, .80f, .45f,   0, .20f,  .95f, .85f, .30f },
  { "lemon",      58, .70f, .99f,   0, .00f,  .30f, .55f, .15f },
  { "indigo",    238, .70f, .62f,  10, .12f,  .98f, .90f, .30f },
  { "coral",       2, .62f, .95f,  14, .00f,  .98f, .88f, .45f },
  { "rose",      348, .60f, .80f,   0, .10f,  .30f, .20f, .10f },
  { "amber",      33, .80f, .90f,  -6, .05f,  .95f, .90f, .60f },
  { "orchid",    295, .50f, .85f, -12, .08f,  .98f, .92f, .20f },
};
#define NPALETTES_TABLE ((int)(sizeof palettes / sizeof palettes[0]))
#define NPALETTES_MAX 512

void fl_flowers_grid(int K, int *nc, int *ns, int *np) {
  int d[3] = { 1, 1, 1 };
  const int cap[3] = { NCOUNTS, NSHAPES, NPALETTES_MAX };
  int next = 0;
  while (d[0] * d[1] * d[2] < K) {
    /* grow the attributes in turn, skipping those at their cap */
    for (int tries = 0; tries < 3; tries++, next = (next + 1) % 3)
      if (d[next] < cap[next]) break;
    d[next]++;
    next = (next + 1) % 3;
  }
  *nc = d[0];
  *ns = d[1];
  *np = d[2];
}

int fl_flowers_class(int c, int K, fl_flower_class *out) {
  if (K < 1 || K > FL_FLOWERS_MAX_CLASSES || c < 0 || c >= K) return -1;
  int nc, ns, np;
  fl_flowers_grid(K, &nc, &ns, &np);
  out->petals = petal_counts[c % nc];
  out->shape = (c / nc) % ns;
  out->palette = c / (nc * ns);
  return 0;
}

const char *fl_flowers_shape_name(int s) { return (s >= 0 && s < NSHAPES) ? shape_names[s] : "unknown"; }

const char *fl_flowers_palette_name(int p) {
  static _Thread_local char buf[32];
  if (p >= 0 && p < NPALETTES_TABLE) return palettes[p].name;
  snprintf(buf, sizeof buf, "hue%d", p);
  return buf;
}

/* Palettes past the table: hues spread by the golden angle, alternating centre colours. */
static palette get_palette(int p) {
  if (p < NPALETTES_TABLE) return palettes[p];
  palette q = { NULL, 0, 0, 0, 0, 0, 0, 0, 0 };
  q.h = fmodf(17.0f + 137.50776f * (float)p, 360.0f);
  q.s = 0.35f + 0.6f * (float)((p * 7) % 10) / 10.0f;
  q.v = 0.6f + 0.38f * (float)((p * 3) % 7) / 7.0f;
  q.tip_dh = (float)((p % 5) - 2) * 6.0f;
  q.tip_dv = 0.05f * (float)(p % 3);
  static const float centres[4][3] = { { .95f, .80f, .15f }, { .25f, .14f, .06f }, { .96f, .96f, .9f }, { .2f, .45f, .15f } };
  const float *cc = centres[p % 4];
  q.cr = cc[0]; q.cg = cc[1]; q.cb = cc[2];
  return q;
}

/* ---------------------------------------------------------------------------------------------
 * Small helpers */

typedef struct { float r, g, b; } rgb;

static rgb hsv(float h, float s, float v) {
  h = fmodf(h, 360.0f);
  if (h < 0) h += 360.0f;
  if (s < 0) s = 0;
  if (s > 1) s = 1;
  if (v < 0) v = 0;
  if (v > 1) v = 1;
  float c = v * s, hp = h / 60.0f, x = c * (1 - fabsf(fmodf(hp, 2.0f) - 1)), m = v - c;
  rgb o;
  switch ((int)hp) {
    case 0: o = (rgb){ c, x, 0 }; break;
    case 1: o = (rgb){ x, c, 0 }; break;
    case 2: o = (rgb){ 0, c, x }; break;
    case 3: o = (rgb){ 0, x, c }; break;
    case 4: o = (rgb){ x, 0, c }; break;
    default: o = (rgb){ c, 0, x }; break;
  }
  o.r += m; o.g += m; o.b += m;
  return o;
}

static float uni(uint64_t *s, float lo, float hi) { return lo + (hi - lo) * (float)fl_rng_uniform(s); }

static float clampf(float x, float lo, float hi) { return x < lo ? lo : (x > hi ? hi : x); }

static float smooth(float e0, float e1, float x) {
  float t = clampf((x - e0) / (e1 - e0), 0, 1);
  return t * t * (3 - 2 * t);
}

static void blend(float *p, rgb c, float a) {
  p[0] += (c.r - p[0]) * a;
  p[1] += (c.g - p[1]) * a;
  p[2] += (c.b - p[2]) * a;
}

/* ---------------------------------------------------------------------------------------------
 * Background: value noise on a coarse lattice, bilinear, three octaves. */

typedef struct { int gw, gh, cell; float *v; } lattice;

static int lattice_make(lattice *l, int w, int h, int cell, uint64_t *rng) {
  l->cell = cell;
  l->gw = w / cell + 2;
  l->gh = h / cell + 2;
  l->v = malloc(sizeof(float) * (size_t)l->gw * l->gh);
  if (!l->v) return -1;
  for (int i = 0; i < l->gw * l->gh; i++) l->v[i] = (float)fl_rng_uniform(rng);
  return 0;
}

/* Adds amp * (noise - bias) for row y of lattice l to nrow[0..w): the lattice is interpolated
 * vertically once per lattice column, then horizontally per pixel, with smoothstep weights. */
static void lattice_row(const lattice *l, int y, int w, float amp, float bias, float *col, float *nrow) {
  float fy = (float)y / l->cell;
  int iy = (int)fy;
  float ty = fy - iy;
  ty = ty * ty * (3 - 2 * ty);
  const float *r0 = l->v + (size_t)iy * l->gw, *r1 = r0 + l->gw;
  for (int j = 0; j < l->gw; j++) col[j] = r0[j] + (r1[j] - r0[j]) * ty;
  float inv = 1.0f / l->cell;
  for (int x = 0; x < w; x++) {
    float fx = x * inv;
    int ix = (int)fx;
    float tx = fx - ix;
    tx = tx * tx * (3 - 2 * tx);
    nrow[x] += amp * (col[ix] + (col[ix + 1] - col[ix]) * tx - bias);
  }
}

static const rgb bg_colours[] = {
  { .20f, .35f, .12f }, { .32f, .45f, .18f }, { .12f, .22f, .08f }, { .40f, .32f, .20f },
  { .25f, .20f, .14f }, { .45f, .50f, .42f }, { .55f, .65f, .78f }, { .30f, .38f, .25f },
  { .60f, .55f, .45f }, { .10f, .14f, .10f }, { .50f, .42f, .30f }, { .22f, .30f, .35f },
};
#define NBG ((int)(sizeof bg_colours / sizeof bg_colours[0]))

static int draw_background(float *cv, int w, int h, uint64_t *rng) {
  lattice oct[2];
  int cells[2] = { 96 + (int)(fl_rng_next(rng) % 64), 20 + (int)(fl_rng_next(rng) % 16) };
  for (int i = 0; i < 2; i++) {
    if (lattice_make(&oct[i], w, h, cells[i], rng)) {
      for (int j = 0; j < i; j++) free(oct[j].v);
      return -1;
    }
  }
  rgb c0 = bg_colours[fl_rng_next(rng) % NBG], c1 = bg_colours[fl_rng_next(rng) % NBG];
  float amp2 = uni(rng, 0.1f, 0.5f), contrast = uni(rng, 0.4f, 1.2f);
  float *buf = malloc(sizeof(float) * ((size_t)w + oct[0].gw + oct[1].gw));
  if (!buf) { free(oct[0].v); free(oct[1].v); return -1; }
  float *nrow = buf, *col = buf + w;
  for (int y = 0; y < h; y++) {
    float *p = cv + (size_t)y * w * 3;
    for (int x = 0; x < w; x++) nrow[x] = 0;
    lattice_row(&oct[0], y, w, 1.0f, 0.0f, col, nrow);
    lattice_row(&oct[1], y, w, amp2, 0.5f, col, nrow);
    for (int x = 0; x < w; x++, p += 3) {
      float t = clampf(0.5f + (nrow[x] - 0.5f) * contrast, 0, 1);
      p[0] = c0.r + (c1.r - c0.r) * t;
      p[1] = c0.g + (c1.g - c0.g) * t;
      p[2] = c0.b + (c1.b - c0.b) * t;
    }
  }
  free(buf);
  for (int i = 0; i < 2; i++) free(oct[i].v);

  /* out-of-focus discs (bokeh) of arbitrary colours: colour alone must not give the class away */
  int ndisc = (int)(fl_rng_next(rng) % 5);
  for (int i = 0; i < ndisc; i++) {
    float cx = uni(rng, 0, (float)w), cy = uni(rng, 0, (float)h);
    float r = uni(rng, 0.03f, 0.12f) * (float)(w < h ? w : h);
    rgb c = hsv(uni(rng, 0, 360), uni(rng, 0.1f, 0.8f), uni(rng, 0.5f, 1.0f));
    float a = uni(rng, 0.1f, 0.35f);
    int x0 = (int)fmaxf(0, cx - r - 2), x1 = (int)fminf((float)w, cx + r + 2);
    int y0 = (int)fmaxf(0, cy - r - 2), y1 = (int)fminf((float)h, cy + r + 2);
    for (int y = y0; y < y1; y++)
      for (int x = x0; x < x1; x++) {
        float d = hypotf(x + 0.5f - cx, y + 0.5f - cy);
        float k = smooth(r, r * 0.7f, d);
        if (k > 0) blend(cv + ((size_t)y * w + x) * 3, c, a * k);
      }
  }
  return 0;
}

/* ---------------------------------------------------------------------------------------------
 * Stem and leaves */

static void draw_segment(float *cv, int w, int h, float ax, float ay, float bx, float by, float width, rgb c) {
  float minx = fminf(ax, bx) - width - 2, maxx = fmaxf(ax, bx) + width + 2;
  float miny = fminf(ay, by) - width - 2, maxy = fmaxf(ay, by) + width + 2;
  int x0 = (int)fmaxf(0, minx), x1 = (int)fminf((float)w, maxx), y0 = (int)fmaxf(0, miny), y1 = (int)fminf((float)h, maxy);
  float dx = bx - ax, dy = by - ay, len2 = dx * dx + dy * dy + 1e-6f;
  for (int y = y0; y < y1; y++)
    for (int x = x0; x < x1; x++) {
      float px = x + 0.5f - ax, py = y + 0.5f - ay;
      float t = clampf((px * dx + py * dy) / len2, 0, 1);
      float d = hypotf(px - t * dx, py - t * dy);
      float a = clampf(width * 0.5f - d + 0.5f, 0, 1);
      if (a > 0) {
        rgb s = { c.r * (0.8f + 0.2f * t), c.g * (0.8f + 0.2f * t), c.b };
        blend(cv + ((size_t)y * w + x) * 3, s, a);
      }
    }
}

static void draw_leaf(float *cv, int w, int h, float cx, float cy, float len, float wid, float ang, rgb c) {
  float ca = cosf(ang), sa = sinf(ang), r = len + 2;
  int x0 = (int)fmaxf(0, cx - r), x1 = (int)fminf((float)w, cx + r), y0 = (int)fmaxf(0, cy - r), y1 = (int)fminf((float)h, cy + r);
  for (int y = y0; y < y1; y++)
    for (int x = x0; x < x1; x++) {
      float px = x + 0.5f - cx, py = y + 0.5f - cy;
      float u = px * ca + py * sa, v = -px * sa + py * ca;  /* u along the leaf, 0..len */
      if (u < 0 || u > len) continue;
      float t = u / len, hw = wid * sinf((float)M_PI * t);
      float a = clampf(hw - fabsf(v) + 0.5f, 0, 1);
      if (a <= 0) continue;
      float vein = fabsf(v) < 0.8f ? 0.8f : 1.0f;
      rgb s = { c.r * vein * (0.85f + 0.3f * t), c.g * vein * (0.85f + 0.3f * t), c.b * vein };
      blend(cv + ((size_t)y * w + x) * 3, s, a);
    }
}

/* ---------------------------------------------------------------------------------------------
 * The flower */

#define HW_STEPS 256   /* table resolution of the half-width profile */
#define YN_STEPS 64    /* table resolution of the functions of yn in [0, 1] */

typedef struct {
  int n, shape;
  float cx, cy, R, rc, wmax, rot;
  float m00, m01, m10, m11;  /* image offset -> flower coordinates (inverse of the tilt) */
  rgb base, tip_c, centre, centre2;
  float layer_dark;           /* how much lower petals are shaded */
  float vein;                 /* strength of the mid-vein */
  float petal_var[16];        /* per-petal length factor */
  float axis[16][2];          /* unit vector of each petal's axis (cos, sin) */
  float hw[HW_STEPS + 1];     /* petal_halfwidth(shape, i / HW_STEPS) */
  float tip[YN_STEPS + 1];    /* tip_limit(shape, i / YN_STEPS) */
  float veins[YN_STEPS + 1];  /* 0.92 + 0.08 cos(9 yn) */
} flower;

/* Half-width profile of a petal at t in [0, 1] along its length, in units of wmax, and for shapes
 * with a cut tip the largest t allowed at normalised offset yn = |v| / wmax. */
static float petal_halfwidth(int shape, float t) {
  switch (shape) {
    case SH_OVAL: return sqrtf(fmaxf(0, 1 - (2 * t - 1) * (2 * t - 1)));
    case SH_POINTED: return powf(fmaxf(0, sinf((float)M_PI * powf(t, 0.7f))), 0.9f);
    case SH_SPATULATE:
      if (t < 0.68f) { float q = (t - 0.68f) / 0.68f; return sqrtf(fmaxf(0, 1 - q * q)) * (0.35f + 0.65f * t / 0.68f); }
      else { float q = (t - 0.68f) / 0.32f; return sqrtf(fmaxf(0, 1 - q * q)); }
    case SH_NOTCHED: return sqrtf(fmaxf(0, 1 - (2 * t - 1) * (2 * t - 1) * (2 * t - 1) * (2 * t - 1)));
    case SH_STRAP: return t < 0.88f ? 0.3f + 0.05f * t : 0.35f * sqrtf(fmaxf(0, 1 - ((t - 0.88f) / 0.12f) * ((t - 0.88f) / 0.12f)));
    case SH_FRINGED: return sqrtf(fmaxf(0, 1 - (2 * t - 1) * (2 * t - 1)));
  }
  return 0;
}

static float tip_limit(int shape, float yn) {
  if (shape == SH_NOTCHED) return yn < 0.55f ? 0.80f + 0.20f * (yn / 0.55f) : 1.0f;
  if (shape == SH_FRINGED) return 0.84f + 0.16f * fabsf(cosf(yn * 3.0f * (float)M_PI));
  return 1.0f;
}

static float table_lookup(const float *tab, int steps, float x) {
  float f = clampf(x, 0, 1) * steps;
  int i = (int)f;
  if (i >= steps) return tab[steps];
  return tab[i] + (tab[i + 1] - tab[i]) * (f - i);
}

/* Coverage (0..1) of petal k at flower coordinates (x, y); *t_out returns the position along
 * the petal (0 at the centre, 1 at the tip), *yn_out the offset from its axis in units of wmax. */
static float petal_cover(const flower *f, int k, float x, float y, float *t_out, float *yn_out) {
  float u = x * f->axis[k][0] + y * f->axis[k][1], v = -x * f->axis[k][1] + y * f->axis[k][0];
  if (u <= 0) return 0;
  float L = f->R * f->petal_var[k];
  float start = f->rc * 0.3f;
  float t = (u - start) / (L - start);
  if (t < 0 || t > 1.02f) return 0;
  float av = fabsf(v);
  float hw = table_lookup(f->hw, HW_STEPS, t) * f->wmax * (0.6f + 0.4f * clampf(u / f->rc, 0, 1));
  float d = hw - av;
  if (d < -0.5f) return 0;
  float yn = av / f->wmax;
  if (t > 0.78f) {  /* shapes with a cut tip: notched, fringed */
    float d_tip = (table_lookup(f->tip, YN_STEPS, yn) - t) * (L - start);
    d = fminf(d, d_tip);
  }
  *t_out = clampf(t, 0, 1);
  *yn_out = yn;
  return clampf(d + 0.5f, 0, 1);
}

static void draw_flower(float *cv, int w, int h, const flower *f) {
  /* the tilt only shrinks, so the untilted radius bounds the flower */
  float ext = f->R * 1.25f + 3, rmax = f->R * 1.2f + 2;
  int x0 = (int)fmaxf(0, f->cx - ext), x1 = (int)fminf((float)w, f->cx + ext);
  int y0 = (int)fmaxf(0, f->cy - ext), y1 = (int)fminf((float)h, f->cy + ext);
  for (int y = y0; y < y1; y++) {
    float *p = cv + ((size_t)y * w + x0) * 3;
    for (int x = x0; x < x1; x++, p += 3) {
      float ox = x + 0.5f - f->cx, oy = y + 0.5f - f->cy;
      float u = f->m00 * ox + f->m01 * oy, v = f->m10 * ox + f->m11 * oy;
      float r2 = u * u + v * v;
      if (r2 > rmax * rmax) continue;
      float r = sqrtf(r2);
      /* the nearest petal axis (largest dot product), then it and its two neighbours blended
       * bottom layer first (for six or more petals the odd ones lie on top, as in a real
       * two-whorl flower) */
      int k0 = 0;
      float best = -1e30f;
      for (int k = 0; k < f->n; k++) {
        float dt = u * f->axis[k][0] + v * f->axis[k][1];
        if (dt > best) { best = dt; k0 = k; }
      }
      int ks[3], layers[3], nc = 0;
      for (int dk = -1; dk <= 1; dk++) {
        int k = (k0 + dk + f->n) % f->n;
        if (dk == 1 && f->n == 2) break;
        int layer = f->n >= 6 ? (k & 1) : (k * 7) % f->n;
        int j = nc++;
        while (j > 0 && layers[j - 1] > layer) { ks[j] = ks[j - 1]; layers[j] = layers[j - 1]; j--; }
        ks[j] = k;
        layers[j] = layer;
      }
      for (int i = 0; i < nc; i++) {
        float t, yn;
        float cov = petal_cover(f, ks[i], u, v, &t, &yn);
        if (cov <= 0) continue;
        rgb c = { f->base.r + (f->tip_c.r - f->base.r) * t, f->base.g + (f->tip_c.g - f->base.g) * t,
                  f->base.b + (f->tip_c.b - f->base.b) * t };
        float shade = 0.78f + 0.22f * smooth(0.0f, 0.35f, t);
        if (f->n >= 6 && (ks[i] & 1) == 0) shade *= 1.0f - f->layer_dark;
        shade *= 1.0f - f->vein * (1.0f - smooth(0.0f, 0.09f, yn)) * smooth(0.05f, 0.3f, t);
        shade *= table_lookup(f->veins, YN_STEPS, yn);  /* faint parallel veins */
        c.r *= shade; c.g *= shade; c.b *= shade;
        blend(p, c, cov);
      }
      /* the centre disc, drawn over the petals' bases */
      float dc = f->rc - r;
      if (dc > -1) {
        float ca = clampf(dc + 0.5f, 0, 1);
        float dots = 0.5f + 0.5f * sinf(u * 0.9f) * sinf(v * 0.9f);
        float edge = 0.75f + 0.25f * smooth(0, f->rc * 0.5f, dc);
        rgb c = { (f->centre.r + (f->centre2.r - f->centre.r) * dots) * edge,
                  (f->centre.g + (f->centre2.g - f->centre.g) * dots) * edge,
                  (f->centre.b + (f->centre2.b - f->centre.b) * dots) * edge };
        blend(p, c, ca);
      }
    }
  }
}

static void make_flower(flower *f, const fl_flower_class *fc, float cx, float cy, float R, uint64_t *rng) {
  palette pal = get_palette(fc->palette);
  f->n = fc->petals;
  f->shape = fc->shape;
  f->cx = cx;
  f->cy = cy;
  f->R = R;
  f->rc = R * uni(rng, 0.14f, 0.26f);
  float spread = (float)sin(M_PI / f->n) * R * 0.62f;  /* half-width at which neighbours touch */
  float wfac = (fc->shape == SH_STRAP) ? uni(rng, 1.6f, 2.2f) : uni(rng, 0.75f, 1.25f);
  if (f->n <= 4) wfac *= 0.75f;
  f->wmax = spread * wfac;
  f->rot = uni(rng, 0, (float)TWO_PI);
  /* tilt: squash by s along a random axis phi; store the inverse map */
  float s = uni(rng, 0.72f, 1.0f), phi = uni(rng, 0, (float)M_PI);
  float c = cosf(phi), sn = sinf(phi);
  /* inverse of R(phi) diag(1, s) R(-phi) is R(phi) diag(1, 1/s) R(-phi) */
  float is = 1.0f / s;
  f->m00 = c * c + is * sn * sn;
  f->m01 = c * sn - is * c * sn;
  f->m10 = f->m01;
  f->m11 = sn * sn + is * c * c;
  for (int i = 0; i < 16; i++) f->petal_var[i] = uni(rng, 0.9f, 1.0f);
  for (int i = 0; i <= HW_STEPS; i++) f->hw[i] = petal_halfwidth(f->shape, (float)i / HW_STEPS);
  for (int i = 0; i <= YN_STEPS; i++) {
    f->tip[i] = tip_limit(f->shape, (float)i / YN_STEPS);
    f->veins[i] = 0.92f + 0.08f * cosf(9.0f * i / YN_STEPS);
  }
  for (int k = 0; k < f->n && k < 16; k++) {
    double th = f->rot + TWO_PI * k / f->n;
    f->axis[k][0] = (float)cos(th);
    f->axis[k][1] = (float)sin(th);
  }
  float dh = uni(rng, -6, 6), ds = uni(rng, -0.08f, 0.08f), dv = uni(rng, -0.1f, 0.06f);
  f->base = hsv(pal.h + dh, pal.s + ds + 0.05f, (pal.v + dv) * 0.85f);
  f->tip_c = hsv(pal.h + dh + pal.tip_dh, pal.s + ds - 0.05f, pal.v + dv + pal.tip_dv);
  float cv = uni(rng, 0.85f, 1.1f);
  f->centre = (rgb){ pal.cr * cv, pal.cg * cv, pal.cb * cv };
  f->centre2 = (rgb){ pal.cr * 0.6f * cv, pal.cg * 0.6f * cv, pal.cb * 0.6f * cv };
  f->layer_dark = uni(rng, 0.05f, 0.18f);
  f->vein = uni(rng, 0.0f, 0.25f);
}

/* Separable box blur of radius r (window 2r+1, edges replicated) on float RGB: rows into a
 * scratch canvas, then columns back with running sums over whole rows (sequential memory). */
static int box_blur(float *cv, int w, int h, int r) {
  size_t rowlen = (size_t)w * 3;
  float *tmp = malloc(sizeof(float) * rowlen * h);
  float *line = malloc(sizeof(float) * 3 * (size_t)(w + 2 * r + 1));
  float *acc = malloc(sizeof(float) * rowlen);
  if (!tmp || !line || !acc) { free(tmp); free(line); free(acc); return -1; }
  float inv = 1.0f / (2 * r + 1);
  for (int y = 0; y < h; y++) {
    const float *src = cv + y * rowlen;
    float *dst = tmp + y * rowlen;
    for (int i = 0; i < w + 2 * r + 1; i++) {
      int j = i - r < 0 ? 0 : (i - r >= w ? w - 1 : i - r);
      memcpy(line + 3 * i, src + 3 * j, sizeof(float) * 3);
    }
    float a0 = 0, a1 = 0, a2 = 0;
    for (int i = 0; i <= 2 * r; i++) { a0 += line[3 * i]; a1 += line[3 * i + 1]; a2 += line[3 * i + 2]; }
    for (int x = 0; x < w; x++) {
      dst[3 * x] = a0 * inv; dst[3 * x + 1] = a1 * inv; dst[3 * x + 2] = a2 * inv;
      const float *in = line + 3 * (x + 2 * r + 1), *out = line + 3 * x;
      a0 += in[0] - out[0]; a1 += in[1] - out[1]; a2 += in[2] - out[2];
    }
  }
  memset(acc, 0, sizeof(float) * rowlen);
  for (int j = -r; j <= r; j++) {
    const float *row = tmp + (size_t)(j < 0 ? 0 : (j >= h ? h - 1 : j)) * rowlen;
    for (size_t i = 0; i < rowlen; i++) acc[i] += row[i];
  }
  for (int y = 0; y < h; y++) {
    float *dst = cv + y * rowlen;
    for (size_t i = 0; i < rowlen; i++) dst[i] = acc[i] * inv;
    int ja = y + r + 1, jr = y - r;
    const float *add = tmp + (size_t)(ja >= h ? h - 1 : ja) * rowlen, *sub = tmp + (size_t)(jr < 0 ? 0 : jr) * rowlen;
    for (size_t i = 0; i < rowlen; i++) acc[i] += add[i] - sub[i];
  }
  free(tmp); free(line); free(acc);
  return 0;
}

int fl_flowers_draw(uint8_t *out, int w, int h, int c, int K, uint64_t seed) {
  fl_flower_class fc;
  if (w < 16 || h < 16 || w > 8192 || h > 8192 || fl_flowers_class(c, K, &fc))
    return fl_fail("flowers_draw: expected 16..8192 pixels per side and 0 <= class < classes <= %d, "
                   "got %dx%d, class %d of %d", FL_FLOWERS_MAX_CLASSES, w, h, c, K);
  float *cv = malloc(sizeof(float) * 3 * (size_t)w * h);
  if (!cv) return fl_fail_oom("flowers_draw: out of memory");
  uint64_t rng = seed;
  if (draw_background(cv, w, h, &rng)) { free(cv); return fl_fail_oom("flowers_draw: out of memory"); }

  float side = (float)(w < h ? w : h);
  float R = side * uni(&rng, 0.30f, 0.45f);
  float cx = uni(&rng, 0.3f, 0.7f) * w, cy = uni(&rng, 0.3f, 0.7f) * h;

  /* stem to the bottom edge, with one to three leaves */
  rgb green = hsv(uni(&rng, 85, 135), uni(&rng, 0.45f, 0.8f), uni(&rng, 0.3f, 0.6f));
  float bend = uni(&rng, -0.3f, 0.3f) * side;
  float sw = R * uni(&rng, 0.05f, 0.09f);
  float px = cx, py = cy;
  for (int i = 1; i <= 8; i++) {
    float t = i / 8.0f;
    float qx = cx + bend * t * t, qy = cy + (h - cy + 10) * t;
    draw_segment(cv, w, h, px, py, qx, qy, sw, green);
    px = qx; py = qy;
  }
  int nleaves = 1 + (int)(fl_rng_next(&rng) % 3);
  for (int i = 0; i < nleaves; i++) {
    float t = uni(&rng, 0.3f, 0.9f);
    float lx = cx + bend * t * t, ly = cy + (h - cy) * t;
    float ang = (fl_rng_next(&rng) & 1 ? 0.0f : (float)M_PI) + uni(&rng, -0.9f, 0.9f);
    draw_leaf(cv, w, h, lx, ly, R * uni(&rng, 0.6f, 1.2f), R * uni(&rng, 0.12f, 0.25f), ang, green);
  }

  /* sometimes a second, smaller flower of the same class behind the first */
  if (fl_rng_uniform(&rng) < 0.15) {
    flower g;
    float r2 = R * uni(&rng, 0.45f, 0.75f);
    float ang = uni(&rng, 0, (float)TWO_PI), dist = R + r2 * uni(&rng, 0.3f, 1.0f);
    make_flower(&g, &fc, cx + cosf(ang) * dist, cy + sinf(ang) * dist, r2, &rng);
    draw_flower(cv, w, h, &g);
  }
  flower f;
  make_flower(&f, &fc, cx, cy, R, &rng);
  draw_flower(cv, w, h, &f);

  /* lighting: a linear gradient and overall exposure */
  float gx = uni(&rng, -0.35f, 0.35f) / w, gy = uni(&rng, -0.35f, 0.35f) / h, expo = uni(&rng, 0.8f, 1.15f);
  float warm = uni(&rng, -0.04f, 0.04f);
  int blur = (int)(fl_rng_next(&rng) % 5);  /* radius 0, 0, 0, 1, 1 px, two passes (a tent) */
  blur = blur < 3 ? 0 : 1;
  float sigma = uni(&rng, 0.0f, 5.0f) / 255.0f;
  if (blur > 0)
    for (int pass = 0; pass < 2; pass++)
      if (box_blur(cv, w, h, blur)) { free(cv); return fl_fail_oom("flowers_draw: out of memory"); }
  uint64_t nrng = fl_rng_next(&rng);
  for (int y = 0; y < h; y++) {
    float *p = cv + (size_t)y * w * 3;
    uint8_t *o = out + (size_t)y * w * 3;
    for (int x = 0; x < w; x++, p += 3, o += 3) {
      float light = expo * (1.0f + gx * (x - w * 0.5f) + gy * (y - h * 0.5f));
      /* noise: per channel the sum of two 10-bit uniforms (triangular, variance 1/6 of the
       * range squared) from one 64-bit draw per pixel, scaled to standard deviation sigma */
      uint64_t z = sigma > 0 ? fl_rng_next(&nrng) : 0;
      for (int ch = 0; ch < 3; ch++, z >>= 20) {
        float nz = sigma > 0 ? ((float)(z & 0x3FF) + (float)((z >> 10) & 0x3FF) - 1023.0f) * (1.0f / 417.6f) : 0;
        float v = p[ch] * light * (ch == 0 ? 1 + warm : (ch == 2 ? 1 - warm : 1)) + sigma * nz;
        o[ch] = (uint8_t)(clampf(v, 0, 1) * 255.0f + 0.5f);
      }
    }
  }
  free(cv);
  return 0;
}

/* ---------------------------------------------------------------------------------------------
 * Writing a set of files in parallel */

typedef struct {
  const fl_flowers_job *jobs;
  int n, K;
  atomic_int next;
  atomic_int failed;
  pthread_mutex_t lock;
  char first_error[512];   /* the first failing worker's message (fl_fail's are per thread) */
} write_ctx;

static int write_one(const fl_flowers_job *j, int K, uint8_t **pix, size_t *cap) {
  size_t need = (size_t)j->w * j->h * 3;
  if (need > *cap) {
    uint8_t *p = realloc(*pix, need);
    if (!p) return fl_fail_oom("flowers_write: %s: out of memory", j->path);
    *pix = p;
    *cap = need;
  }
  char e[400];   /* the callee's message, copied: fl_fail writes where fl_errmsg reads */
  if (fl_flowers_draw(*pix, j->w, j->h, j->cls, K, j->seed)) {
    snprintf(e, sizeof e, "%s", fl_errmsg());
    return fl_fail("%s: %s", j->path, e);
  }
  unsigned char *jpg = NULL;
  size_t len = 0;
  if (fl_jpeg_encode(*pix, j->w, j->h, 3, j->quality, 0, 1, &jpg, &len)) {
    snprintf(e, sizeof e, "%s", fl_errmsg());
    return fl_fail("flowers_write: %s: %s", j->path, e);
  }
  size_t pl = strlen(j->path);
  char *tmp = malloc(pl + 5);
  if (!tmp) { free(jpg); return fl_fail_oom("flowers_write: out of memory"); }
  memcpy(tmp, j->path, pl);
  memcpy(tmp + pl, ".tmp", 5);
  FILE *f = fopen(tmp, "wb");
  int ok = f != NULL;
  if (ok) ok = fwrite(jpg, 1, len, f) == len;
  if (f && fclose(f) != 0) ok = 0;
  if (ok) ok = rename(tmp, j->path) == 0;
  if (!ok) {
    fl_fail("flowers_write: cannot write %s: %s", j->path, strerror(errno));
    remove(tmp);
  }
  free(tmp);
  free(jpg);
  return ok ? 0 : -1;
}

static void *write_worker(void *arg) {
  write_ctx *c = arg;
  uint8_t *pix = NULL;
  size_t cap = 0;
  for (;;) {
    int i = atomic_fetch_add(&c->next, 1);
    if (i >= c->n || atomic_load(&c->failed)) break;
    if (write_one(&c->jobs[i], c->K, &pix, &cap)) {
      pthread_mutex_lock(&c->lock);
      if (!atomic_load(&c->failed)) snprintf(c->first_error, sizeof c->first_error, "%s", fl_errmsg());
      atomic_store(&c->failed, 1);
      pthread_mutex_unlock(&c->lock);
      break;
    }
  }
  free(pix);
  return NULL;
}

int fl_flowers_write(const fl_flowers_job *jobs, int n, int K, int workers) {
  if (workers < 1) workers = 1;
  if (workers > 64) workers = 64;
  write_ctx c = { .jobs = jobs, .n = n, .K = K };
  atomic_init(&c.next, 0);
  atomic_init(&c.failed, 0);
  pthread_mutex_init(&c.lock, NULL);
  pthread_t th[64];
  int started = 0;
  for (int i = 1; i < workers; i++) {
    if (pthread_create(&th[started], NULL, write_worker, &c) != 0) break;
    started++;
  }
  write_worker(&c);  /* the calling thread works too */
  for (int i = 0; i < started; i++) pthread_join(th[i], NULL);
  pthread_mutex_destroy(&c.lock);
  return atomic_load(&c.failed) ? fl_fail("%s", c.first_error) : 0;
}
