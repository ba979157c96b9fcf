/* libFuzzer: the weight loaders on a downloaded file: keras.load_weights (by order and by name,
 * into a small model), keras.load_model, keras.inspect and flower.h5.open_untrusted + list, all
 * through the untrusted reader. Errors are answers; crashes and hangs must not reach here. */
#include "lua_harness.h"

static const char *setup =
  "local flower = require 'flower'\n"
  "local nn, keras, h5 = flower.nn, require 'flower.keras', require 'flower.h5'\n"
  "local x = nn.Input{4}\n"
  "local model = nn.Model(x, nn.Dense{units = 3, name = 'dense'}(nn.Dense{units = 4, name = 'hidden'}(x)))\n"
  "function fuzz_one(path)\n"
  "  pcall(keras.load_weights, model, path)\n"
  "  pcall(keras.load_weights, model, path, {by_name = true, skip_mismatch = true, quiet = true})\n"
  "  pcall(keras.load_model, path)\n"
  "  pcall(keras.inspect, path)\n"
  "  pcall(function() local f <close> = h5.open_untrusted(path, {timeout = 2}); f:list('/') end)\n"
  "end\n";

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  static char file[64];
  if (!file[0]) snprintf(file, sizeof file, "/tmp/fuzz_keras_%d.h5", (int)getpid());
  fuzz_lua_run(setup, file, data, size);
  return 0;
}
