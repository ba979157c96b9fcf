/* The caching allocator over segments (pool.h).
 *
 * Bookkeeping, made so that the per-allocation cost stays flat with thousands of live blocks (a
 * training step allocates and frees a few thousand times, and the host must stay ahead of the GPU):
 *  - each segment's blocks form a doubly linked list in address order, so merging a freed block
 *    with its neighbours is a pointer step;
 *  - blocks in use are found from their address in a hash table (open addressing);
 *  - free blocks are also kept in an array sorted by (class, size, address), where a binary search
 *    finds the best fit. Free blocks are few (fragments), so moving its entries is cheap.
 * Block records come from a free list of their own and are never given back until fl_pool_delete. */
#include "pool.h"

#include <stdlib.h>
#include <string.h>

#define ALIGN ((size_t)512)
#define SMALL_MAX ((size_t)1 << 20)          /* requests up to 1 MB are small */
#define SMALL_SEGMENT ((size_t)2 << 20)
#define LARGE_SEGMENT ((size_t)20 << 20)     /* for large requests up to MID_MAX */
#define MID_MAX ((size_t)10 << 20)
#define LARGE_ROUND ((size_t)2 << 20)        /* a segment for one larger request: rounded to 2 MB */
#define LARGE_SPLIT_MIN ((size_t)1 << 20)    /* smaller rests of large blocks are left in the block */

typedef struct pool_block {
  uintptr_t addr;
  size_t size;
  struct pool_block *prev, *next;   /* neighbours in the segment, by address */
  size_t requested;                 /* in use: the bytes asked for */
  int32_t seg;                      /* index into segs */
  uint8_t used, small;
} pool_block;

typedef struct {      /* a free block's place in the best-fit order */
  uint8_t small;
  size_t size;
  uintptr_t addr;
  pool_block *b;
} free_key;

typedef struct {
  pool_block *first;  /* NULL: a slot to reuse */
  size_t size;
} pool_segment;

struct fl_pool {
  fl_pool_seg_alloc seg_alloc;
  fl_pool_seg_free seg_free;
  void *ctx;
  free_key *frees;            /* by (small, size, addr) */
  size_t nfrees, freecap;
  pool_block **used;          /* hash table of blocks in use by address; NULL: empty slot */
  size_t nused, usedcap;      /* usedcap: a power of two, kept at most half full */
  pool_block *spare;          /* block records to reuse (linked through next) */
  void **chunks;              /* the allocations holding block records */
  size_t nchunks;
  pool_segment *segs;
  size_t nsegs, segcap;
  size_t reserved, allocated, requested, live_segs;
  size_t peak_reserved, peak_allocated;
};

size_t fl_pool_round(size_t n) {
  if (n > SIZE_MAX - ALIGN) return 0;
  if (n == 0) return ALIGN;
  return (n + ALIGN - 1) & ~(ALIGN - 1);
}

static size_t segment_size(size_t r, int small) {
  if (small) return SMALL_SEGMENT;
  if (r <= MID_MAX) return LARGE_SEGMENT;
  if (r > SIZE_MAX - LARGE_ROUND) return r;
  return (r + LARGE_ROUND - 1) & ~(LARGE_ROUND - 1);
}

fl_pool *fl_pool_new(fl_pool_seg_alloc seg_alloc, fl_pool_seg_free seg_free, void *ctx) {
  fl_pool *p = calloc(1, sizeof *p);
  if (!p) return NULL;
  p->seg_alloc = seg_alloc;
  p->seg_free = seg_free;
  p->ctx = ctx;
  return p;
}

void fl_pool_delete(fl_pool *p) {
  if (!p) return;
  for (size_t i = 0; i < p->nsegs; i++)
    if (p->segs[i].first) p->seg_free(p->ctx, (void *)p->segs[i].first->addr, p->segs[i].size);
  for (size_t i = 0; i < p->nchunks; i++) free(p->chunks[i]);
  free(p->chunks);
  free(p->frees);
  free(p->used);
  free(p->segs);
  free(p);
}

/* ---- room: everything an allocation may need is obtained first, so that it cannot fail halfway
 * and a free never needs memory ---- */

#define CHUNK_BLOCKS 256

static int spare_blocks(fl_pool *p, int n) {
  int have = 0;
  for (pool_block *b = p->spare; b && have < n; b = b->next) have++;
  if (have >= n) return 0;
  void **ch = realloc(p->chunks, (p->nchunks + 1) * sizeof *ch);
  if (!ch) return -1;
  p->chunks = ch;
  pool_block *c = malloc(CHUNK_BLOCKS * sizeof *c);
  if (!c) return -1;
  p->chunks[p->nchunks++] = c;
  for (int i = 0; i < CHUNK_BLOCKS; i++) { c[i].next = p->spare; p->spare = &c[i]; }
  return 0;
}

