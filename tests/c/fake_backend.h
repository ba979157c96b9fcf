/* A second backend for tests on machines without a GPU: "fake". Its memory is mmap'ed pages kept
 * PROT_NONE except while one of its own functions runs, so host code that reads or writes a fake
 * tensor's elements directly crashes, as it would on a CUDA device pointer. Its kernels are the CPU
 * backend's, run with the pages opened. Allocations fail on request (fake_fail_mode), with a message
 * of the kind the CUDA allocator records, so the front's handling of backend messages is tested.
 * Single-threaded tests only (the block list is not locked). */
#ifndef FLOWER_TEST_FAKE_BACKEND_H
#define FLOWER_TEST_FAKE_BACKEND_H

#include <sys/mman.h>
#include <unistd.h>

#include "backend.h"

#define FAKE_MAXBLOCKS 4096
static struct { void *p; size_t len; } fake_blocks[FAKE_MAXBLOCKS];
static int fake_nblocks;
/* 0: allocations above fake_limit fail with an out-of-memory message (like CUDA's);
 * 1: they fail silently (the front must word the message); 2: every allocation fails with a
 * message that is not out-of-memory ("device does not exist") */
static int fake_fail_mode;
static size_t fake_limit = (size_t)1 << 30;

static void fake_protect(int prot) {
  for (int i = 0; i < fake_nblocks; i++) mprotect(fake_blocks[i].p, fake_blocks[i].len, prot);
}

static void *fake_alloc(int device, size_t nbytes) {
  if (fake_fail_mode == 2) {
    fl_fail("fake: device %d does not exist", device);
    return NULL;
  }
  if (nbytes > fake_limit || fake_nblocks == FAKE_MAXBLOCKS) {
    if (fake_fail_mode == 0)
      fl_fail_oom("fake: out of memory on fake:%d: asked for %zu bytes, %zu free", device, nbytes, fake_limit);
    return NULL;
  }
  size_t pg = (size_t)sysconf(_SC_PAGESIZE), len = (nbytes + pg - 1) / pg * pg;
  void *p = mmap(NULL, len, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (p == MAP_FAILED) return NULL;
  fake_blocks[fake_nblocks].p = p;
  fake_blocks[fake_nblocks].len = len;
  fake_nblocks++;
  return p;
}

static void fake_free(int device, void *p) {
  (void)device;
  for (int i = 0; i < fake_nblocks; i++)
    if (fake_blocks[i].p == p) {
      munmap(p, fake_blocks[i].len);
      fake_blocks[i] = fake_blocks[--fake_nblocks];
      return;
    }
}

/* each kernel: open every block, run the CPU's, close again */
#define FAKE_RUN(call)                                    \
  do {                                                    \
    fake_protect(PROT_READ | PROT_WRITE);                 \
    int rc_ = (call);                                     \
    fake_protect(PROT_NONE);                              \
    return rc_;                                           \
  } while (0)

static int fake_copy(fl_tensor *d, const fl_tensor *s) { FAKE_RUN(fl_cpu_backend.copy(d, s)); }
static int fake_fill(fl_tensor *t, double v) { FAKE_RUN(fl_cpu_backend.fill(t, v)); }
static int fake_binary(fl_binop op, fl_tensor *o, const fl_tensor *a, const fl_tensor *b) {
  FAKE_RUN(fl_cpu_backend.binary(op, o, a, b));
}
static int fake_unary(fl_unop op, fl_tensor *o, const fl_tensor *a, double p0, double p1) {
  FAKE_RUN(fl_cpu_backend.unary(op, o, a, p0, p1));
}
static int fake_reduce(fl_redop op, fl_tensor *o, const fl_tensor *a, int dim, int corr) {
  FAKE_RUN(fl_cpu_backend.reduce(op, o, a, dim, corr));
}
static int fake_where(fl_tensor *o, const fl_tensor *m, const fl_tensor *a, const fl_tensor *b) {
  FAKE_RUN(fl_cpu_backend.where(o, m, a, b));
}
static int fake_matmul(fl_tensor *o, const fl_tensor *a, const fl_tensor *b, double alpha, double beta) {
  FAKE_RUN(fl_cpu_backend.matmul(o, a, b, alpha, beta));
}
static int fake_softmax(fl_tensor *o, const fl_tensor *a, int dim, int lg) { FAKE_RUN(fl_cpu_backend.softmax(o, a, dim, lg)); }
static int fake_rng(fl_tensor *o, fl_rngkind k, uint64_t seed, uint64_t off, double p0, double p1) {
  FAKE_RUN(fl_cpu_backend.rng(o, k, seed, off, p0, p1));
}

static const fl_backend fake_backend = {
  .name = "fake", .alloc = fake_alloc, .free = fake_free, .copy = fake_copy, .fill = fake_fill,
  .binary = fake_binary, .unary = fake_unary, .reduce = fake_reduce, .where = fake_where,
  .matmul = fake_matmul, .softmax = fake_softmax, .rng = fake_rng, .nn = NULL,
};

#endif
