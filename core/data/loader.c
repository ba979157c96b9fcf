/* The threaded image loader (see loader.h for the design). */
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "loader.h"
#include "tensor.h"

/* ------------------------------------------------------------------------------------------------
 * Pixel conversion */

static const char *pre_names[FL_NPRE] = { "none", "caffe", "tf", "torch" };

const char *fl_preprocess_name(int p) { return (p >= 0 && p < FL_NPRE) ? pre_names[p] : "unknown"; }

int fl_preprocess_from_name(const char *name) {
  for (int i = 0; i < FL_NPRE; i++)
    if (strcmp(name, pre_names[i]) == 0) return i;
  return -1;
}

__attribute__((optimize("O3")))
void fl_pixels_convert(const uint8_t *rgb, size_t npix, void *dst, int dt, int pre) {
  if (dt == FL_OUT_U8) {
    memcpy(dst, rgb, npix * 3);
    return;
  }
  float *o = dst;
  switch (pre) {
    case FL_PRE_CAFFE:  /* BGR order, ImageNet mean subtracted, no scaling */
      for (size_t i = 0; i < npix; i++) {
        o[3 * i] = (float)rgb[3 * i + 2] - 103.939f;
        o[3 * i + 1] = (float)rgb[3 * i + 1] - 116.779f;
        o[3 * i + 2] = (float)rgb[3 * i] - 123.68f;
      }
      break;
    case FL_PRE_TF:
      for (size_t i = 0; i < 3 * npix; i++) o[i] = (float)rgb[i] / 127.5f - 1.0f;
      break;
    case FL_PRE_TORCH: {
      const float mean[3] = { 0.485f, 0.456f, 0.406f }, std[3] = { 0.229f, 0.224f, 0.225f };
      for (size_t i = 0; i < npix; i++)
        for (int c = 0; c < 3; c++) o[3 * i + c] = ((float)rgb[3 * i + c] / 255.0f - mean[c]) / std[c];
      break;
    }
    default:
      for (size_t i = 0; i < 3 * npix; i++) o[i] = (float)rgb[i];
  }
}

/* ------------------------------------------------------------------------------------------------
 * MT19937 and the numpy-compatible permutation */

void fl_mt19937_seed(fl_mt19937 *s, uint32_t seed) {
  s->mt[0] = seed;
  for (int i = 1; i < 624; i++) s->mt[i] = 1812433253u * (s->mt[i - 1] ^ (s->mt[i - 1] >> 30)) + (uint32_t)i;
  s->pos = 624;
}

static uint32_t mt_next(fl_mt19937 *s) {
  if (s->pos >= 624) {
    for (int i = 0; i < 624; i++) {
      uint32_t y = (s->mt[i] & 0x80000000u) | (s->mt[(i + 1) % 624] & 0x7fffffffu);
      s->mt[i] = s->mt[(i + 397) % 624] ^ (y >> 1) ^ ((y & 1u) ? 0x9908b0dfu : 0u);
    }
    s->pos = 0;
  }
  uint32_t y = s->mt[s->pos++];
  y ^= y >> 11;
  y ^= (y << 7) & 0x9d2c5680u;
  y ^= (y << 15) & 0xefc60000u;
  y ^= y >> 18;
  return y;
}

/* uniform in [0, max]: the smallest all-ones mask covering max, rejecting values above max */
static uint32_t mt_interval(fl_mt19937 *s, uint32_t max) {
  if (max == 0) return 0;
  uint32_t mask = max;
  mask |= mask >> 1; mask |= mask >> 2; mask |= mask >> 4; mask |= mask >> 8; mask |= mask >> 16;
  uint32_t v;
  while ((v = mt_next(s) & mask) > max) {}
  return v;
}

int fl_mt19937_permutation(fl_mt19937 *s, int64_t *perm, int64_t n) {
  if (n < 0 || n > (int64_t)UINT32_MAX) return fl_fail("permutation: n must be 0..2^32-1, got %lld", (long long)n);
  for (int64_t i = 0; i < n; i++) perm[i] = i;
  for (int64_t i = n - 1; i >= 1; i--) {
    int64_t j = mt_interval(s, (uint32_t)i);
    int64_t t = perm[i];
    perm[i] = perm[j];
    perm[j] = t;
  }
  return 0;
}

int fl_permutation(int64_t *perm, int64_t n, uint32_t seed) {
  fl_mt19937 *s = malloc(sizeof *s);
  if (!s) return fl_fail_oom("permutation: out of memory");
  fl_mt19937_seed(s, seed);
  int r = fl_mt19937_permutation(s, perm, n);
  free(s);
  return r;
}

