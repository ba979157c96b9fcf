/* The global Philox generator state: (seed, offset). See rng.h for how values are made. */
#include "rng.h"

#include <pthread.h>

/* Until manual_seed is called the generator runs from seed 0: runs are reproducible by default. */
static uint64_t rng_seed_v = 0, rng_offset_v = 0;
static pthread_mutex_t rng_lock = PTHREAD_MUTEX_INITIALIZER;

void fl_rng_manual_seed(uint64_t seed) { fl_rng_set_state(seed, 0); }

void fl_rng_set_state(uint64_t seed, uint64_t offset) {
  pthread_mutex_lock(&rng_lock);
  rng_seed_v = seed;
  rng_offset_v = offset;
  pthread_mutex_unlock(&rng_lock);
}

void fl_rng_get_state(uint64_t *seed, uint64_t *offset) {
  pthread_mutex_lock(&rng_lock);
  *seed = rng_seed_v;
  *offset = rng_offset_v;
  pthread_mutex_unlock(&rng_lock);
}

void fl_rng_reserve(uint64_t n, uint64_t *seed, uint64_t *offset) {
  pthread_mutex_lock(&rng_lock);
  *seed = rng_seed_v;
  *offset = rng_offset_v;
  rng_offset_v += n;
  pthread_mutex_unlock(&rng_lock);
}
