/* The Lua tensor API with a device tensor, on machines without a GPU: a fake second backend
 * (fake_backend.h: memory that is unreadable outside its own kernels) stands in for CUDA. Checks that
 * every binding that hands elements to Lua reads a host copy (a direct read would crash this test),
 * that writes go through the backend, that mixing devices is an error naming both, and that the
 * allocator's own message reaches Lua. */
#include <lauxlib.h>
#include <lualib.h>
#include <string.h>

#include "check.h"
#include "fake_backend.h"
#include "lflower.h"
#include "nn.h"
#include "ops.h"

int luaopen_flower_core(lua_State *L);

/* fake(t [, device = 1]) -> a copy of t on the fake backend */
static int l_fake(lua_State *L) {
  fl_tensor *t = fl_lua_checktensor(L, 1);
  int dev = (int)luaL_optinteger(L, 2, 1);
  fl_tensor *f = fl_lua_newtensor(L);
  if (fl_tensor_init(f, &fake_backend, dev, t->dtype, t->ndim, t->shape)) return fl_lua_error(L);
  if (fl_copy_into(f, t)) return fl_lua_error(L);
  return 1;
}

/* need_host(t): what a binding that needs host memory does */
static int l_need_host(lua_State *L) {
  fl_lua_checkhost(L, fl_lua_checktensor(L, 1), "need_host");
  lua_pushboolean(L, 1);
  return 1;
}

static int l_fake_limit(lua_State *L) {
  fake_limit = (size_t)luaL_checkinteger(L, 1);
  return 0;
}

static const char *prelude =
  "function raises(f, want)\n"
  "  local ok, msg = pcall(f)\n"
  "  if ok then error('expected an error containing: ' .. want, 2) end\n"
  "  if not tostring(msg):find(want, 1, true) then\n"
  "    error('expected an error containing: ' .. want .. '\\n  got: ' .. tostring(msg), 2)\n"
  "  end\n"
  "end\n"
  "function same(a, b)\n"
  "  if type(a) ~= 'table' then return a == b end\n"
  "  if #a ~= #b then return false end\n"
  "  for i = 1, #a do if not same(a[i], b[i]) then return false end end\n"
  "  return true\n"
  "end\n"
  "x = flower.tensor({{1.5, 2, -3}, {4, 5, 6.25}})\n"
  "f = fake(x)\n";

/* runs `code` (a chunk that errors on failure); prints the error */
static int run(lua_State *L, const char *code) {
  for (const char *p = code; *p;) {
    const char *nl = strchr(p, '\n');
    int len = nl ? (int)(nl - p) : (int)strlen(p);
    printf("# %.*s\n", len, p);
    p += len + (nl != NULL);
  }
  fflush(stdout);   /* a direct read of fake memory crashes: the log then shows which chunk did it */
  if (luaL_dostring(L, code) == LUA_OK) return 1;
  printf("# error: %s\n", lua_tostring(L, -1));
  lua_pop(L, 1);
  return 0;
}