uint32_t fl_epoch_seed(uint64_t seed, int64_t epoch) {
  return (uint32_t)(fl_rng_sample_seed(seed, epoch, -1) >> 32);
}

/* ------------------------------------------------------------------------------------------------
 * Parallel for */

typedef struct {
  int64_t n;
  atomic_llong next;
  void (*fn)(void *, int64_t, int);
  void *ctx;
} pfor;

typedef struct { pfor *p; int worker; } pfor_arg;

static void *pfor_run(void *arg) {
  pfor_arg *a = arg;
  for (;;) {
    int64_t i = atomic_fetch_add(&a->p->next, 1);
    if (i >= a->p->n) break;
    a->p->fn(a->p->ctx, i, a->worker);
  }
  return NULL;
}

int fl_parallel_for(int64_t n, int workers, void (*fn)(void *ctx, int64_t i, int worker), void *ctx) {
  if (workers < 1) workers = 1;
  if (workers > 256) workers = 256;
  pfor p = { .n = n, .fn = fn, .ctx = ctx };
  atomic_init(&p.next, 0);
  pthread_t th[256];
  pfor_arg args[256];
  int started = 0;
  for (int w = 1; w < workers && w < n; w++) {
    args[started] = (pfor_arg){ &p, w };
    if (pthread_create(&th[started], NULL, pfor_run, &args[started]) != 0) break;
    started++;
  }
  pfor_arg self = { &p, 0 };
  pfor_run(&self);
  for (int i = 0; i < started; i++) pthread_join(th[i], NULL);
  return (workers > 1 && n > 1 && started == 0) ? -1 : 0;
}

/* ------------------------------------------------------------------------------------------------
 * Pixel statistics */

typedef struct {
  const char *const *paths;
  int scale;
  fl_decoder **dec;
  fl_image *img;
  fl_pixel_sums *part;   /* one per worker */
  int *status;
  char (*messages)[192];
} stats_ctx;

static void stats_one(void *arg, int64_t i, int w) {
  stats_ctx *c = arg;
  fl_decoder *d = c->dec[w];
  const uint8_t *buf;
  size_t len;
  int s = d ? fl_decoder_read_file(d, c->paths[i], &buf, &len) : FL_IMG_NOMEM;
  if (s == 0) {
    fl_transform t;
    fl_transform_defaults(&t);
    t.mode = FL_TF_NONE;
    t.none_scale = c->scale;
    uint64_t rng = 0;
    s = fl_decoder_transform(d, buf, len, &t, &rng, &c->img[w]);
  }
  c->status[i] = s;
  if (s) {
    if (c->messages) snprintf(c->messages[i], 192, "%s", d ? fl_errmsg() : "out of memory");
    return;
  }
  const uint8_t *p = c->img[w].data;
  size_t npix = (size_t)c->img[w].w * c->img[w].h;
  uint64_t s0 = 0, s1 = 0, s2 = 0, q0 = 0, q1 = 0, q2 = 0;
  for (size_t k = 0; k < npix; k++, p += 3) {
    s0 += p[0]; s1 += p[1]; s2 += p[2];
    q0 += (uint32_t)p[0] * p[0]; q1 += (uint32_t)p[1] * p[1]; q2 += (uint32_t)p[2] * p[2];
  }
  fl_pixel_sums *a = &c->part[w];
  a->pixels += npix;
  a->sum[0] += s0; a->sum[1] += s1; a->sum[2] += s2;
  a->sumsq[0] += q0; a->sumsq[1] += q1; a->sumsq[2] += q2;
}

int fl_pixel_stats(const char *const *paths, int64_t n, int workers, int scale, fl_pixel_sums *acc,
                   int *status, char (*messages)[192]) {
  if (workers < 1) workers = 1;
  if (workers > 256) workers = 256;
  stats_ctx c = { .paths = paths, .scale = scale, .status = status, .messages = messages };
  c.dec = calloc((size_t)workers, sizeof *c.dec);
  c.img = calloc((size_t)workers, sizeof *c.img);
  c.part = calloc((size_t)workers, sizeof *c.part);
  int rc = -1;
  if (c.dec && c.img && c.part) {
    for (int w = 0; w < workers; w++) c.dec[w] = fl_decoder_new();
    fl_parallel_for(n, workers, stats_one, &c);
    for (int w = 0; w < workers; w++) {
      acc->pixels += c.part[w].pixels;
      for (int k = 0; k < 3; k++) { acc->sum[k] += c.part[w].sum[k]; acc->sumsq[k] += c.part[w].sumsq[k]; }
    }
    rc = 0;
  }
  if (c.dec) for (int w = 0; w < workers; w++) fl_decoder_free(c.dec[w]);
  if (c.img) for (int w = 0; w < workers; w++) fl_image_free(&c.img[w]);
  free(c.dec); free(c.img); free(c.part);
  return rc;
}

