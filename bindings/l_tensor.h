/* Internal helpers shared by the tensor binding files (l_tensor.c, l_tensor_math.c,
 * l_tensor_print.c). See the top of l_tensor.c for the Lua-side conventions. */
#ifndef FLOWER_L_TENSOR_H
#define FLOWER_L_TENSOR_H

#include "lflower.h"
#include "ops.h"

/* Runs `call` (an expression returning 0 / -1 that can be run again from scratch); when it fails
 * for lack of memory, runs a full garbage collection (tensors Lua no longer references free their
 * storage) and tries once more; raises the error otherwise. Never use inside a finalizer. */
#define FL_TRY(L, call)                                                     \
  do {                                                                      \
    if ((call) < 0) {                                                       \
      if (!fl_last_failure_was_oom()) return fl_lua_error(L);               \
      lua_gc((L), LUA_GCCOLLECT);                                           \
      if ((call) < 0) return fl_lua_error(L);                               \
    }                                                                       \
  } while (0)

/* Lua dim argument (1-based; negative counts from the end, -1 = last) -> 0-based, for a tensor of
 * `ndim` dims; `extra` = 1 accepts ndim + 1 (unsqueeze). Raises "fname: dim d out of range ...". */
int fl_lua_checkdim(lua_State *L, int arg, int ndim, int extra, const char *fname);
/* Reads a size given as varargs integers from `arg` on, or one table {2,3}; stops at the first
 * non-number. Returns the number of dims; *next gets the index after the size. */
int fl_lua_checksize(lua_State *L, int arg, int64_t *shape, int *next, const char *fname);
/* An optional dtype name at `arg` (nil/none gives `def`). */
fl_dtype fl_lua_optdtype(lua_State *L, int arg, fl_dtype def, const char *fname);

/* A tensor argument or a number (made into a 0-dim tensor of a dtype suited to `like`):
 * fills *tmp for numbers (free it afterwards) and returns the tensor to use. */
const fl_tensor *fl_lua_tensorarg(lua_State *L, int arg, const fl_tensor *like, fl_tensor *tmp, const char *fname);

/* Pushes t's value at the flat-free index as a Lua number (integers as integers). */
void fl_lua_pushelem(lua_State *L, const fl_tensor *t, const int64_t *index);

const char *fl_lua_torch_name(fl_dtype dt);           /* "torch.FloatTensor", ... (Torch7's type names) */
void fl_lua_open_tensor_math(lua_State *L, int mt);   /* registers math methods into the metatable at mt */
int fl_lua_tensor_tostring(lua_State *L);

#endif
