/* libFuzzer: the Kaggle JSON path as a user reaches it: data.kaggle(root) and
 * data.kaggle_test(root) on root/train.json and root/test.json (lua-cjson's decoder, then our
 * checks of every record), and flower.files' own JSON decoder (files.json_decode, used for
 * results and configs). */
#include <sys/stat.h>
#include "lua_harness.h"

static const char *setup =
  "local data = require 'flower.data'\n"
  "local files = require 'flower.files'\n"
  "function fuzz_one(path, text)\n"
  "  local root = path:match('^(.*)/')\n"
  "  local f = io.open(root .. '/test.json', 'wb'); f:write(text); f:close()\n"
  "  pcall(data.kaggle, root)\n"
  "  pcall(data.kaggle_test, root)\n"
  "  pcall(files.json_decode, text, 'fuzz')\n"
  "end\n";

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  static char dir[64], file[96];
  if (size > (1 << 20)) return 0;
  if (!dir[0]) {
    snprintf(dir, sizeof dir, "/tmp/fuzz_json_%d", (int)getpid());
    mkdir(dir, 0700);
    snprintf(file, sizeof file, "%s/train.json", dir);
  }
  fuzz_lua_run(setup, file, data, size);
  return 0;
}