/* ------------------------------------------------------------------------------------------------
 * The loader */

typedef struct {
  int64_t batch;          /* batch number held, -1 if none */
  int count;              /* rows in it */
  int done;               /* rows finished (under the lock) */
  void *data, *handle;    /* output buffer */
  int *status;            /* batch_size entries */
  char (*message)[192];   /* batch_size entries */
} slot;

typedef struct {
  fl_loader *ld;
  fl_decoder *dec;
  fl_image img;
  pthread_t thread;
  int running;
} worker;

struct fl_loader {
  /* configuration (immutable after creation) */
  int64_t n;
  char **paths;
  char *path_store;
  int batch_size, shuffle, drop_last, nworkers, nslots;
  uint64_t seed;
  fl_transform tf;
  int dtype, pre;
  fl_batch_alloc alloc;
  int64_t nbatches;
  size_t sample_bytes;
  int64_t epoch_batches;    /* batches of the current epoch: nbatches, or a shard's (start_shard) */

  /* epoch state; perm/epoch change only while no worker holds an item */
  int64_t *perm;
  int64_t epoch;
  int started;

  pthread_mutex_t mu;
  pthread_cond_t work_cv, done_cv;
  int64_t next_item, total_items, consumer;
  int inflight, quit;
  unsigned generation;
  slot *slots;
  worker *workers;
  worker inline_worker;     /* workers = 0: the consumer decodes */

  /* what fl_loader_next hands out (consumer side) */
  int64_t *out_index;
  fl_loader_failure *out_failed;
};

int64_t fl_loader_num_batches(const fl_loader *ld) { return ld->nbatches; }
int64_t fl_loader_size(const fl_loader *ld) { return ld->n; }
size_t fl_loader_sample_bytes(const fl_loader *ld) { return ld->sample_bytes; }

static int batch_rows(const fl_loader *ld, int64_t b) {
  int64_t start = b * ld->batch_size, end = start + ld->batch_size;
  if (end > ld->total_items) end = ld->total_items;
  return (int)(end - start);
}

/* Decodes data set sample idx of the current epoch into row `dst`; status and message out. */
static void process_sample(fl_loader *ld, worker *w, int64_t idx, int64_t epoch, void *dst, int *status,
                           char *message) {
  const uint8_t *buf;
  size_t len;
  int s = fl_decoder_read_file(w->dec, ld->paths[idx], &buf, &len);
  if (s == 0) {
    uint64_t rng = fl_rng_sample_seed(ld->seed, epoch, idx);
    s = fl_decoder_transform(w->dec, buf, len, &ld->tf, &rng, &w->img);
  }
  if (s == 0) fl_pixels_convert(w->img.data, (size_t)ld->tf.out_w * ld->tf.out_h, dst, ld->dtype, ld->pre);
  *status = s;
  if (s) snprintf(message, 192, "%s", fl_errmsg());
}

static void *worker_main(void *arg) {
  worker *w = arg;
  fl_loader *ld = w->ld;
  pthread_mutex_lock(&ld->mu);
  for (;;) {
    while (!ld->quit && !(ld->next_item < ld->total_items &&
                          ld->next_item / ld->batch_size < ld->consumer + ld->nslots))
      pthread_cond_wait(&ld->work_cv, &ld->mu);
    if (ld->quit) break;
    int64_t p = ld->next_item++;
    unsigned gen = ld->generation;
    slot *s = &ld->slots[(p / ld->batch_size) % ld->nslots];
    int row = (int)(p % ld->batch_size);
    char *dst = (char *)s->data + (size_t)row * ld->sample_bytes;
    int64_t idx = ld->perm[p], epoch = ld->epoch;
    ld->inflight++;
    pthread_mutex_unlock(&ld->mu);

    process_sample(ld, w, idx, epoch, dst, &s->status[row], s->message[row]);

    pthread_mutex_lock(&ld->mu);
    ld->inflight--;
    if (gen == ld->generation && ++s->done == s->count) pthread_cond_broadcast(&ld->done_cv);
    if (ld->inflight == 0) pthread_cond_broadcast(&ld->done_cv);
  }
  pthread_mutex_unlock(&ld->mu);
  return NULL;
}

