/* Internal header shared by the Lua bindings (never by core/). */
#ifndef FLOWER_LFLOWER_H
#define FLOWER_LFLOWER_H

#include <lua.h>
#include <lauxlib.h>
#include "tensor.h"

#define FL_TENSOR_MT "flower.Tensor"

/* Tensor userdata: a struct fl_tensor by value; storage NULL once freed (t:free(), __close).
 * Lua-side conventions (1-based dims and indices, negatives from the end, ...) are listed at the
 * top of bindings/l_tensor.c; l_tensor.h has helpers (FL_TRY, fl_lua_checkdim, fl_lua_checksize). */
fl_tensor *fl_lua_checktensor(lua_State *L, int idx);   /* raises if not a tensor or freed */
fl_tensor *fl_lua_totensor(lua_State *L, int idx);      /* NULL if not a (live) tensor */
/* Pushes a new empty tensor userdata (storage NULL) with its metatable; fill it with fl_tensor_init
 * or an op writing into it. On failure of that op, call fl_lua_error: __gc handles the empty one.
 * It may run a full garbage collection first (when tensor storage has doubled since the last
 * one), so keep the tensors you are using on the Lua stack, not only in C variables. */
fl_tensor *fl_lua_newtensor(lua_State *L);
/* Raises fl_errmsg() as a Lua error, prefixed by nothing (messages already name the op). */
int fl_lua_error(lua_State *L);

/* Device tensors (storage on a backend other than the CPU's, e.g. CUDA) must never be read or written
 * through fl_tensor_data from host code. A binding that touches elements directly either
 *  - refuses: fl_lua_checkhost raises "fname: the tensor is on cuda:0; call t:cpu() first", or
 *  - reads a host copy: fl_lua_tohost returns t itself when it is in host memory (and pushes nil),
 *    else pushes a new contiguous CPU tensor holding t's values and returns it. It always pushes one
 *    value; pop it when done (the copy is a userdata, so an error meanwhile cannot leak it). */
void fl_lua_checkhost(lua_State *L, const fl_tensor *t, const char *fname);
const fl_tensor *fl_lua_tohost(lua_State *L, const fl_tensor *t, const char *fname);

/* l_cuda.c: the device backend that gives page-locked host memory for batches (CUDA with a device
 * present), or NULL: then fl_storage_new_pinned gives plain memory. */
const struct fl_backend *fl_lua_pinned_provider(void);

/* l_device.c: a new contiguous tensor like src on (be, device), holding src's values. Device memory
 * is invisible to Lua's collector: on out-of-memory it collects garbage (unreferenced tensors return
 * their blocks to the cache) and tries once more. Raises with fname on failure. */
int fl_lua_push_copy_to(lua_State *L, const fl_tensor *src, const struct fl_backend *be, int device,
                        const char *fname);

/* Each binding file registers its functions into the module table at the top of the stack. */
void fl_lua_open_tensor(lua_State *L);
void fl_lua_open_nn(lua_State *L);
void fl_lua_open_data(lua_State *L);
void fl_lua_open_h5(lua_State *L);
void fl_lua_open_device(lua_State *L);
void fl_lua_open_cuda(lua_State *L);
void fl_lua_open_util(lua_State *L);

/* l_util.c: now() -> seconds from a monotonic clock (the one clock of _util, _nn and _data). */
int fl_lua_now(lua_State *L);
void fl_lua_open_dist(lua_State *L);

#endif