int main(void) {
  lua_State *L = luaL_newstate();
  luaL_openlibs(L);
  luaL_requiref(L, "flower.core", luaopen_flower_core, 0);
  lua_setglobal(L, "flower");
  lua_register(L, "fake", l_fake);
  lua_register(L, "need_host", l_need_host);
  lua_register(L, "fake_limit", l_fake_limit);
  if (!run(L, prelude)) return 1;

  TEST("a backend that leaves an nn kernel out: the op fails naming it instead of calling NULL") {
    static const struct fl_nn_ops no_kernels;   /* every slot NULL */
    static fl_backend partial;
    partial = fake_backend;
    partial.name = "partial";
    partial.nn = &no_kernels;
    int64_t shape[1] = {4};
    fl_tensor a = {0}, b = {0}, y = {0};
    CHECK(fl_tensor_init(&a, &partial, 1, FL_F32, 1, shape) == 0);
    CHECK(fl_tensor_init(&b, &partial, 1, FL_F32, 1, shape) == 0);
    CHECK(fl_add_act(&y, &a, &b, 1.0, 1) == -1);
    CHECK(strstr(fl_errmsg(), "add_act: not supported by backend 'partial'") != NULL);
    double ss = 0;
    CHECK(fl_sumsq(&a, &ss) == -1);
    CHECK(strstr(fl_errmsg(), "not supported by backend 'partial'") != NULL);
    CHECK(fl_axpby(&a, 1.0, &b, 0.0) == -1);
    CHECK(strstr(fl_errmsg(), "not supported by backend 'partial'") != NULL);
    fl_tensor_free(&a);
    fl_tensor_free(&b);
  }

  TEST("a fake tensor is a device tensor") {
    CHECK(run(L, "assert(f:device() == 'fake')"));
    CHECK(run(L, "assert(same(f:size(), {2, 3}) and f:dtype() == 'float32' and f:numel() == 6)"));
  }

  TEST("reads hand Lua a host copy: item, t[i], totable, tostring, equal, tostring_raw") {
    CHECK(run(L, "assert(f:sum():item() == 15.75)"));
    CHECK(run(L, "assert(f[2][3] == 6.25 and f[1][-1] == -3 and f[{2, 1}] == 4)"));
    CHECK(run(L, "assert(same(f:totable(), {{1.5, 2, -3}, {4, 5, 6.25}}))"));
    CHECK(run(L, "assert(same(f:t():totable(), {{1.5, 4}, {2, 5}, {-3, 6.25}}))"));
    CHECK(run(L, "assert(same(fake(flower.tensor({7, 8}, 'int64')):totable(), {7, 8}))"));
    CHECK(run(L, "assert(fake(flower.tensor(2.5)):totable() == 2.5)"));
    CHECK(run(L, "local s = tostring(f)\n"
                 "assert(s:find(' 1.5000  2.0000 -3.0000', 1, true), s)\n"
                 "assert(s:find('[torch.FloatTensor of size 2x3, device fake:1]', 1, true), s)"));
    CHECK(run(L, "assert(tostring(x):find('device cpu]', 1, true))"));
    CHECK(run(L, "assert(f:equal(fake(x)) and not f:equal(fake(x + 1)))"));
    CHECK(run(L, "assert(f:tostring_raw() == x:tostring_raw())"));
    CHECK(run(L, "assert(f:t():tostring_raw() == x:t():contiguous():tostring_raw())"));
    CHECK(run(L, "local big = fake(flower.arange(2000))\n"
                 "assert(tostring(big):find('1999', 1, true))"));
  }

  TEST("writes go through the backend: t[i] = v, slices, fill (int64 exact), copy") {
    CHECK(run(L, "local g = fake(x)\n"
                 "g[1] = 0; g[{2, {2, 3}}] = 9; g[{2, 1}] = flower.tensor(-1)\n"
                 "assert(same(g:totable(), {{0, 0, 0}, {-1, 9, 9}}))"));
    CHECK(run(L, "local g = fake(flower.zeros(2, 'int64'))\n"
                 "g:fill(2^60 + 1)\n"
                 "g:fill(1152921504606846977)\n"
                 "local v = g:totable()\n"
                 "assert(same(v, {1152921504606846977, 1152921504606846977}) and math.type(v[1]) == 'integer')"));
    CHECK(run(L, "local g = fake(flower.zeros(2, 3))\n"
                 "g:copy(x)\n"                       /* host -> device, explicit */
                 "local h = flower.zeros(2, 3):copy(g)\n"
                 "assert(h:equal(x))"));
    CHECK(run(L, "local g = f:cpu()\n"
                 "assert(g:device() == 'cpu' and g:equal(x))"));
    CHECK(run(L, "assert(f:exp():log():sub(f):abs():max():item() < 1e-6)"));
  }

  TEST("mixed devices are errors naming both") {
    CHECK(run(L, "raises(function() return x + f end, 'add: tensors are on different devices (cpu and fake:1)')"));
    CHECK(run(L, "raises(function() return f * x end, 'mul: tensors are on different devices (fake:1 and cpu)')"));
    CHECK(run(L, "raises(function() return f + fake(x, 2) end, '(fake:1 and fake:2)')"));
    CHECK(run(L, "raises(function() return x:add_(f) end, 'add: tensors are on different devices (cpu and fake:1)')"));
    CHECK(run(L, "raises(function() return flower.matmul(x:t(), f) end, 'matmul: tensors are on different devices (cpu and fake:1)')"));
    CHECK(run(L, "raises(function() return flower.where(x:gt(2), x, f) end, 'where: tensors are on different devices')"));
    CHECK(run(L, "raises(function() return flower.cat({x, f}) end, 'cat: element 2 is on fake:1, element 1 on cpu')"));
    CHECK(run(L, "raises(function() return flower.stack({f, fake(x, 2)}) end, 'stack: element 2 is on fake:2, element 1 on fake:1')"));
    CHECK(run(L, "raises(function() return x:equal(f) end, 'equal: tensors are on different devices (cpu and fake:1)')"));
  }

  TEST("bindings that need host memory refuse device tensors") {
    CHECK(run(L, "assert(need_host(x))"));
    CHECK(run(L, "raises(function() need_host(f) end, 'need_host: the tensor is on fake:1; call t:cpu() first')"));
  }

  TEST("the backend allocator's message reaches Lua") {
    CHECK(run(L, "fake_limit(100)\n"
                 "local ok, msg = pcall(fake, flower.zeros(1000))\n"
                 "fake_limit(1 << 30)\n"
                 "assert(not ok and msg:find('fake: out of memory on fake:1: asked for 4000 bytes, 100 free "
                 "(a float32 tensor of size [1000])', 1, true), msg)"));
    CHECK(run(L, "fake_limit(10)\n"
                 "local ok, msg = pcall(function() return f + 1 end)\n"
                 "fake_limit(1 << 30)\n"
                 "assert(not ok and msg:find('add: fake: out of memory on fake:1: asked for 24 bytes, 10 free "
                 "(a float32 tensor of size [2,3])', 1, true), msg)"));
  }

  lua_close(L);
  TEST("every fake block was freed") { CHECK(fake_nblocks == 0); }
  return check_exit();
}