static void release_buffers(fl_loader *ld) {
  for (int i = 0; i < ld->nslots; i++) {
    slot *s = &ld->slots[i];
    if (s->handle) ld->alloc.release(ld->alloc.ud, s->handle);
    s->handle = s->data = NULL;
  }
}

void fl_loader_free(fl_loader *ld) {
  if (!ld) return;
  if (ld->workers) {
    pthread_mutex_lock(&ld->mu);
    ld->quit = 1;
    pthread_cond_broadcast(&ld->work_cv);
    pthread_mutex_unlock(&ld->mu);
    for (int i = 0; i < ld->nworkers; i++) {
      worker *w = &ld->workers[i];
      if (w->running) pthread_join(w->thread, NULL);
      fl_decoder_free(w->dec);
      fl_image_free(&w->img);
    }
    free(ld->workers);
  }
  fl_decoder_free(ld->inline_worker.dec);
  fl_image_free(&ld->inline_worker.img);
  if (ld->slots) {
    release_buffers(ld);
    for (int i = 0; i < ld->nslots; i++) { free(ld->slots[i].status); free(ld->slots[i].message); }
    free(ld->slots);
  }
  pthread_mutex_destroy(&ld->mu);
  pthread_cond_destroy(&ld->work_cv);
  pthread_cond_destroy(&ld->done_cv);
  free(ld->perm);
  free(ld->paths);
  free(ld->path_store);
  free(ld->out_index);
  free(ld->out_failed);
  free(ld);
}

