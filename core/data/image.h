/* flowerlua core: JPEG decoding and encoding (libjpeg-turbo through the libjpeg API), resampling,
 * crops, flips and colour jitter on 8-bit RGB images. Plain C11, no Lua, no global state:
 * everything a thread needs lives in its own fl_decoder, so loader workers run in parallel.
 *
 * Images are RGB, 3 bytes per pixel, rows packed (stride = 3 * w), top row first.
 *
 * Decoding pipeline for one sample (fl_decoder_transform):
 *   1. read the header; find the EXIF orientation (APP1) and the displayed size W x H;
 *   2. choose the crop box in displayed full-resolution coordinates (center / random-resized /
 *      whole image), drawing random numbers from a per-sample stream;
 *   3. pick libjpeg-turbo's DCT scaling M/8 among M = 1, 2, 4, 8 (the scales with SIMD code; 3/8,
 *      5/8, 6/8 and 7/8 decode slower than the whole image): the smallest whose decoded crop is
 *      still at least the output size in both directions, so the IDCT does the coarse downscaling
 *      and the resampler shrinks by less than 2 (or enlarges);
 *   4. decode (baseline or progressive; grayscale expanded to RGB; CMYK/YCCK converted to RGB),
 *      reading only the rows the crop needs, and apply the EXIF orientation;
 *   5. resample the crop box to the output size with a separable convolution filter computed the
 *      way Pillow's Image.resize(size, filter, box) does it (same support, same fixed-point
 *      arithmetic, horizontal pass first with an 8-bit intermediate), so the result equals
 *      Pillow's on the same decoded pixels (tests/lua/test_data_image.lua: max difference 0 over
 *      48 cases, 4 filters; the asserted bound is 1). Default: bilinear, antialiased (the
 *      triangle's support widens with the shrink factor) -- torchvision's and Pillow's BILINEAR;
 *   6. random horizontal flip, then colour jitter (brightness, contrast, saturation, in that order).
 */
#ifndef FLOWER_IMAGE_H
#define FLOWER_IMAGE_H

#include <stddef.h>
#include <stdint.h>

#include "tensor.h"   /* fl_errmsg(): the message of the last failure on this thread */

/* Why a sample could not be decoded. Stable numbers: the loader reports them per sample. */
typedef enum {
  FL_IMG_OK = 0,
  FL_IMG_MISSING,      /* the file does not exist or cannot be opened */
  FL_IMG_IO,           /* read error */
  FL_IMG_EMPTY,        /* zero bytes */
  FL_IMG_NOT_JPEG,     /* does not start with the JPEG SOI marker */
  FL_IMG_TRUNCATED,    /* the compressed data ends early */
  FL_IMG_CORRUPT,      /* libjpeg rejected the header or the entropy-coded data */
  FL_IMG_TOO_LARGE,    /* more pixels than FL_IMG_MAX_PIXELS */
  FL_IMG_NOMEM,
  FL_IMG_BAD_ARG,      /* invalid transform parameters */
  FL_IMG_NOT_FILE,     /* a directory, FIFO, device or socket: never opened for reading */
  FL_IMG_NSTATUS
} fl_img_status;

#define FL_IMG_MAX_PIXELS ((int64_t)1 << 28)      /* 268 megapixels decoded */
#define FL_IMG_MAX_FILE_BYTES ((int64_t)1 << 28)  /* 256 MiB read: no real photo comes close */

/* Errors: every function here that fails records its reason the way the rest of core does
 * (fl_fail, tensor.h: read it with fl_errmsg(), per thread) and returns a status or -1. */

/* "missing", "io", "empty", "not_jpeg", "truncated", "corrupt", "too_large", "nomem", "bad_arg",
 * "not_file" */
const char *fl_img_status_name(int status);

typedef enum {
  FL_FILTER_BOX,       /* area average (support 0.5 x scale): Pillow's BOX */
  FL_FILTER_BILINEAR,  /* triangle, antialiased when shrinking: Pillow's BILINEAR, torchvision's default */
  FL_FILTER_BICUBIC,   /* Keys cubic, a = -0.5: Pillow's BICUBIC */
  FL_FILTER_LANCZOS,   /* Lanczos-3: Pillow's LANCZOS */
  FL_NFILTERS
} fl_filter;
const char *fl_filter_name(int f);                 /* "box", "bilinear", "bicubic", "lanczos" */
int fl_filter_from_name(const char *name);         /* -1 if unknown */

typedef struct fl_image {
  int w, h;
  uint8_t *data;        /* 3 * w * h bytes, owned */
  size_t cap;           /* bytes allocated */
} fl_image;
void fl_image_free(fl_image *im);
int fl_image_reserve(fl_image *im, int w, int h); /* 0 or -1 (out of memory) */

/* ---- resampling (Pillow-compatible convolution) ---- */

typedef struct fl_resize_ws fl_resize_ws;          /* scratch buffers, reused between calls */
fl_resize_ws *fl_resize_ws_new(void);
void fl_resize_ws_free(fl_resize_ws *ws);

/* Resamples the region box = {x0, y0, x1, y1} (pixel-edge coordinates, may be fractional, must
 * lie inside the source) of src (sw x sh, RGB, row stride sstride bytes) to dst (dw x dh, stride
 * dstride). Returns 0, or a status (FL_IMG_BAD_ARG / FL_IMG_NOMEM). */
int fl_resize(fl_resize_ws *ws, const uint8_t *src, int sw, int sh, size_t sstride, const double box[4],
              uint8_t *dst, int dw, int dh, size_t dstride, fl_filter filter);

/* ---- geometry of one sample ---- */

