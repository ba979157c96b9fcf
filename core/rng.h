/* Random numbers: Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3",
 * SC'11), a counter-based generator. Element i of a tensor filled from the generator state
 * (seed, offset) takes the 128-bit counter (offset + i) -- low 64 bits, high 64 bits zero -- and
 * the 64-bit key `seed` (key[0] = low 32 bits, key[1] = high 32 bits), runs 10 Philox rounds, and
 * gets 4 words r0..r3 from which it makes its one value:
 *   uniform float32 in [a,b): a + (b-a) * ((r0 >> 8) * 2^-24)
 *   uniform float64 in [a,b): a + (b-a) * ((((r1 << 32) | r0) >> 11) * 2^-53)
 *   normal (any float dtype): Box-Muller in double precision,
 *       u1 = (((r1 << 32) | r0) >> 11) * 2^-53 + 2^-54  (in (0,1)),
 *       u2 = (((r3 << 32) | r2) >> 11) * 2^-53,
 *       mean + std * sqrt(-2 ln u1) * cos(2 pi u2), then rounded to the dtype
 *   integer in [lo, hi) (hi - lo = range < 2^63): lo + (((r1 << 32) | r0) mod range)
 *       (the modulo bias is below range / 2^64: negligible)
 * After filling n elements the global generator's offset advances by n, so a stream depends
 * only on the seed and on how many values were drawn before: any backend (a GPU kernel runs the
 * same function per element) reproduces it exactly; tests/reference/gen_numpy.py holds an
 * independent Python implementation checked against the published known-answer vectors. */
#ifndef FLOWER_RNG_H
#define FLOWER_RNG_H

#include <stdint.h>

#ifdef __CUDACC__
#define FL_HOSTDEV __host__ __device__ __forceinline__
#else
#define FL_HOSTDEV static inline
#endif

/* One Philox4x32-10 block: ctr (4 words, little end first) and key (2 words) -> out (4 words). */
FL_HOSTDEV void fl_philox4x32_10(const uint32_t ctr[4], const uint32_t key[2], uint32_t out[4]) {
  uint32_t c0 = ctr[0], c1 = ctr[1], c2 = ctr[2], c3 = ctr[3];
  uint32_t k0 = key[0], k1 = key[1];
  for (int r = 0; r < 10; r++) {
    uint64_t p0 = (uint64_t)0xD2511F53u * c0;
    uint64_t p1 = (uint64_t)0xCD9E8D57u * c2;
    uint32_t hi0 = (uint32_t)(p0 >> 32), lo0 = (uint32_t)p0;
    uint32_t hi1 = (uint32_t)(p1 >> 32), lo1 = (uint32_t)p1;
    c0 = hi1 ^ c1 ^ k0;
    c1 = lo1;
    c2 = hi0 ^ c3 ^ k1;
    c3 = lo0;
    k0 += 0x9E3779B9u;   /* golden ratio */
    k1 += 0xBB67AE85u;   /* sqrt(3) - 1 */
  }
  out[0] = c0; out[1] = c1; out[2] = c2; out[3] = c3;
}

/* The 4 words for element `i` of a draw at generator state (seed, offset). */
FL_HOSTDEV void fl_philox_at(uint64_t seed, uint64_t offset, uint64_t i, uint32_t out[4]) {
  uint64_t c = offset + i;
  uint32_t ctr[4] = {(uint32_t)c, (uint32_t)(c >> 32), 0, 0};
  uint32_t key[2] = {(uint32_t)seed, (uint32_t)(seed >> 32)};
  fl_philox4x32_10(ctr, key, out);
}

#ifndef __CUDACC__
/* The global generator (one per process, shared by all threads; offsets are taken atomically). */
void fl_rng_manual_seed(uint64_t seed);                 /* seed, offset 0 */
void fl_rng_get_state(uint64_t *seed, uint64_t *offset);
void fl_rng_set_state(uint64_t seed, uint64_t offset);
/* Takes n values: returns the (seed, offset) to draw them with and advances the offset by n. */
void fl_rng_reserve(uint64_t n, uint64_t *seed, uint64_t *offset);
#endif

#endif