fl_loader *fl_loader_new(const fl_loader_config *cfg) {
  if (cfg->n < 0 || cfg->n > (int64_t)UINT32_MAX) { fl_fail("loader: data set size %lld out of range", (long long)cfg->n); return NULL; }
  if (cfg->batch_size < 1 || cfg->batch_size > 1 << 20) { fl_fail("loader: batch_size must be >= 1, got %d", cfg->batch_size); return NULL; }
  if (cfg->workers < 0 || cfg->workers > 256) { fl_fail("loader: workers must be 0..256, got %d", cfg->workers); return NULL; }
  if (cfg->prefetch < 0 || cfg->prefetch > 1024) { fl_fail("loader: prefetch must be 0..1024, got %d", cfg->prefetch); return NULL; }
  if (cfg->dtype != FL_OUT_U8 && cfg->dtype != FL_OUT_F32) { fl_fail("loader: unknown output dtype %d", cfg->dtype); return NULL; }
  if (cfg->preprocess < 0 || cfg->preprocess >= FL_NPRE) { fl_fail("loader: unknown preprocessing %d", cfg->preprocess); return NULL; }
  if (cfg->dtype == FL_OUT_U8 && cfg->preprocess != FL_PRE_NONE) {
    fl_fail("loader: preprocessing '%s' needs float32 output, got uint8", fl_preprocess_name(cfg->preprocess));
    return NULL;
  }
  if (cfg->tf.mode == FL_TF_NONE) { fl_fail("loader: a transform with an output size is needed (batches hold one size)"); return NULL; }
  if (!cfg->alloc.alloc || !cfg->alloc.release) { fl_fail("loader: no batch allocator"); return NULL; }
  if (fl_transform_check(&cfg->tf)) { fl_fail_prefix("loader"); return NULL; }

  fl_loader *ld = calloc(1, sizeof *ld);
  if (!ld) { fl_fail_oom("loader: out of memory"); return NULL; }
  pthread_mutex_init(&ld->mu, NULL);
  pthread_cond_init(&ld->work_cv, NULL);
  pthread_cond_init(&ld->done_cv, NULL);
  ld->n = cfg->n;
  ld->batch_size = cfg->batch_size;
  ld->shuffle = cfg->shuffle;
  ld->drop_last = cfg->drop_last;
  ld->nworkers = cfg->workers;
  ld->nslots = cfg->prefetch ? cfg->prefetch : (cfg->workers * 2 > 2 ? cfg->workers * 2 : 2);
  ld->seed = cfg->seed;
  ld->tf = cfg->tf;
  ld->dtype = cfg->dtype;
  ld->pre = cfg->preprocess;
  ld->alloc = cfg->alloc;
  ld->nbatches = ld->drop_last ? ld->n / ld->batch_size : (ld->n + ld->batch_size - 1) / ld->batch_size;
  if (ld->nslots > ld->nbatches && ld->nbatches > 0) ld->nslots = (int)ld->nbatches;
  if (ld->nslots < 1) ld->nslots = 1;
  ld->sample_bytes = (size_t)ld->tf.out_w * ld->tf.out_h * 3 * (ld->dtype == FL_OUT_F32 ? 4 : 1);

  /* paths, packed into one block */
  size_t total = 0;
  for (int64_t i = 0; i < ld->n; i++) total += strlen(cfg->paths[i]) + 1;
  ld->path_store = malloc(total ? total : 1);
  ld->paths = malloc(sizeof(char *) * (size_t)(ld->n ? ld->n : 1));
  ld->perm = malloc(sizeof(int64_t) * (size_t)(ld->n ? ld->n : 1));
  ld->slots = calloc((size_t)ld->nslots, sizeof(slot));
  ld->out_index = malloc(sizeof(int64_t) * (size_t)ld->batch_size);
  ld->out_failed = malloc(sizeof(fl_loader_failure) * (size_t)ld->batch_size);
  int ok = ld->path_store && ld->paths && ld->perm && ld->slots && ld->out_index && ld->out_failed;
  for (int i = 0; ok && i < ld->nslots; i++) {
    ld->slots[i].batch = -1;
    ld->slots[i].status = calloc((size_t)ld->batch_size, sizeof(int));
    ld->slots[i].message = calloc((size_t)ld->batch_size, 192);
    ok = ld->slots[i].status && ld->slots[i].message;
  }
  if (!ok) {
    if (!ld->slots) ld->nslots = 0;
    fl_loader_free(ld);
    fl_fail_oom("loader: out of memory");
    return NULL;
  }
  char *q = ld->path_store;
  for (int64_t i = 0; i < ld->n; i++) {
    size_t l = strlen(cfg->paths[i]) + 1;
    memcpy(q, cfg->paths[i], l);
    ld->paths[i] = q;
    q += l;
  }

  ld->inline_worker.ld = ld;
  if (ld->nworkers == 0) {
    ld->inline_worker.dec = fl_decoder_new();
    if (!ld->inline_worker.dec) { fl_loader_free(ld); fl_fail_oom("loader: out of memory"); return NULL; }
  } else {
    ld->workers = calloc((size_t)ld->nworkers, sizeof(worker));
    if (!ld->workers) { fl_loader_free(ld); fl_fail_oom("loader: out of memory"); return NULL; }
    for (int i = 0; i < ld->nworkers; i++) {
      worker *w = &ld->workers[i];
      w->ld = ld;
      w->dec = fl_decoder_new();
      if (!w->dec) { fl_loader_free(ld); fl_fail_oom("loader: out of memory"); return NULL; }
      if (pthread_create(&w->thread, NULL, worker_main, w) != 0) {
        fl_loader_free(ld);
        fl_fail("loader: cannot start worker thread %d", i);
        return NULL;
      }
      w->running = 1;
    }
  }
  return ld;
}

int fl_loader_start(fl_loader *ld, int64_t epoch) {
  return fl_loader_start_shard(ld, epoch, 0, 1);
}

