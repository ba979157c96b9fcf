/* The caching allocator over segments (core/pool.h), the CUDA backend's device allocator. The pool
 * never touches the memory it hands out, so these tests give it made-up address ranges: segments of
 * gigabytes cost nothing, and a block's place is checked by arithmetic (inside a live segment, no
 * two live blocks overlapping, sizes adding up to the statistics). */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "check.h"
#include "pool.h"

#define MB ((size_t)1 << 20)

/* ---- made-up segments: addresses from a counter, a byte budget, a record of what is held ---- */
#define MAXSEG 4096
typedef struct {
  uintptr_t next;
  size_t budget, held;
  int nalloc, nfree;
  struct { uintptr_t base; size_t size; int live; } seg[MAXSEG];
  int nseg;
} space;

static void *seg_alloc(void *ctx, size_t bytes) {
  space *s = ctx;
  if (s->held + bytes > s->budget || s->nseg == MAXSEG) return NULL;
  uintptr_t base = s->next;
  s->next += bytes + 4096 * 64;   /* a gap: blocks of two segments are never adjacent in memory */
  s->seg[s->nseg].base = base;
  s->seg[s->nseg].size = bytes;
  s->seg[s->nseg].live = 1;
  s->nseg++;
  s->held += bytes;
  s->nalloc++;
  return (void *)base;
}

static void seg_free(void *ctx, void *base, size_t bytes) {
  space *s = ctx;
  for (int i = 0; i < s->nseg; i++)
    if (s->seg[i].live && s->seg[i].base == (uintptr_t)base && s->seg[i].size == bytes) {
      s->seg[i].live = 0;
      s->held -= bytes;
      s->nfree++;
      return;
    }
  s->nfree = -1000000;   /* a segment the pool never got, or the wrong size: fails the counts */
}

static space *new_space(size_t budget) {
  space *s = calloc(1, sizeof *s);
  s->next = (uintptr_t)1 << 40;
  s->budget = budget;
  return s;
}

/* ---- live blocks as the test knows them ---- */
typedef struct { uintptr_t addr; size_t size, asked; } live_block;

static int cmp_addr(const void *a, const void *b) {
  uintptr_t x = ((const live_block *)a)->addr, y = ((const live_block *)b)->addr;
  return x < y ? -1 : x > y;
}

/* every live block inside a live segment, no two overlapping, at least as large as asked, 512-aligned
 * in size; the pool's statistics agree with the test's sums */
static int consistent(const fl_pool *p, const space *s, live_block *lv, int n) {
  qsort(lv, (size_t)n, sizeof *lv, cmp_addr);
  size_t sum = 0;
  for (int i = 0; i < n; i++) {
    if (lv[i].size < lv[i].asked || lv[i].size % 512) return 0;
    if (i > 0 && lv[i - 1].addr + lv[i - 1].size > lv[i].addr) return 0;
    int inside = 0;
    for (int k = 0; k < s->nseg && !inside; k++)
      inside = s->seg[k].live && lv[i].addr >= s->seg[k].base && lv[i].addr + lv[i].size <= s->seg[k].base + s->seg[k].size;
    if (!inside) return 0;
    sum += lv[i].size;
  }
  fl_pool_stats st;
  fl_pool_get_stats(p, &st);
  return st.allocated == sum && st.reserved == s->held && st.segments == (size_t)(s->nalloc - s->nfree);
}

static uint64_t rng_state = 88172645463325252ull;
static uint64_t rnd(void) {
  rng_state ^= rng_state << 13;
  rng_state ^= rng_state >> 7;
  rng_state ^= rng_state << 17;
  return rng_state;
}

