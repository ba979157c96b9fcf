/* Random fills: the CPU backend's Philox4x32-10 streams (core/rng.h, core/cpu/random.c), one thread
 * per element running the same fl_philox_at. Uniform and integer draws are bit-identical to the CPU;
 * normal draws use the device's double-precision log/cos/sqrt (within 1 ulp of glibc's), so a
 * float64 normal value may differ from the CPU's in its last bit and a float32 one almost never.
 * bfloat16: element i is the float32 stream's element i (same counters, the 24-bit uniform) rounded
 * to bfloat16, as on the CPU. */
#include "cuda_internal.h"

/* The arithmetic is spelled with __dadd_rn/__dmul_rn: nvcc would otherwise fuse a*b + c into one FMA,
 * whose single rounding differs from the CPU's two. */
template <class T> __global__ void rng_kernel(T *o, int64_t n, int kind, uint64_t seed, uint64_t offset, double p0,
                                              double p1, uint64_t range) {
  typedef cu_acc_t<T> R;   /* the dtype whose stream is drawn: float for bfloat16 */
  int64_t step = (int64_t)gridDim.x * blockDim.x;
  for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += step) {
    uint32_t r[4];
    fl_philox_at(seed, offset, (uint64_t)i, r);
    if (kind == FL_RNG_INT) {
      o[i] = cu_store<T>((R)(int64_t)((uint64_t)(int64_t)p0 + ((((uint64_t)r[1] << 32) | r[0]) % range)));
      continue;
    }
    double v;
    if (kind == FL_RNG_NORMAL) {
      double u1 = __dadd_rn((double)((((uint64_t)r[1] << 32) | r[0]) >> 11) * 0x1p-53, 0x1p-54);
      double u2 = (double)((((uint64_t)r[3] << 32) | r[2]) >> 11) * 0x1p-53;
      double z = __dmul_rn(sqrt(__dmul_rn(-2.0, log(u1))), cos(__dmul_rn(6.283185307179586, u2)));
      v = __dadd_rn(p0, __dmul_rn(p1, z));
    } else if (sizeof(R) == 4 && std::is_floating_point<R>::value) {
      v = __dadd_rn(p0, __dmul_rn(p1 - p0, (double)(r[0] >> 8) * 0x1p-24));
    } else {
      v = __dadd_rn(p0, __dmul_rn(p1 - p0, (double)((((uint64_t)r[1] << 32) | r[0]) >> 11) * 0x1p-53));
    }
    o[i] = cu_store<T>(cu_from_double<R>(v));
  }
}

int cu_backend_rng(fl_tensor *out, fl_rngkind kind, uint64_t seed, uint64_t offset, double p0, double p1) {
  const char *op = "cuda random";
  if (!fl_tensor_is_contiguous(out)) return fl_fail("%s: random fill needs a contiguous tensor", op);
  uint64_t range = 1;
  if (kind == FL_RNG_INT) {
    if (!(p1 > p0)) return fl_fail("random: empty integer range [%.17g, %.17g)", p0, p1);
    range = (uint64_t)((int64_t)p1 - (int64_t)p0);
  }
  int64_t n = fl_tensor_numel(out);
  if (n == 0) return 0;
  cu_dev *d;
  if (cu_enter(op, out->storage->device, &d)) return -1;
  return cu_visit(out->dtype, [&](auto tag) {
    typedef typename decltype(tag)::type T;
    rng_kernel<T><<<cu_grid(d, n, CU_THREADS), CU_THREADS, 0, d->stream>>>((T *)cu_ptr(out), n, (int)kind, seed,
                                                                           offset, p0, p1, range);
    return cu_launched(op);
  });
}
