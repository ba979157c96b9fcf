/* Lua bindings for the nn area: placeholder until that area lands. */
#include "lflower.h"

void fl_lua_open_nn(lua_State *L) { (void)L; }