int main(void) {
  TEST("pool: sizes round to 512 bytes; small, large and huge requests get their segment kinds") {
    space *s = new_space((size_t)1 << 40);
    fl_pool *p = fl_pool_new(seg_alloc, seg_free, s);
    size_t got;
    int fresh;
    CHECK(fl_pool_round(0) == 512 && fl_pool_round(1) == 512 && fl_pool_round(513) == 1024);
    CHECK(fl_pool_round(SIZE_MAX) == 0);
    void *a = fl_pool_alloc(p, 1000, &got, &fresh);
    CHECK(a && got == 1024 && fresh == 1 && s->seg[0].size == 2 * MB);
    void *b = fl_pool_alloc(p, 100, &got, &fresh);
    CHECK(b && got == 512 && fresh == 0);                  /* the same small segment */
    CHECK((uintptr_t)b == (uintptr_t)a + 1024);
    void *c = fl_pool_alloc(p, 3 * MB, &got, &fresh);
    CHECK(c && got == 3 * MB && fresh == 1 && s->seg[1].size == 20 * MB);
    /* above 10 MB: a segment of its own, rounded up to 2 MB; the rest (under 1 MB) stays in the block */
    void *d = fl_pool_alloc(p, 33 * MB + 5, &got, &fresh);
    CHECK(d && got == 34 * MB && fresh == 1 && s->seg[2].size == 34 * MB);
    CHECK(fl_pool_alloc(p, SIZE_MAX, &got, &fresh) == NULL);
    fl_pool_stats st;
    fl_pool_get_stats(p, &st);
    CHECK(st.reserved == 56 * MB && st.segments == 3 && st.live_blocks == 4);
    CHECK(st.allocated == 1024 + 512 + 3 * MB + 34 * MB);
    CHECK(st.requested == 1000 + 100 + 3 * MB + 33 * MB + 5);
    CHECK(st.peak_allocated == st.allocated && st.peak_reserved == st.reserved);
    fl_pool_free(p, d);
    fl_pool_get_stats(p, &st);
    CHECK(st.requested == 1000 + 100 + 3 * MB && st.live_blocks == 3 && st.peak_allocated > st.allocated);
    fl_pool_release(p);
    fl_pool_reset_peak(p);
    fl_pool_get_stats(p, &st);
    CHECK(st.peak_allocated == st.allocated && st.peak_reserved == st.reserved && st.reserved == 22 * MB);
    fl_pool_delete(p);
    CHECK(s->nfree == 3 && s->held == 0);                  /* delete returns every segment */
    free(s);
  }

  TEST("pool: best fit, split, merge with both neighbours, release of wholly free segments") {
    space *s = new_space((size_t)1 << 40);
    fl_pool *p = fl_pool_new(seg_alloc, seg_free, s);
    size_t got;
    int fresh;
    char *a = fl_pool_alloc(p, 3 * MB, &got, &fresh);
    char *b = fl_pool_alloc(p, 4 * MB, &got, &fresh);
    char *c = fl_pool_alloc(p, 3 * MB, &got, &fresh);
    CHECK(s->nalloc == 1 && b == a + 3 * MB && c == b + 4 * MB);   /* one 20 MB segment, in order */
    CHECK(fl_pool_free(p, b) == 4 * MB);
    /* free: b's 4 MB and the 10 MB tail; 2.5 MB fits both: the smaller is the best fit, and the
     * 1.5 MB left over is split off */
    char *e = fl_pool_alloc(p, 5 * MB / 2, &got, &fresh);
    CHECK(e == b && got == 5 * MB / 2 && fresh == 0);
    char *f = fl_pool_alloc(p, 3 * MB / 2, &got, &fresh);
    CHECK(f == b + 5 * MB / 2 && got == 3 * MB / 2);
    /* a rest under 1 MB stays in a large block */
    fl_pool_free(p, f);
    char *g = fl_pool_alloc(p, MB, &got, &fresh);          /* 1 MB is small: its own segment */
    CHECK(s->nalloc == 2 && got == MB);
    char *h = fl_pool_alloc(p, MB + 512, &got, &fresh);    /* large: takes f's 1.5 MB whole */
    CHECK(h == f && got == 3 * MB / 2);
    CHECK(fl_pool_free(p, h) == 3 * MB / 2);
    CHECK(fl_pool_free(p, h) == 0);                        /* a second free is refused */
    CHECK(fl_pool_free(p, a + 512) == 0);                  /* not the start of a block */
    CHECK(fl_pool_free(p, (void *)16) == 0);               /* not ours */
    CHECK(fl_pool_release(p) == 0);                        /* nothing wholly free yet */
    fl_pool_free(p, g);
    CHECK(fl_pool_release(p) == 2 * MB && s->nfree == 1);  /* the small segment */
    fl_pool_free(p, a);
    fl_pool_free(p, c);
    fl_pool_stats st;
    fl_pool_get_stats(p, &st);
    CHECK(st.free_blocks == 2 && st.allocated == 5 * MB / 2);   /* [a..e) merged, and [e+2.5MB..end) */
    fl_pool_free(p, e);                                    /* merges with both neighbours */
    fl_pool_get_stats(p, &st);
    CHECK(st.free_blocks == 1 && st.largest_free == 20 * MB && st.allocated == 0);
    CHECK(fl_pool_release(p) == 20 * MB && s->held == 0 && s->nfree == 2);
    /* the pool works on after a release (segment slots are reused) */
    CHECK(fl_pool_alloc(p, 5 * MB, &got, &fresh) != NULL && fresh == 1);
    fl_pool_delete(p);
    CHECK(s->held == 0);
    free(s);
  }

  TEST("pool: out of segments is NULL and changes nothing; after a release the request succeeds") {
    space *s = new_space(40 * MB);
    fl_pool *p = fl_pool_new(seg_alloc, seg_free, s);
    size_t got;
    int fresh;
    void *a = fl_pool_alloc(p, 18 * MB, &got, &fresh);    /* segments of their own: 18 and 20 MB */
    void *b = fl_pool_alloc(p, 20 * MB, &got, &fresh);
    CHECK(a && b && s->held == 38 * MB);
    CHECK(fl_pool_alloc(p, 3 * MB, &got, &fresh) == NULL);  /* would need a 20 MB segment: over budget */
    live_block lv[2] = {{(uintptr_t)a, 18 * MB, 18 * MB}, {(uintptr_t)b, 20 * MB, 20 * MB}};
    CHECK(consistent(p, s, lv, 2));
    fl_pool_free(p, a);
    void *c = fl_pool_alloc(p, 17 * MB, &got, &fresh);    /* fits the freed segment */
    CHECK(c == a && fresh == 0 && got == 17 * MB);
    fl_pool_free(p, c);
    fl_pool_free(p, b);
    CHECK(fl_pool_alloc(p, 30 * MB, &got, &fresh) == NULL);   /* the budget is held by free segments */
    CHECK(fl_pool_release(p) == 38 * MB);
    CHECK(fl_pool_alloc(p, 30 * MB, &got, &fresh) != NULL);
    fl_pool_delete(p);
    free(s);
  }

  TEST("pool: 40000 random allocations and frees keep blocks disjoint, inside segments, counted") {
    space *s = new_space((size_t)64 << 30);
    fl_pool *p = fl_pool_new(seg_alloc, seg_free, s);
    enum { MAXLIVE = 600 };
    live_block *lv = calloc(MAXLIVE, sizeof *lv);
    int n = 0, ok = 1;
    for (int op = 0; op < 40000 && ok; op++) {
      if (n > 0 && (n == MAXLIVE || rnd() % 100 < 48)) {
        int k = (int)(rnd() % (uint64_t)n);
        ok &= fl_pool_free(p, (void *)lv[k].addr) == lv[k].size;
        lv[k] = lv[--n];
      } else {
        uint64_t r = rnd();
        size_t want = r % 3 == 0 ? (size_t)(rnd() % 4096) + 1            /* small */
                    : r % 3 == 1 ? (size_t)(rnd() % (8 * MB)) + MB       /* mid */
                    : (size_t)(rnd() % (300 * MB)) + 10 * MB;             /* activations */
        size_t got;
        int fresh;
        void *a = fl_pool_alloc(p, want, &got, &fresh);
        ok &= a != NULL;
        if (a) lv[n++] = (live_block){(uintptr_t)a, got, want};
      }
      if (op % 997 == 0) ok &= consistent(p, s, lv, n);
      if (op % 5000 == 4999) fl_pool_release(p);
    }
    CHECK(ok);
    CHECK(consistent(p, s, lv, n));
    while (n > 0) { fl_pool_free(p, (void *)lv[n - 1].addr); n--; }
    fl_pool_stats st;
    fl_pool_get_stats(p, &st);
    CHECK(st.allocated == 0);
    CHECK(st.free_blocks == st.segments);                  /* everything merged back, one block each */
    fl_pool_release(p);
    CHECK(s->held == 0 && s->nalloc == s->nfree);
    fl_pool_delete(p);
    free(lv);
    free(s);
  }

  TEST("pool: thousands of blocks in use, every other one freed, then the rest in another order") {
    space *s = new_space((size_t)1 << 40);
    fl_pool *p = fl_pool_new(seg_alloc, seg_free, s);
    enum { N = 5000 };
    void **a = calloc(N, sizeof *a);
    size_t got;
    int fresh, ok = 1;
    for (int i = 0; i < N; i++) ok &= (a[i] = fl_pool_alloc(p, 512 + (size_t)(i % 7) * 1536, &got, &fresh)) != NULL;
    CHECK(ok);
    /* frees with no allocation between them: free fragments pile up to N/2 */
    for (int i = 0; i < N; i += 2) ok &= fl_pool_free(p, a[i]) > 0;
    fl_pool_stats st;
    fl_pool_get_stats(p, &st);
    CHECK(ok && st.free_blocks >= N / 2 - st.segments);   /* a freed block next to a segment's free tail merges */
    /* the blocks still in use are all found (the hash table's deletions kept its probe runs) */
    for (int i = N - 1; i > 0; i -= 2) ok &= fl_pool_free(p, a[i]) > 0;
    CHECK(ok);
    fl_pool_get_stats(p, &st);
    CHECK(st.allocated == 0 && st.free_blocks == st.segments);
    CHECK(fl_pool_release(p) == st.reserved && s->held == 0);
    fl_pool_delete(p);
    free(a);
    free(s);
  }

  /* The use it is for: the same sizes every training step. Forward keeps activations that shrink in
   * size and grow in number through the stages (ResNet50's at batch 128 are 25-400 MB); backward
   * frees each after a gradient of its size (and a temporary) has been made. From the second step
   * on, everything must come from the segments already held, and they may exceed the peak in use
   * by little (an exact-size cache needs one block per distinct size in flight). */
  TEST("pool: repeated training steps reuse their segments; reserved stays near the peak in use") {
    space *s = new_space((size_t)1 << 40);
    fl_pool *p = fl_pool_new(seg_alloc, seg_free, s);
    size_t sizes[64];
    int nl = 0;
    for (int stage = 0; stage < 4; stage++)
      for (int l = 0; l < 12; l++) sizes[nl++] = (size_t)(400 >> stage) * MB / (1 + (size_t)(l % 3)) + (size_t)l * 4096;
    void *act[64];
    size_t got, peak_alloc = 0, after_first = 0;
    int fresh, fresh_later = 0;
    for (int step = 0; step < 4; step++) {
      for (int l = 0; l < nl; l++) act[l] = fl_pool_alloc(p, sizes[l], &got, &fresh), fresh_later += step > 0 && fresh;
      void *g = NULL;
      for (int l = nl - 1; l >= 0; l--) {
        void *gx = fl_pool_alloc(p, sizes[l], &got, &fresh);
        void *tmp = fl_pool_alloc(p, sizes[l] / 4, &got, &fresh);
        fresh_later += step > 0 && fresh;
        fl_pool_stats st;
        fl_pool_get_stats(p, &st);
        if (st.allocated > peak_alloc) peak_alloc = st.allocated;
        fl_pool_free(p, tmp);
        if (g) fl_pool_free(p, g);
        fl_pool_free(p, act[l]);
        g = gx;
      }
      fl_pool_free(p, g);
      if (step == 0) after_first = s->held;
    }
    CHECK(fresh_later == 0);
    CHECK(s->held == after_first);
    CHECK(s->held <= peak_alloc + peak_alloc / 4);
    printf("# training pattern: peak in use %.0f MB, reserved %.0f MB (%.2fx), %d segments\n",
           (double)peak_alloc / MB, (double)s->held / MB, (double)s->held / (double)peak_alloc, s->nalloc);
    fl_pool_delete(p);
    free(s);
  }
  return check_exit();
}