typedef enum {
  FL_TF_NONE,            /* the whole image at its own size (after DCT scaling by `scale`, if set) */
  FL_TF_RESIZE,          /* the whole image to out_w x out_h, aspect ratio not kept (Keras load_img) */
  FL_TF_CENTER,          /* scale so the shorter side is min(out)/crop_frac, then crop the center */
  FL_TF_RANDOM_RESIZED,  /* Inception / torchvision RandomResizedCrop, then resize to out */
  FL_NTF
} fl_tf_mode;

typedef struct fl_transform {
  int mode;                            /* fl_tf_mode */
  int out_w, out_h;                    /* output size (unused for FL_TF_NONE) */
  double crop_frac;                    /* FL_TF_CENTER: fraction of the shorter side kept, (0, 1] */
  double scale_lo, scale_hi;           /* FL_TF_RANDOM_RESIZED: area fraction range, e.g. 0.08..1 */
  double ratio_lo, ratio_hi;           /* FL_TF_RANDOM_RESIZED: aspect (w/h) range, e.g. 3/4..4/3 */
  int hflip;                           /* flip left-right with probability 1/2 */
  double brightness, contrast, saturation; /* jitter: factor uniform in [1-v, 1+v]; 0 = off */
  int filter;                          /* fl_filter */
  int dct_scaling;                     /* 1: let the IDCT shrink (step 3); 0: always decode at 1/1 */
  int fast;                            /* 1: JDCT_IFAST and plain upsampling (faster, less exact) */
  int none_scale;                      /* FL_TF_NONE: decode at none_scale/8 (0 or 8 = full size) */
  int full_decode;                     /* 1: decode every row and column even when the crop needs
                                        * fewer (tests compare the two; results are identical) */
} fl_transform;

/* Fills t with the defaults: FL_TF_CENTER, 224x224, crop_frac 0.875, scale 0.08..1, ratio 3/4..4/3,
 * no flip, no jitter, bilinear, DCT scaling on, exact DCT. */
void fl_transform_defaults(fl_transform *t);
/* 0, or FL_IMG_BAD_ARG with a message naming the bad field. */
int fl_transform_check(const fl_transform *t);

/* ---- decoder (one per thread) ---- */

typedef struct fl_decoder fl_decoder;
fl_decoder *fl_decoder_new(void);                  /* NULL if out of memory */
void fl_decoder_free(fl_decoder *d);

typedef struct fl_jpeg_info {
  int width, height;         /* displayed size (after EXIF orientation) */
  int stored_width, stored_height;
  int components;            /* 1 (gray), 3 (YCbCr/RGB), 4 (CMYK/YCCK) */
  int progressive;
  int orientation;           /* EXIF orientation 1..8 (1 when absent) */
} fl_jpeg_info;

/* Reads the whole file path into the decoder's buffer; *buf and *len point into it (valid until the
 * next call). Returns FL_IMG_OK or MISSING / IO / EMPTY / NOMEM / NOT_FILE (not a regular file:
 * refused without blocking) / NOT_JPEG / TRUNCATED (checked on the first bytes, before the rest is
 * read) / TOO_LARGE (over FL_IMG_MAX_FILE_BYTES), with a message. */
int fl_decoder_read_file(fl_decoder *d, const char *path, const uint8_t **buf, size_t *len);

int fl_decoder_info(fl_decoder *d, const uint8_t *buf, size_t len, fl_jpeg_info *info);

/* Decodes buf and applies t. `rng` is the per-sample random stream state (splitmix64, see
 * fl_rng_next); it is advanced only by the random choices t asks for. For FL_TF_NONE the result
 * size is the image's (scaled) size; otherwise out_w x out_h. The result is written into *out,
 * which is grown as needed. Returns FL_IMG_OK or a status, with a message. */
int fl_decoder_transform(fl_decoder *d, const uint8_t *buf, size_t len, const fl_transform *t,
                         uint64_t *rng, fl_image *out);

/* ---- colour / geometry helpers on RGB images ---- */
void fl_image_hflip(uint8_t *rgb, int w, int h);
/* factors: multiply (brightness), blend with the image's mean gray (contrast), blend with each
 * pixel's gray (saturation); 1 = unchanged. Gray = 0.299 R + 0.587 G + 0.114 B (ITU-R 601). */
void fl_image_jitter(uint8_t *rgb, int w, int h, double brightness, double contrast, double saturation);
/* Applies EXIF orientation o (1..8) to src (sw x sh) into dst, whose size is returned in *dw, *dh. */
void fl_image_orient(const uint8_t *src, int sw, int sh, int o, uint8_t *dst, int *dw, int *dh);

/* ---- encoding ---- */
/* Encodes RGB (channels 3) or gray (channels 1) as a baseline or progressive JPEG; for RGB,
 * `subsample` 1 gives 4:2:0 chroma (what cameras write), 0 gives 4:4:4.
 * *out is malloc'ed (free it); returns 0 or -1 with a message. */
int fl_jpeg_encode(const uint8_t *pixels, int w, int h, int channels, int quality, int progressive,
                   int subsample, unsigned char **out, size_t *outlen);

/* ---- random numbers ---- */
/* splitmix64 (Steele, Lea, Flood 2014): state += 0x9E3779B97F4A7C15, then the output mix. Fixed
 * integer arithmetic, so every machine draws the same numbers. */
uint64_t fl_rng_next(uint64_t *state);
double fl_rng_uniform(uint64_t *state);            /* [0, 1), 53 bits */
uint64_t fl_rng_below(uint64_t *state, uint64_t n); /* uniform in [0, n), n >= 1, by rejection */
/* The seed of sample `index` in epoch `epoch` of a loader seeded with `seed`. */
uint64_t fl_rng_sample_seed(uint64_t seed, int64_t epoch, int64_t index);

#endif
