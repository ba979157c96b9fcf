/* libFuzzer: JPEG decode + every geometry transform and filter of the core image API (what the
 * data loader runs on each file). Images declaring more than 4 megapixels are only probed
 * (fl_decoder_info): decoding them is correct but slow, and the fuzzer would spend its time there. */
#include <stdint.h>
#include <stddef.h>
#include "data/image.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  static fl_decoder *d;
  if (!d && !(d = fl_decoder_new())) return 0;
  fl_jpeg_info info;
  if (fl_decoder_info(d, data, size, &info) != FL_IMG_OK) return 0;
  if ((int64_t)info.width * info.height > ((int64_t)1 << 22)) return 0;
  static const int modes[] = {FL_TF_CENTER, FL_TF_RANDOM_RESIZED, FL_TF_RESIZE, FL_TF_NONE};
  fl_transform t;
  fl_transform_defaults(&t);
  unsigned k = size > 0 ? data[size - 1] : 0;        /* the last byte picks the transform */
  t.mode = modes[k % 4];
  t.filter = (int)((k / 4) % FL_NFILTERS);
  t.out_w = 24 + (int)(k % 7) * 8;
  t.out_h = 32;
  t.hflip = 1;
  t.brightness = t.contrast = t.saturation = (k & 16) ? 0.3 : 0;
  t.dct_scaling = !(k & 32);
  t.fast = (k & 64) != 0;
  t.none_scale = (k & 128) ? 2 : 0;
  uint64_t rng = size;
  fl_image im = {0};
  fl_decoder_transform(d, data, size, &t, &rng, &im);
  fl_image_free(&im);
  return 0;
}
