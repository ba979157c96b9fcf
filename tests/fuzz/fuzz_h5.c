/* libFuzzer: every flower.h5 read entry point on a file flowerlua did not write, through the
 * untrusted reader (fl_h5_open_untrusted): open, list, kind, attribute names and values, dataset
 * shapes, reads and row slices (h5_walk.h). libhdf5 may crash or hang in the reader process;
 * nothing may reach this one. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>
#include "h5_walk.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  static char path[64];
  if (!path[0]) snprintf(path, sizeof path, "/tmp/fuzz_h5_%d.h5", (int)getpid());
  FILE *fp = fopen(path, "wb");
  if (!fp) return 0;
  fwrite(data, 1, size, fp);
  fclose(fp);
  fl_h5_limits lim = {.timeout_s = 2, .memory = (int64_t)1 << 30, .cpu_s = 10};
  fl_h5 *f;
  if (fl_h5_open_untrusted(&f, path, &lim) == 0) {
    h5_walk(f);
    fl_h5_close(f);
  }
  return 0;
}
