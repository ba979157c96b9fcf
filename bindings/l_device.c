/* Devices from Lua, over the backend registry (core/backend.h); no backend is named here.
 *
 *   t:to(device)        t on "cpu", "<backend>" (device 0) or "<backend>:<n>"; t itself when it is there
 *   t:cpu()             t:to('cpu')
 *   flower.backends()   {{name = 'cpu', devices = 1}, {name = 'cuda', devices = 0, reason = '...'}, ...}
 *
 * scripts/flower/device.lua builds the Lua side (parsing 'auto', moving models) on these. */
#include "lflower.h"
#include "backend.h"

int fl_lua_push_copy_to(lua_State *L, const fl_tensor *src, const fl_backend *be, int device, const char *fname) {
  fl_tensor *t = fl_lua_newtensor(L);
  if (fl_tensor_init(t, be, device, src->dtype, src->ndim, src->shape)) {
    if (!fl_last_failure_was_oom()) return luaL_error(L, "%s: %s", fname, fl_errmsg());
    lua_gc(L, LUA_GCCOLLECT);
    if (fl_tensor_init(t, be, device, src->dtype, src->ndim, src->shape))
      return luaL_error(L, "%s: %s", fname, fl_errmsg());
  }
  /* the device side's backend runs a cross-backend copy (backend.h) */
  const fl_backend *runner = be != &fl_cpu_backend ? be : src->storage->backend;
  if (runner->copy(t, src)) return luaL_error(L, "%s: %s", fname, fl_errmsg());
  return 1;
}

/* t on (be, device), or t itself (at the top of the stack) when it is there already */
static int push_on(lua_State *L, const fl_backend *be, int device, const char *fname) {
  fl_tensor *t = fl_lua_checktensor(L, 1);
  if (t->storage->backend == be && t->storage->device == device) {
    lua_settop(L, 1);
    return 1;
  }
  return fl_lua_push_copy_to(L, t, be, device, fname);
}

static int t_to(lua_State *L) {
  fl_lua_checktensor(L, 1);
  const char *spec = luaL_checkstring(L, 2);
  const fl_backend *be;
  int device;
  if (fl_device_parse("to", spec, &be, &device)) return fl_lua_error(L);
  return push_on(L, be, device, "to");
}

static int t_cpu(lua_State *L) { return push_on(L, &fl_cpu_backend, 0, "cpu"); }

static int l_backends(lua_State *L) {
  int n = fl_backend_count();
  lua_createtable(L, n, 0);
  for (int i = 0; i < n; i++) {
    const fl_backend *be = fl_backend_at(i);
    int devices = fl_backend_devices(be);
    lua_createtable(L, 0, 3);
    lua_pushstring(L, be->name);
    lua_setfield(L, -2, "name");
    lua_pushinteger(L, devices);
    lua_setfield(L, -2, "devices");
    if (devices == 0 && be->unavailable_reason) {
      lua_pushstring(L, be->unavailable_reason());
      lua_setfield(L, -2, "reason");
    }
    lua_rawseti(L, -2, i + 1);
  }
  return 1;
}

static const luaL_Reg tensor_methods[] = {{"to", t_to}, {"cpu", t_cpu}, {NULL, NULL}};

void fl_lua_open_device(lua_State *L) {
  /* methods go into the tensor metatable (fl_lua_open_tensor has run before us, l_core.c) */
  if (luaL_getmetatable(L, FL_TENSOR_MT) == LUA_TTABLE) luaL_setfuncs(L, tensor_methods, 0);
  lua_pop(L, 1);
  lua_pushcfunction(L, l_backends);
  lua_setfield(L, -2, "backends");
}
