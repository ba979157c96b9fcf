/* A caching allocator over segments: blocks are carved out of large segments (from cudaMalloc for
 * the CUDA backend), best fit, split when the rest is worth keeping, and merged with free
 * neighbours when freed, so a freed 400 MB activation can serve the next two 200 MB ones instead
 * of sitting in a cache of its exact size while new memory is asked for.
 *
 * Requests are rounded up to 512 bytes. Those up to 1 MB come from 2 MB segments of their own, so
 * small blocks never fragment the large ones; larger ones come from 20 MB segments (up to 10 MB)
 * or from a segment of their own size rounded up to 2 MB. A free block is split when what is left
 * is at least 512 bytes (small) or 1 MB (large). The segments are never given back while any block
 * in them is in use; fl_pool_release gives back those that are wholly free.
 *
 * Plain C, no device calls: the pool only does the bookkeeping of addresses; the caller supplies
 * the functions that obtain and return segments, and makes the pool thread-safe (a lock). */
#ifndef FLOWER_POOL_H
#define FLOWER_POOL_H

#include <stddef.h>
#include <stdint.h>

typedef struct fl_pool fl_pool;

/* seg_alloc: a segment of `bytes` (at least 512-byte aligned), or NULL (out of memory: fl_pool_alloc
 * then fails without a message; the caller may release and retry). seg_free takes it back. */
typedef void *(*fl_pool_seg_alloc)(void *ctx, size_t bytes);
typedef void (*fl_pool_seg_free)(void *ctx, void *base, size_t bytes);

typedef struct fl_pool_stats {
  size_t reserved;       /* bytes in segments */
  size_t allocated;      /* bytes in blocks in use (rounded sizes, split remainders excluded) */
  size_t requested;      /* bytes asked for by the blocks in use (before rounding) */
  size_t peak_reserved, peak_allocated;   /* since fl_pool_new or fl_pool_reset_peak */
  size_t live_blocks;    /* blocks in use */
  size_t segments;       /* segments held */
  size_t free_blocks;    /* free blocks (fragments) across all segments */
  size_t largest_free;   /* the largest free block */
} fl_pool_stats;

/* NULL if out of host memory */
fl_pool *fl_pool_new(fl_pool_seg_alloc seg_alloc, fl_pool_seg_free seg_free, void *ctx);
/* Returns every segment (blocks still in use included) and frees the pool. */
void fl_pool_delete(fl_pool *p);

/* A block for n bytes: its address, and its size in *size (>= n). *fresh is set to 1 when a new
 * segment had to be obtained, else 0 (either may be NULL). NULL when seg_alloc failed or the host
 * ran out of memory for the bookkeeping. */
void *fl_pool_alloc(fl_pool *p, size_t n, size_t *size, int *fresh);
/* Frees the block at ptr: its size, or 0 when ptr is not a block in use (nothing is done). */
size_t fl_pool_free(fl_pool *p, void *ptr);
/* Gives back every segment with no block in use (seg_free): the bytes given back. */
size_t fl_pool_release(fl_pool *p);
void fl_pool_get_stats(const fl_pool *p, fl_pool_stats *st);
void fl_pool_reset_peak(fl_pool *p);   /* the peaks start again from what is held now */
/* The size a request of n bytes is rounded to (0 if n is too large to round). */
size_t fl_pool_round(size_t n);

#endif