static pool_block *take_block(fl_pool *p) {
  pool_block *b = p->spare;
  p->spare = b->next;
  memset(b, 0, sizeof *b);
  return b;
}

static void give_block(fl_pool *p, pool_block *b) {
  b->next = p->spare;
  p->spare = b;
}

static size_t hash_addr(uintptr_t a, size_t cap) {
  uint64_t h = (uint64_t)a * 0x9E3779B97F4A7C15ull;
  return (size_t)(h >> 17) & (cap - 1);
}

static void used_put(fl_pool *p, pool_block *b) {
  size_t i = hash_addr(b->addr, p->usedcap);
  while (p->used[i]) i = (i + 1) & (p->usedcap - 1);
  p->used[i] = b;
  p->nused++;
}

static int used_room(fl_pool *p) {
  if (2 * (p->nused + 1) <= p->usedcap) return 0;
  size_t cap = p->usedcap ? 2 * p->usedcap : 256;
  pool_block **t = calloc(cap, sizeof *t), **old = p->used;
  if (!t) return -1;
  size_t oldcap = p->usedcap;
  p->used = t;
  p->usedcap = cap;
  p->nused = 0;
  for (size_t i = 0; i < oldcap; i++)
    if (old[i]) used_put(p, old[i]);
  free(old);
  return 0;
}

/* removes and returns the block in use at addr, or NULL */
static pool_block *used_take(fl_pool *p, uintptr_t addr) {
  if (!p->usedcap) return NULL;
  size_t mask = p->usedcap - 1, i = hash_addr(addr, p->usedcap);
  while (p->used[i] && p->used[i]->addr != addr) i = (i + 1) & mask;
  pool_block *b = p->used[i];
  if (!b) return NULL;
  /* backward-shift deletion: later entries of the probe run move up into the hole */
  size_t hole = i;
  for (size_t j = (i + 1) & mask; p->used[j]; j = (j + 1) & mask) {
    size_t home = hash_addr(p->used[j]->addr, p->usedcap);
    /* j's entry may fill the hole if its home is not in (hole, j] (cyclically) */
    int between = hole <= j ? (home > hole && home <= j) : (home > hole || home <= j);
    if (!between) { p->used[hole] = p->used[j]; hole = j; }
  }
  p->used[hole] = NULL;
  p->nused--;
  return b;
}

static int room(fl_pool *p) {
  if (spare_blocks(p, 2) || used_room(p)) return -1;
  /* free blocks never outnumber blocks, and a free only turns a block in use into a free one (or
   * merges): room for every block there may be after this allocation (up to 2 new ones) */
  size_t need = p->nused + p->nfrees + 2;
  if (need > p->freecap) {
    size_t cap = p->freecap ? 2 * p->freecap : 64;
    while (cap < need) cap *= 2;
    free_key *f = realloc(p->frees, cap * sizeof *f);
    if (!f) return -1;
    p->frees = f;
    p->freecap = cap;
  }
  if (p->nsegs == p->segcap) {
    size_t cap = p->segcap ? 2 * p->segcap : 16;
    pool_segment *s = realloc(p->segs, cap * sizeof *s);
    if (!s) return -1;
    p->segs = s;
    p->segcap = cap;
  }
  return 0;
}

/* ---- the free order ---- */

static int key_less(const free_key *a, const free_key *b) {
  if (a->small != b->small) return a->small < b->small;
  if (a->size != b->size) return a->size < b->size;
  return a->addr < b->addr;
}

/* first free entry not less than k */
static size_t frees_lower(const fl_pool *p, const free_key *k) {
  size_t lo = 0, hi = p->nfrees;
  while (lo < hi) {
    size_t mid = lo + (hi - lo) / 2;
    if (key_less(&p->frees[mid], k)) lo = mid + 1;
    else hi = mid;
  }
  return lo;
}

static free_key key_of(pool_block *b) {
  free_key k = {b->small, b->size, b->addr, b};
  return k;
}

/* frees has room for every block (room()), so an insert never overflows */
static void frees_insert(fl_pool *p, pool_block *b) {
  free_key k = key_of(b);
  size_t i = frees_lower(p, &k);
  memmove(&p->frees[i + 1], &p->frees[i], (p->nfrees - i) * sizeof *p->frees);
  p->frees[i] = k;
  p->nfrees++;
}

static void frees_remove_at(fl_pool *p, size_t i) {
  memmove(&p->frees[i], &p->frees[i + 1], (p->nfrees - i - 1) * sizeof *p->frees);
  p->nfrees--;
}