int fl_loader_start_shard(fl_loader *ld, int64_t epoch, int rank, int size) {
  if (size < 1 || rank < 0 || rank >= size)
    return fl_fail("loader: shard %d of %d: expected 0 <= rank < size", rank, size);
  pthread_mutex_lock(&ld->mu);
  /* stop claims and wait for in-flight samples of the old epoch: they write into our slots */
  ld->generation++;
  ld->total_items = 0;
  ld->next_item = 0;
  while (ld->inflight > 0) pthread_cond_wait(&ld->done_cv, &ld->mu);

  ld->epoch = epoch;
  if (ld->shuffle) {
    if (fl_permutation(ld->perm, ld->n, fl_epoch_seed(ld->seed, epoch))) {
      ld->started = 0;
      pthread_mutex_unlock(&ld->mu);
      fl_fail_oom("loader: out of memory");
      return -1;
    }
  } else {
    for (int64_t i = 0; i < ld->n; i++) ld->perm[i] = i;
  }
  ld->total_items = ld->drop_last ? ld->nbatches * ld->batch_size : ld->n;
  ld->epoch_batches = ld->nbatches;
  if (size > 1) {
    /* keep this shard's batches, in order, at the front of perm (moving left never overwrites
     * what is still to move); all are full but the epoch's last, which stays last */
    int64_t out = 0;
    for (int64_t b = rank; b < ld->nbatches; b += size) {
      int64_t first = b * ld->batch_size, end = first + ld->batch_size;
      if (end > ld->total_items) end = ld->total_items;
      memmove(ld->perm + out, ld->perm + first, sizeof(int64_t) * (size_t)(end - first));
      out += end - first;
    }
    ld->total_items = out;
    ld->epoch_batches = (out + ld->batch_size - 1) / ld->batch_size;
  }
  for (int i = 0; i < ld->nslots; i++) {
    slot *s = &ld->slots[i];
    s->batch = i < ld->epoch_batches ? i : -1;
    s->count = s->batch >= 0 ? batch_rows(ld, i) : 0;
    s->done = 0;
    if (s->batch >= 0 && !s->data) {
      s->data = ld->alloc.alloc(ld->alloc.ud, (size_t)ld->batch_size * ld->sample_bytes, &s->handle);
      if (!s->data) {
        s->handle = NULL;
        ld->total_items = 0;
        ld->started = 0;
        pthread_mutex_unlock(&ld->mu);
        fl_fail_oom("loader: out of memory for a batch of %d x %zu bytes", ld->batch_size, ld->sample_bytes);
        return -1;
      }
    }
  }
  ld->consumer = 0;
  ld->started = 1;
  pthread_cond_broadcast(&ld->work_cv);
  pthread_mutex_unlock(&ld->mu);
  return 0;
}

int fl_loader_next(fl_loader *ld, fl_loader_batch *b) {
  if (!ld->started) { fl_fail("loader: no epoch started"); return -1; }
  int64_t k = ld->consumer;
  if (k >= ld->epoch_batches) return 0;
  slot *s = &ld->slots[k % ld->nslots];

  /* the buffer that replaces this one, for batch k + nslots: allocated first, so that a failure
   * leaves the batch in place for a retry */
  void *ndata = NULL, *nhandle = NULL;
  if (k + ld->nslots < ld->epoch_batches) {
    ndata = ld->alloc.alloc(ld->alloc.ud, (size_t)ld->batch_size * ld->sample_bytes, &nhandle);
    if (!ndata) { fl_fail_oom("loader: out of memory for a batch of %d x %zu bytes", ld->batch_size, ld->sample_bytes); return -1; }
  }

  if (ld->nworkers == 0) {
    for (int r = 0; r < s->count; r++) {
      int64_t p = k * ld->batch_size + r;
      process_sample(ld, &ld->inline_worker, ld->perm[p], ld->epoch, (char *)s->data + (size_t)r * ld->sample_bytes,
                     &s->status[r], s->message[r]);
    }
    s->done = s->count;
  } else {
    pthread_mutex_lock(&ld->mu);
    while (s->done < s->count) pthread_cond_wait(&ld->done_cv, &ld->mu);
    pthread_mutex_unlock(&ld->mu);
  }

  /* compact: failed rows are dropped, the others move up in order */
  int n = 0, nf = 0;
  for (int r = 0; r < s->count; r++) {
    int64_t idx = ld->perm[k * ld->batch_size + r];
    if (s->status[r] == 0) {
      if (n != r) memmove((char *)s->data + (size_t)n * ld->sample_bytes, (char *)s->data + (size_t)r * ld->sample_bytes, ld->sample_bytes);
      ld->out_index[n++] = idx;
    } else {
      fl_loader_failure *f = &ld->out_failed[nf++];
      f->index = idx;
      f->status = s->status[r];
      snprintf(f->message, sizeof f->message, "%s", s->message[r]);
    }
  }
  b->number = k;
  b->n = n;
  b->requested = s->count;
  b->data = s->data;
  b->handle = s->handle;
  b->index = ld->out_index;
  b->nfailed = nf;
  b->failed = ld->out_failed;

  pthread_mutex_lock(&ld->mu);
  s->data = ndata;
  s->handle = nhandle;
  s->batch = k + ld->nslots < ld->epoch_batches ? k + ld->nslots : -1;
  s->count = s->batch >= 0 ? batch_rows(ld, s->batch) : 0;
  s->done = 0;
  ld->consumer = k + 1;
  pthread_cond_broadcast(&ld->work_cv);
  pthread_mutex_unlock(&ld->mu);
  return 1;
}
