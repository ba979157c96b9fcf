/* flowerlua core: procedurally drawn flower photographs, the built-in synthetic data set.
 *
 * A class is a triple (petal count, petal shape, colour palette). For a K-class set the three
 * attributes take nc x ns x np values, grown one attribute at a time (count, shape, palette, count,
 * ...) until nc * ns * np >= K, so every value of each attribute is shared by several classes and
 * a classifier has to see all three to tell classes apart. Class c gets the mixed-radix digits
 * (c mod nc, (c / nc) mod ns, c / (nc ns)).
 *
 * Each photo varies, from its own seed: flower position, size, rotation, tilt (an affine squash),
 * petal length/width, hue/saturation/value jitter, a second flower of the same class, stem and
 * leaves, background (two octaves of value noise in two random colours, out-of-focus discs of
 * other colours), a lighting gradient, blur (a 3x3 box filter applied twice, on two photos in
 * five) and sensor noise.
 * Drawing is pure C with a float canvas; the same seed gives the same pixels on the same libm. */
#ifndef FLOWER_FLOWERS_H
#define FLOWER_FLOWERS_H

#include <stddef.h>
#include <stdint.h>

#include "tensor.h"   /* fl_errmsg(): the message of the last failure on this thread */

#define FL_FLOWERS_MAX_CLASSES 4096

typedef struct fl_flower_class {
  int petals;     /* number of petals */
  int shape;      /* index into fl_flowers_shape_name */
  int palette;    /* index into the palette table */
} fl_flower_class;

/* Attribute grid sizes for a K-class set (see above). */
void fl_flowers_grid(int K, int *nc, int *ns, int *np);
/* Class c (0-based) of a K-class set; -1 if c or K is out of range. */
int fl_flowers_class(int c, int K, fl_flower_class *out);
const char *fl_flowers_shape_name(int shape);      /* "oval", "pointed", ... */
const char *fl_flowers_palette_name(int palette);  /* "red", "yellow", ... */

/* Draws one w x h RGB photo of class c (of K) from `seed` into rgb (3 w h bytes).
 * Returns 0, or -1 (bad arguments / out of memory) with a message (fl_fail, tensor.h). */
int fl_flowers_draw(uint8_t *rgb, int w, int h, int c, int K, uint64_t seed);

/* One file to write: a JPEG of class `cls` drawn from `seed`, at quality `quality`. */
typedef struct fl_flowers_job {
  const char *path;
  int cls, w, h, quality;
  uint64_t seed;
} fl_flowers_job;

/* Draws and writes every job with `workers` threads; each file is written to path + ".tmp" and
 * renamed into place. Returns 0, or -1 with a message (fl_fail) naming the first failing file. */
int fl_flowers_write(const fl_flowers_job *jobs, int n, int K, int workers);

#endif
