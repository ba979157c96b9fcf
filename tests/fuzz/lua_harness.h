/* One flowerlua state per fuzzer process, a Lua function `fuzz_one(path, bytes)` defined by the
 * harness's `setup` code, and the input written to a file first (the entry points read files).
 * A Lua error is a fine answer to a bad file; a crash, a sanitizer report or a hang is not. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>
#include <lua.h>
#include <lauxlib.h>
#include "flowerlua.h"

static lua_State *fuzz_L;

static void fuzz_lua_run(const char *setup, const char *file, const uint8_t *data, size_t size) {
  if (!fuzz_L) {
    setenv("FLOWER_H5_UNTRUSTED_TIMEOUT", "2", 0);     /* a hang costs 2 s, not the default 60 */
    setenv("FLOWERLUA_PATH", "scripts", 0);            /* run from the repository root */
    fuzz_L = flowerlua_open();
    if (!fuzz_L || flowerlua_dostring(fuzz_L, setup, "=fuzz_setup") != 0) {
      fprintf(stderr, "fuzz setup failed: %s\n", fuzz_L ? flowerlua_error(fuzz_L) : "no state");
      abort();
    }
  }
  FILE *fp = fopen(file, "wb");
  if (!fp) return;
  fwrite(data, 1, size, fp);
  fclose(fp);
  lua_getglobal(fuzz_L, "fuzz_one");
  lua_pushstring(fuzz_L, file);
  lua_pushlstring(fuzz_L, (const char *)data, size);
  if (lua_pcall(fuzz_L, 2, 0, 0) != LUA_OK) {          /* fuzz_one catches the entry points' errors */
    fprintf(stderr, "fuzz_one raised: %s\n", lua_tostring(fuzz_L, -1));
    abort();
  }
  lua_gc(fuzz_L, LUA_GCCOLLECT);
}
