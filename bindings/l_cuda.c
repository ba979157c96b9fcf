/* flower.cuda: reports whether the CUDA backend was built; the backend itself is core/cuda/. */
#include "lflower.h"

static int cuda_available(lua_State *L) {
#ifdef FLOWER_CUDA
  lua_pushboolean(L, 1);
#else
  lua_pushboolean(L, 0);
#endif
  return 1;
}

void fl_lua_open_cuda(lua_State *L) {
  lua_newtable(L);
  lua_pushcfunction(L, cuda_available);
  lua_setfield(L, -2, "available");
  lua_setfield(L, -2, "cuda");
}
