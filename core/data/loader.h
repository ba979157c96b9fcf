/* flowerlua core: the threaded image loader. Plain C11 + pthreads, no Lua.
 *
 * A loader holds a list of n files and a transform (image.h). Each epoch visits the samples in an
 * order that is a pure function of (seed, epoch) -- fl_permutation below -- and cuts it into
 * batches of batch_size (the last one shorter unless drop_last). Sample i of the data set gets its
 * random numbers (crop, flip, jitter) from fl_rng_sample_seed(seed, epoch, i). Which thread decodes
 * a sample changes nothing, so the batches are identical for any number of workers.
 *
 * Threads: `workers` threads claim samples one at a time, in epoch order, and write them into a
 * ring of `prefetch` batch slots; a worker may only claim a sample whose batch is fewer than
 * `prefetch` batches ahead of the one the consumer waits for, so memory is bounded by
 * prefetch x (batch buffer) + workers x (one decoded image), whatever the data set's size.
 * With workers = 0 the consumer decodes each batch itself, in fl_loader_next.
 *
 * Batch buffers come from the caller's allocator (the Lua binding hands out tensor storage), so a
 * finished batch is given away without a copy: fl_loader_next returns the buffer and its handle,
 * and the slot gets a fresh buffer for the batch `prefetch` places later.
 *
 * Samples that fail to decode are reported in the batch (index, status, message) and removed from
 * it: the rows after them move up, so a batch holds n <= batch_size good rows. */
#ifndef FLOWER_LOADER_H
#define FLOWER_LOADER_H

#include <stddef.h>
#include <stdint.h>

#include "image.h"

typedef enum { FL_OUT_U8, FL_OUT_F32 } fl_out_dtype;

/* Applied to float32 output only (uint8 output is always raw 0..255 RGB):
 *   NONE:  x                                  (0..255, RGB) -- the default: models preprocess
 *   CAFFE: BGR, x - [103.939, 116.779, 123.68] (Keras's 'caffe': ResNet50)
 *   TF:    x / 127.5 - 1                       (Keras's 'tf': Xception, InceptionV3, InceptionResNetV2)
 *   TORCH: (x / 255 - [0.485, 0.456, 0.406]) / [0.229, 0.224, 0.225]  (Keras's 'torch') */
typedef enum { FL_PRE_NONE, FL_PRE_CAFFE, FL_PRE_TF, FL_PRE_TORCH, FL_NPRE } fl_preprocess;
const char *fl_preprocess_name(int p);             /* "none", "caffe", "tf", "torch" */
int fl_preprocess_from_name(const char *name);     /* -1 if unknown */

/* Writes one h x w RGB image into an NHWC row of dtype `dt`, applying `pre` (float32 only). */
void fl_pixels_convert(const uint8_t *rgb, size_t npix, void *dst, int dt, int pre);

/* Allocator for batch buffers: returns the data pointer (NULL on failure) and sets *handle to what
 * must be given back to free (the binding: an fl_storage). Called from the consumer's thread only. */
typedef struct fl_batch_alloc {
  void *(*alloc)(void *ud, size_t nbytes, void **handle);
  void (*release)(void *ud, void *handle);
  void *ud;
} fl_batch_alloc;

typedef struct fl_loader_config {
  int64_t n;                   /* samples */
  const char *const *paths;    /* n paths, copied */
  int batch_size;
  int shuffle;
  int drop_last;
  int workers;                 /* 0 = decode in the consumer's thread */
  int prefetch;                /* batch slots; 0 = default (2 x workers, at least 2) */
  uint64_t seed;
  fl_transform tf;             /* must not be FL_TF_NONE (batches need one size) */
  int dtype;                   /* fl_out_dtype */
  int preprocess;              /* fl_preprocess */
  fl_batch_alloc alloc;
} fl_loader_config;

typedef struct fl_loader fl_loader;

/* Errors: recorded with fl_fail (tensor.h), as everywhere in core. */

/* NULL with a message if the configuration is invalid or memory runs out. */
fl_loader *fl_loader_new(const fl_loader_config *cfg);
/* Stops and joins the workers, gives back every buffer. Tolerates NULL. */
void fl_loader_free(fl_loader *ld);