static void frees_remove(fl_pool *p, pool_block *b) {
  free_key k = key_of(b);
  frees_remove_at(p, frees_lower(p, &k));
}

/* ---- allocation ---- */

/* a new segment for a request of r bytes, as one free block (not in frees), or NULL */
static pool_block *add_segment(fl_pool *p, size_t r, int small) {
  size_t size = segment_size(r, small);
  void *base = p->seg_alloc(p->ctx, size);
  if (!base) return NULL;
  size_t s = 0;
  while (s < p->nsegs && p->segs[s].first) s++;
  if (s == p->nsegs) p->nsegs++;
  pool_block *b = take_block(p);
  b->addr = (uintptr_t)base;
  b->size = size;
  b->seg = (int32_t)s;
  b->small = (uint8_t)small;
  p->segs[s].first = b;
  p->segs[s].size = size;
  p->reserved += size;
  if (p->reserved > p->peak_reserved) p->peak_reserved = p->reserved;
  p->live_segs++;
  return b;
}

void *fl_pool_alloc(fl_pool *p, size_t n, size_t *size, int *fresh) {
  size_t r = fl_pool_round(n);
  if (!r || room(p)) return NULL;
  int small = r <= SMALL_MAX;
  free_key want = {(uint8_t)small, r, 0, NULL};
  size_t j = frees_lower(p, &want);
  pool_block *b;
  int made = 0;
  if (j < p->nfrees && p->frees[j].small == small) {   /* the smallest free block that fits */
    b = p->frees[j].b;
    frees_remove_at(p, j);
  } else {
    if (!(b = add_segment(p, r, small))) return NULL;
    made = 1;
  }
  size_t rest = b->size - r;
  if (rest >= (small ? ALIGN : LARGE_SPLIT_MIN)) {
    pool_block *tail = take_block(p);
    tail->addr = b->addr + r;
    tail->size = rest;
    tail->seg = b->seg;
    tail->small = b->small;
    tail->prev = b;
    tail->next = b->next;
    if (b->next) b->next->prev = tail;
    b->next = tail;
    b->size = r;
    frees_insert(p, tail);
  }
  b->used = 1;
  b->requested = n;
  used_put(p, b);
  p->allocated += b->size;
  p->requested += n;
  if (p->allocated > p->peak_allocated) p->peak_allocated = p->allocated;
  if (size) *size = b->size;
  if (fresh) *fresh = made;
  return (void *)b->addr;
}

/* b absorbs its next neighbour (both free, the neighbour out of frees already) */
static void absorb_next(fl_pool *p, pool_block *b) {
  pool_block *nx = b->next;
  b->size += nx->size;
  b->next = nx->next;
  if (nx->next) nx->next->prev = b;
  give_block(p, nx);
}

size_t fl_pool_free(fl_pool *p, void *ptr) {
  pool_block *b = used_take(p, (uintptr_t)ptr);
  if (!b) return 0;
  size_t size = b->size;
  p->allocated -= size;
  p->requested -= b->requested;
  b->used = 0;
  if (b->next && !b->next->used) {
    frees_remove(p, b->next);
    absorb_next(p, b);
  }
  if (b->prev && !b->prev->used) {
    pool_block *pv = b->prev;
    frees_remove(p, pv);
    absorb_next(p, pv);
    b = pv;
  }
  frees_insert(p, b);
  return size;
}

size_t fl_pool_release(fl_pool *p) {
  size_t given = 0;
  for (size_t s = 0; s < p->nsegs; s++) {
    pool_block *b = p->segs[s].first;
    if (!b || b->used || b->next) continue;   /* one free block spanning the segment: all of it free */
    frees_remove(p, b);
    p->seg_free(p->ctx, (void *)b->addr, p->segs[s].size);
    p->reserved -= p->segs[s].size;
    given += p->segs[s].size;
    p->segs[s].first = NULL;
    p->live_segs--;
    give_block(p, b);
  }
  while (p->nsegs > 0 && !p->segs[p->nsegs - 1].first) p->nsegs--;
  return given;
}

void fl_pool_get_stats(const fl_pool *p, fl_pool_stats *st) {
  memset(st, 0, sizeof *st);
  st->reserved = p->reserved;
  st->allocated = p->allocated;
  st->requested = p->requested;
  st->peak_reserved = p->peak_reserved;
  st->peak_allocated = p->peak_allocated;
  st->live_blocks = p->nused;
  st->segments = p->live_segs;
  st->free_blocks = p->nfrees;
  for (size_t i = 0; i < p->nfrees; i++)
    if (p->frees[i].size > st->largest_free) st->largest_free = p->frees[i].size;
}

void fl_pool_reset_peak(fl_pool *p) {
  p->peak_reserved = p->reserved;
  p->peak_allocated = p->allocated;
}
