/* Lua bindings for the data area: placeholder until that area lands. */
#include "lflower.h"

void fl_lua_open_data(lua_State *L) { (void)L; }