int64_t fl_loader_num_batches(const fl_loader *ld);
int64_t fl_loader_size(const fl_loader *ld);       /* samples */
size_t fl_loader_sample_bytes(const fl_loader *ld);/* bytes of one output row */

/* Starts (or restarts) epoch `epoch`: abandons whatever the previous epoch had in flight. */
int fl_loader_start(fl_loader *ld, int64_t epoch);
/* The same epoch cut into `size` shards (data-parallel training, core/dist.h): only batches
 * rank, rank + size, ... of the epoch's order are decoded and handed out, each exactly as the
 * whole epoch would give it (same samples, same augmentation). size 1 is fl_loader_start. */
int fl_loader_start_shard(fl_loader *ld, int64_t epoch, int rank, int size);

typedef struct fl_loader_failure {
  int64_t index;               /* data set index of the sample */
  int status;                  /* fl_img_status */
  char message[192];
} fl_loader_failure;

typedef struct fl_loader_batch {
  int64_t number;              /* batch number in the epoch, from 0 */
  int n;                       /* good rows */
  int requested;               /* rows before failures were removed */
  void *data;                  /* n rows of fl_loader_sample_bytes(); the caller now owns it */
  void *handle;                /* ... through this handle (give it back with alloc.release) */
  const int64_t *index;        /* data set index of each good row (valid until the next call) */
  int nfailed;
  const fl_loader_failure *failed; /* (valid until the next call) */
} fl_loader_batch;

/* Waits for the next batch of the current epoch. Returns 1 with *b filled, 0 when the epoch is
 * over, -1 with a message (no epoch started, out of memory). */
int fl_loader_next(fl_loader *ld, fl_loader_batch *b);

/* ---- permutations ---- */
/* perm[0..n) = a permutation of 0..n-1 drawn as numpy.random.RandomState(seed).permutation(n)
 * draws it (MT19937 seeded by init_genrand(seed), then a Fisher-Yates shuffle from the end whose
 * bounded integers use masked rejection on 32-bit outputs), so the split matches scikit-learn's
 * train_test_split(random_state=seed) and is identical on every machine. seed < 2^32, n < 2^32. */
int fl_permutation(int64_t *perm, int64_t n, uint32_t seed);
/* The generator behind it, kept between calls as numpy's RandomState keeps it: scikit-learn's
 * stratified split draws several permutations in a row from one stream. */
typedef struct fl_mt19937 { uint32_t mt[624]; int pos; } fl_mt19937;
void fl_mt19937_seed(fl_mt19937 *s, uint32_t seed);
/* perm[0..n) = RandomState.permutation(n), continuing the stream; -1 (fl_fail) if n >= 2^32 */
int fl_mt19937_permutation(fl_mt19937 *s, int64_t *perm, int64_t n);
/* The 32-bit seed of epoch `epoch`'s shuffle for a loader seeded with `seed`. */
uint32_t fl_epoch_seed(uint64_t seed, int64_t epoch);

/* ---- a pool for one-off parallel loops ---- */
/* Runs fn(ctx, i, worker) for i in [0, n) on `workers` threads (the caller is one of them);
 * items are claimed in order, one at a time. Returns 0, or -1 if no thread could be started
 * (then everything ran on the caller). */
int fl_parallel_for(int64_t n, int workers, void (*fn)(void *ctx, int64_t i, int worker), void *ctx);

/* ---- statistics ---- */
/* Per-channel sums over whole decoded images (DCT-scaled by scale/8, 0 = 8): exact integers. */
typedef struct fl_pixel_sums {
  uint64_t pixels;
  uint64_t sum[3];
  uint64_t sumsq[3];
} fl_pixel_sums;
/* Adds the images of paths[0..n) to *acc using `workers` threads; per-file failures are written to
 * status[i] (0 = ok) and, when messages is not NULL, to messages[i] (192 bytes each). */
int fl_pixel_stats(const char *const *paths, int64_t n, int workers, int scale, fl_pixel_sums *acc,
                   int *status, char (*messages)[192]);

#endif
