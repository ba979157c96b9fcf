/* Lua bindings for the h5 area: placeholder until that area lands. */
#include "lflower.h"

void fl_lua_open_h5(lua_State *L) { (void)L; }
