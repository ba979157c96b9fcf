/* The C module `flower.core`: every C-side function of flowerlua, registered by area. */
#include "lflower.h"

int luaopen_flower_core(lua_State *L);

int luaopen_flower_core(lua_State *L) {
  lua_newtable(L);
  fl_lua_open_tensor(L);
  fl_lua_open_nn(L);
  fl_lua_open_data(L);
  fl_lua_open_h5(L);
  fl_lua_open_cuda(L);
  fl_lua_open_util(L);
  fl_lua_open_dist(L);
  lua_pushstring(L, FLOWER_VERSION);
  lua_setfield(L, -2, "version");
  return 1;
}
