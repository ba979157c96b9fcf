/* Lua bindings for the data area: flower.core._data = { image_load, image_decode, image_info,
 * image_encode, image_resize, image_raw, image_from_raw, loader, permutation, random_state, pixel_stats, flowers_draw, flowers_write,
 * flowers_class, flowers_grid, listdir, gather_rows, epoch_seed, sample_seed, now }. scripts/flower/data.lua wraps them as flower.data.
 *
 * Conventions: data set indices and the labels handed in are Lua's (1-based); the loader passes
 * labels through unchanged (flower.data gives class indices 1..K, as argmax returns them).
 * Flower categories (flowers_*) are 0-based like the Kaggle category_id they stand for.
 * Images are uint8 (H, W, 3) RGB tensors; batches are (N, H, W, 3) uint8 or float32.
 *
 * The Loader userdata (metatable "flower.Loader") owns a core fl_loader with its worker threads;
 * the threads never see a lua_State. Batch buffers are tensor storages allocated by the consumer,
 * handed to the returned tensor without a copy. __gc and __close stop the threads. */
#include "lflower.h"
#include "data/loader.h"
#include "data/flowers.h"
#include "data/image.h"
#include "backend.h"

#include <dirent.h>
#include <errno.h>
#include <stdio.h>
#include <sys/stat.h>
#include <stdlib.h>
#include <string.h>

#define LOADER_MT "flower.Loader"

/* ---------------------------------------------------------------- options */

static const char *mode_names[] = { "none", "resize", "center", "random_resized", NULL };
static const char *dtype_names[] = { "uint8", "float32", NULL };

static int opt_field(lua_State *L, int t, const char *k) {
  if (t == 0) { lua_pushnil(L); return LUA_TNIL; }
  return lua_getfield(L, t, k);
}

static double opt_number(lua_State *L, int t, const char *k, double def, const char *fname) {
  int ty = opt_field(L, t, k);
  double v = def;
  if (ty == LUA_TNUMBER) v = lua_tonumber(L, -1);
  else if (ty != LUA_TNIL) luaL_error(L, "%s: option '%s' must be a number, got %s", fname, k, luaL_typename(L, -1));
  lua_pop(L, 1);
  return v;
}

static lua_Integer opt_integer(lua_State *L, int t, const char *k, lua_Integer def, const char *fname) {
  int ty = opt_field(L, t, k);
  lua_Integer v = def;
  if (ty == LUA_TNUMBER) {
    int isint;
    v = lua_tointegerx(L, -1, &isint);
    if (!isint) luaL_error(L, "%s: option '%s' must be an integer, got %s", fname, k, lua_tostring(L, -1));
  } else if (ty != LUA_TNIL) {
    luaL_error(L, "%s: option '%s' must be an integer, got %s", fname, k, luaL_typename(L, -1));
  }
  lua_pop(L, 1);
  return v;
}

static int opt_bool(lua_State *L, int t, const char *k, int def, const char *fname) {
  int ty = opt_field(L, t, k);
  int v = def;
  if (ty == LUA_TBOOLEAN) v = lua_toboolean(L, -1);
  else if (ty != LUA_TNIL) luaL_error(L, "%s: option '%s' must be a boolean, got %s", fname, k, luaL_typename(L, -1));
  lua_pop(L, 1);
  return v;
}

/* an option that is one of `names` (index returned), or def when absent */
static int opt_enum(lua_State *L, int t, const char *k, const char *const *names, int def, const char *fname) {
  int ty = opt_field(L, t, k);
  int v = def;
  if (ty == LUA_TSTRING) {
    const char *s = lua_tostring(L, -1);
    v = -1;
    for (int i = 0; names[i]; i++)
      if (strcmp(s, names[i]) == 0) v = i;
    if (v < 0) {
      luaL_Buffer b;
      luaL_buffinit(L, &b);
      for (int i = 0; names[i]; i++) {
        if (i) luaL_addstring(&b, ", ");
        luaL_addchar(&b, '\'');
        luaL_addstring(&b, names[i]);
        luaL_addchar(&b, '\'');
      }
      luaL_pushresult(&b);
      luaL_error(L, "%s: option '%s' must be one of %s, got '%s'", fname, k, lua_tostring(L, -1), s);
    }
  } else if (ty != LUA_TNIL) {
    luaL_error(L, "%s: option '%s' must be a string, got %s", fname, k, luaL_typename(L, -1));
  }
  lua_pop(L, 1);
  return v;
}

/* a pair option: a number (both) or {a, b} */
static void opt_pair(lua_State *L, int t, const char *k, double *a, double *b, const char *fname) {
  int ty = opt_field(L, t, k);
  if (ty == LUA_TNUMBER) {
    *a = *b = lua_tonumber(L, -1);
  } else if (ty == LUA_TTABLE) {
    lua_rawgeti(L, -1, 1);
    lua_rawgeti(L, -2, 2);
    if (!lua_isnumber(L, -2) || !lua_isnumber(L, -1))
      luaL_error(L, "%s: option '%s' must be a number or a pair {a, b} of numbers", fname, k);
    *a = lua_tonumber(L, -2);
    *b = lua_tonumber(L, -1);
    lua_pop(L, 2);
  } else if (ty != LUA_TNIL) {
    luaL_error(L, "%s: option '%s' must be a number or a pair {a, b}, got %s", fname, k, luaL_typename(L, -1));
  }
  lua_pop(L, 1);
}

/* Reads a transform from the table at t (0: none given). size = n or {h, w}. */
static void read_transform(lua_State *L, int t, fl_transform *tf, int def_mode, const char *fname) {
  fl_transform_defaults(tf);
  tf->mode = opt_enum(L, t, "mode", mode_names, def_mode, fname);
  double h = 224, w = 224;
  opt_pair(L, t, "size", &h, &w, fname);
  if (!(h >= 1 && h <= 65535 && w >= 1 && w <= 65535 && h == (int)h && w == (int)w))
    luaL_error(L, "%s: option 'size' must be whole numbers in 1..65535, got %f x %f", fname, h, w);
  tf->out_h = (int)h;
  tf->out_w = (int)w;
  tf->crop_frac = opt_number(L, t, "crop_frac", tf->crop_frac, fname);
  opt_pair(L, t, "scale", &tf->scale_lo, &tf->scale_hi, fname);
  opt_pair(L, t, "ratio", &tf->ratio_lo, &tf->ratio_hi, fname);
  tf->hflip = opt_bool(L, t, "flip", 0, fname);
  tf->brightness = opt_number(L, t, "brightness", 0, fname);
  tf->contrast = opt_number(L, t, "contrast", 0, fname);
  tf->saturation = opt_number(L, t, "saturation", 0, fname);
  static const char *const filters[] = { "box", "bilinear", "bicubic", "lanczos", NULL };
  tf->filter = opt_enum(L, t, "filter", filters, FL_FILTER_BILINEAR, fname);
  tf->dct_scaling = opt_bool(L, t, "dct_scaling", 1, fname);
  tf->fast = opt_bool(L, t, "fast", 0, fname);
  tf->full_decode = opt_bool(L, t, "full_decode", 0, fname);
  lua_Integer e = opt_integer(L, t, "eighths", 0, fname);
  if (e < 0 || e > 8) luaL_error(L, "%s: option 'eighths' must be 1..8 (decode at eighths/8 of full size), got %d", fname, (int)e);
  tf->none_scale = (int)e;
  if (fl_transform_check(tf)) luaL_error(L, "%s: %s", fname, fl_errmsg());
}

/* ---------------------------------------------------------------- images */

typedef struct { fl_decoder *d; fl_image img; } decoder_ud;

static int decoder_gc(lua_State *L) {
  decoder_ud *u = lua_touserdata(L, 1);
  if (u->d) fl_decoder_free(u->d);
  u->d = NULL;
  fl_image_free(&u->img);
  return 0;
}

/* A decoder for this call, owned by a userdata on the stack (freed by its __gc on errors). */
static decoder_ud *push_decoder(lua_State *L) {
  decoder_ud *u = lua_newuserdatauv(L, sizeof *u, 0);
  memset(u, 0, sizeof *u);
  if (luaL_newmetatable(L, "flower.data.decoder")) {
    lua_pushcfunction(L, decoder_gc);
    lua_setfield(L, -2, "__gc");
  }
  lua_setmetatable(L, -2);
  u->d = fl_decoder_new();
  if (!u->d) luaL_error(L, "out of memory creating a JPEG decoder");
  return u;
}

/* Pushes a new contiguous tensor of dtype dt and shape, raising on failure. */
static fl_tensor *push_tensor(lua_State *L, fl_dtype dt, int ndim, const int64_t *shape) {
  fl_tensor *t = fl_lua_newtensor(L);
  if (fl_tensor_init(t, &fl_cpu_backend, 0, dt, ndim, shape)) {
    lua_gc(L, LUA_GCCOLLECT);
    if (fl_tensor_init(t, &fl_cpu_backend, 0, dt, ndim, shape)) fl_lua_error(L);
  }
  return t;
}

/* Decodes buf with the options at opt (a table or 0) and pushes the image tensor. `what` names
 * the source (file name or "string") in messages. */
static int decode_push(lua_State *L, decoder_ud *u, const uint8_t *buf, size_t len, int opt,
                       const char *fname, const char *what) {
  fl_transform tf;
  read_transform(L, opt, &tf, FL_TF_NONE, fname);
  int dtype = opt_enum(L, opt, "dtype", dtype_names, FL_OUT_U8, fname);
  static const char *const pres[] = { "none", "caffe", "tf", "torch", NULL };
  int pre = opt_enum(L, opt, "preprocess", pres, FL_PRE_NONE, fname);
  if (pre != FL_PRE_NONE && dtype != FL_OUT_F32)
    luaL_error(L, "%s: preprocess '%s' needs dtype 'float32'", fname, pres[pre]);
  uint64_t rng = (uint64_t)opt_integer(L, opt, "seed", 0, fname);
  int s = fl_decoder_transform(u->d, buf, len, &tf, &rng, &u->img);
  if (s) return luaL_error(L, "%s: %s: %s (%s)", fname, what, fl_errmsg(), fl_img_status_name(s));
  int64_t shape[3] = { u->img.h, u->img.w, 3 };
  fl_tensor *t = push_tensor(L, dtype == FL_OUT_F32 ? FL_F32 : FL_U8, 3, shape);
  fl_pixels_convert(u->img.data, (size_t)u->img.w * u->img.h, fl_tensor_data(t), dtype, pre);
  return 1;
}

static int opt_table_arg(lua_State *L, int arg) {
  if (lua_isnoneornil(L, arg)) return 0;
  luaL_checktype(L, arg, LUA_TTABLE);
  return arg;
}

/* image_load(path [, opts]) -> uint8 (H, W, 3) tensor. opts: mode ('none' by default: the whole
 * image), size, crop_frac, scale, ratio, flip, brightness, contrast, saturation, filter,
 * dct_scaling, fast, eighths (mode 'none': decode at eighths/8), seed, dtype, preprocess. */
static int l_image_load(lua_State *L) {
  const char *path = luaL_checkstring(L, 1);
  int opt = opt_table_arg(L, 2);
  decoder_ud *u = push_decoder(L);
  const uint8_t *buf;
  size_t len;
  int s = fl_decoder_read_file(u->d, path, &buf, &len);
  if (s) return luaL_error(L, "image_load: %s: %s (%s)", path, fl_errmsg(), fl_img_status_name(s));
  return decode_push(L, u, buf, len, opt, "image_load", path);
}

/* image_decode(bytes [, opts]) -> tensor: as image_load, from a string holding the file. */
static int l_image_decode(lua_State *L) {
  size_t len;
  const char *bytes = luaL_checklstring(L, 1, &len);
  int opt = opt_table_arg(L, 2);
  decoder_ud *u = push_decoder(L);
  return decode_push(L, u, (const uint8_t *)bytes, len, opt, "image_decode", "string");
}

/* image_info(bytes) -> {width, height, stored_width, stored_height, components, progressive,
 * orientation} for a string holding a JPEG file. */
static int l_image_info(lua_State *L) {
  size_t len;
  const char *bytes = luaL_checklstring(L, 1, &len);
  decoder_ud *u = push_decoder(L);
  fl_jpeg_info info;
  int s = fl_decoder_info(u->d, (const uint8_t *)bytes, len, &info);
  if (s) return luaL_error(L, "image_info: %s (%s)", fl_errmsg(), fl_img_status_name(s));
  lua_createtable(L, 0, 7);
  lua_pushinteger(L, info.width); lua_setfield(L, -2, "width");
  lua_pushinteger(L, info.height); lua_setfield(L, -2, "height");
  lua_pushinteger(L, info.stored_width); lua_setfield(L, -2, "stored_width");
  lua_pushinteger(L, info.stored_height); lua_setfield(L, -2, "stored_height");
  lua_pushinteger(L, info.components); lua_setfield(L, -2, "components");
  lua_pushboolean(L, info.progressive); lua_setfield(L, -2, "progressive");
  lua_pushinteger(L, info.orientation); lua_setfield(L, -2, "orientation");
  return 1;
}

static int box_gc(lua_State *L) {
  void **box = lua_touserdata(L, 1);
  free(*box);
  *box = NULL;
  return 0;
}

/* A userdata owning a malloc'ed pointer until the caller clears it. */
static void **push_box(lua_State *L, void *p) {
  void **box = lua_newuserdatauv(L, sizeof(void *), 0);
  *box = p;
  if (luaL_newmetatable(L, "flower.data.box")) {
    lua_pushcfunction(L, box_gc);
    lua_setfield(L, -2, "__gc");
  }
  lua_setmetatable(L, -2);
  return box;
}

/* Checks an image tensor: uint8, contiguous, (H, W, 3) or (H, W, 1) / (H, W) when gray is allowed. */
static fl_tensor *check_image(lua_State *L, int arg, int allow_gray, int *channels, const char *fname) {
  fl_tensor *t = fl_lua_checktensor(L, arg);
  char shp[96];
  fl_shape_str(shp, sizeof shp, t->ndim, t->shape);
  int ok = t->dtype == FL_U8 && fl_tensor_is_contiguous(t) && t->storage->backend == &fl_cpu_backend;
  int c = t->ndim == 3 ? (int)t->shape[2] : (t->ndim == 2 ? 1 : 0);
  ok = ok && (c == 3 || (allow_gray && c == 1)) && t->shape[0] >= 1 && t->shape[1] >= 1;
  if (!ok)
    luaL_error(L, "%s: expected a contiguous uint8 CPU tensor of shape (H, W, 3)%s, got %s %s", fname,
               allow_gray ? " or (H, W)" : "", fl_dtype_name(t->dtype), shp);
  *channels = c;
  return t;
}

/* image_encode(t [, quality=90 [, opts]]) -> string. t: uint8 (H, W, 3) or (H, W) gray.
 * opts: progressive (false), subsample (true: 4:2:0 chroma). */
static int l_image_encode(lua_State *L) {
  int c;
  fl_tensor *t = check_image(L, 1, 1, &c, "image_encode");
  lua_Integer q = luaL_optinteger(L, 2, 90);
  int opt = opt_table_arg(L, 3);
  int prog = opt_bool(L, opt, "progressive", 0, "image_encode");
  int sub = opt_bool(L, opt, "subsample", 1, "image_encode");
  if (q < 1 || q > 100) return luaL_error(L, "image_encode: quality must be 1..100, got %d", (int)q);
  unsigned char *out = NULL;
  size_t len = 0;
  if (fl_jpeg_encode(fl_tensor_data(t), (int)t->shape[1], (int)t->shape[0], c, (int)q, prog, sub, &out, &len))
    return luaL_error(L, "%s", fl_errmsg());
  void **box = push_box(L, out);  /* frees `out` if pushing the string raises */
  lua_pushlstring(L, (const char *)out, len);
  free(out);
  *box = NULL;
  return 1;
}

/* image_resize(t, h, w [, filter='bilinear' [, box={x0, y0, x1, y1}]]) -> new uint8 (h, w, 3)
 * tensor, Pillow's Image.resize((w, h), filter, box) on the same pixels. */
static int l_image_resize(lua_State *L) {
  int c;
  fl_tensor *t = check_image(L, 1, 0, &c, "image_resize");
  lua_Integer h = luaL_checkinteger(L, 2), w = luaL_checkinteger(L, 3);
  const char *fname = luaL_optstring(L, 4, "bilinear");
  int f = fl_filter_from_name(fname);
  if (f < 0) return luaL_error(L, "image_resize: filter must be 'box', 'bilinear', 'bicubic' or 'lanczos', got '%s'", fname);
  if (h < 1 || w < 1 || h > 65535 || w > 65535) return luaL_error(L, "image_resize: size must be 1..65535, got %dx%d", (int)h, (int)w);
  int sh = (int)t->shape[0], sw = (int)t->shape[1];
  double box[4] = { 0, 0, sw, sh };
  if (!lua_isnoneornil(L, 5)) {
    luaL_checktype(L, 5, LUA_TTABLE);
    for (int i = 0; i < 4; i++) {
      lua_rawgeti(L, 5, i + 1);
      if (!lua_isnumber(L, -1)) return luaL_error(L, "image_resize: box must be {x0, y0, x1, y1} numbers");
      box[i] = lua_tonumber(L, -1);
      lua_pop(L, 1);
    }
    if (!(box[0] >= 0 && box[1] >= 0 && box[2] <= sw && box[3] <= sh && box[0] < box[2] && box[1] < box[3]))
      return luaL_error(L, "image_resize: box {%f, %f, %f, %f} must lie inside the %dx%d image and be non-empty",
                        box[0], box[1], box[2], box[3], sw, sh);
  }
  int64_t shape[3] = { h, w, 3 };
  fl_tensor *o = push_tensor(L, FL_U8, 3, shape);
  fl_resize_ws *ws = fl_resize_ws_new();
  if (!ws) return luaL_error(L, "image_resize: out of memory");
  int s = fl_resize(ws, fl_tensor_data(t), sw, sh, (size_t)sw * 3, box, fl_tensor_data(o), (int)w, (int)h, (size_t)w * 3, f);
  fl_resize_ws_free(ws);
  if (s) return luaL_error(L, "image_resize: failed (%s)", fl_img_status_name(s));
  return 1;
}

/* image_raw(t) -> string of t's bytes (a contiguous uint8 image, row-major RGB): for comparisons
 * and for writing raw/PPM files. */
static int l_image_raw(lua_State *L) {
  int c;
  fl_tensor *t = check_image(L, 1, 1, &c, "image_raw");
  lua_pushlstring(L, fl_tensor_data(t), (size_t)fl_tensor_numel(t));
  return 1;
}

/* image_from_raw(bytes, h, w [, channels=3]) -> uint8 (h, w, channels) tensor holding the bytes */
static int l_image_from_raw(lua_State *L) {
  size_t len;
  const char *s = luaL_checklstring(L, 1, &len);
  lua_Integer h = luaL_checkinteger(L, 2), w = luaL_checkinteger(L, 3), c = luaL_optinteger(L, 4, 3);
  if (h < 1 || w < 1 || c < 1 || c > 4 || (size_t)(h * w * c) != len)
    return luaL_error(L, "image_from_raw: %I bytes do not make a %Ix%Ix%I image", (lua_Integer)len, h, w, c);
  int64_t shape[3] = { h, w, c };
  fl_tensor *t = push_tensor(L, FL_U8, 3, shape);
  memcpy(fl_tensor_data(t), s, len);
  return 1;
}

/* ---------------------------------------------------------------- the loader */

/* Batch buffers handed out are also kept (one extra reference each) in a small pool; once Lua has
 * collected a batch's tensor, the pool holds the only reference and the buffer serves again. Fresh
 * buffers cost page faults on every first write, a sixth of a worker's time at 224x224.
 *
 * pin_memory: buffers are page-locked memory from the device backend (fl_lua_pinned_provider), so
 * that flower.cuda.to_device_async uploads them by DMA while the workers decode the next batches.
 * Such an upload reads the buffer after the batch's tensor may already be gone: before a buffer
 * serves again, host_wait blocks until its last upload is done (in practice long done: the pool
 * and the prefetch slots make a ring of several batches). Without a device, plain memory. */
#define POOL_MAX 64

typedef struct {
  fl_loader *ld;
  int64_t *labels;     /* n entries, or NULL */
  int64_t n;
  int out_h, out_w, dtype;
  size_t batch_bytes;
  const fl_backend *pin;   /* pin_memory with a device present: who gives page-locked memory */
  int npool, pool_cap;
  fl_storage *pool[POOL_MAX];
} loader_ud;

static void *storage_alloc(void *ud, size_t nbytes, void **handle) {
  loader_ud *u = ud;
  for (int i = 0; i < u->npool; i++) {
    fl_storage *s = u->pool[i];
    if (__atomic_load_n(&s->refcount, __ATOMIC_ACQUIRE) == 1 && s->nbytes == nbytes) {
      /* an upload may still read it; a failed wait means the device failed, and says so elsewhere */
      if (s->pinned && s->pinned->host_wait(s->data)) continue;
      u->pool[i] = u->pool[--u->npool];   /* the pool's reference becomes the slot's */
      *handle = s;
      return s->data;
    }
  }
  fl_storage *s = u->pin ? fl_storage_new_pinned(u->pin, nbytes) : fl_storage_new(&fl_cpu_backend, 0, nbytes);
  *handle = s;
  return s ? s->data : NULL;
}

static void storage_release(void *ud, void *handle) {
  (void)ud;
  fl_storage_release(handle);
}

/* Remembers a storage just handed to a tensor; the oldest entry leaves when the pool is full. */
static void pool_add(loader_ud *u, fl_storage *s) {
  if (u->pool_cap == 0) return;
  if (u->npool == u->pool_cap) {
    fl_storage_release(u->pool[0]);
    memmove(u->pool, u->pool + 1, sizeof(fl_storage *) * (size_t)(u->npool - 1));
    u->npool--;
  }
  fl_storage_retain(s);
  u->pool[u->npool++] = s;
}

static loader_ud *check_loader(lua_State *L, int arg, const char *fname) {
  loader_ud *u = luaL_checkudata(L, arg, LOADER_MT);
  if (!u->ld) luaL_error(L, "%s: the loader is closed", fname);
  return u;
}

static int loader_gc(lua_State *L) {
  loader_ud *u = luaL_checkudata(L, 1, LOADER_MT);
  fl_loader_free(u->ld);
  u->ld = NULL;
  free(u->labels);
  u->labels = NULL;
  for (int i = 0; i < u->npool; i++) fl_storage_release(u->pool[i]);
  u->npool = 0;
  return 0;
}

/* loader{paths = {...}, labels = {...} or nil, batch_size, shuffle, seed, workers, prefetch,
 *        drop_last, dtype, preprocess, pin_memory, transform = {...}} -> Loader */
static int l_loader(lua_State *L) {
  const char *fname = "Loader";
  luaL_checktype(L, 1, LUA_TTABLE);
  if (lua_getfield(L, 1, "paths") != LUA_TTABLE) return luaL_error(L, "%s: 'paths' must be a table of file names", fname);
  int pidx = lua_gettop(L);
  lua_Integer n = luaL_len(L, pidx);
  /* path pointers in a userdata: freed by the collector if anything below raises */
  const char **paths = lua_newuserdatauv(L, sizeof(char *) * (size_t)(n ? n : 1), 0);
  for (lua_Integer i = 1; i <= n; i++) {
    if (lua_rawgeti(L, pidx, i) != LUA_TSTRING)
      return luaL_error(L, "%s: paths[%d] must be a string, got %s", fname, (int)i, luaL_typename(L, -1));
    paths[i - 1] = lua_tostring(L, -1);  /* kept alive by the paths table */
    lua_pop(L, 1);
  }
  int64_t *labels = NULL;
  if (lua_getfield(L, 1, "labels") == LUA_TTABLE) {
    int lidx = lua_gettop(L);
    if (luaL_len(L, lidx) != n) return luaL_error(L, "%s: %d labels for %d paths", fname, (int)luaL_len(L, lidx), (int)n);
    labels = lua_newuserdatauv(L, sizeof(int64_t) * (size_t)(n ? n : 1), 0);
    for (lua_Integer i = 1; i <= n; i++) {
      lua_rawgeti(L, lidx, i);
      int isint;
      lua_Integer v = lua_tointegerx(L, -1, &isint);
      if (!isint) return luaL_error(L, "%s: labels[%d] must be an integer, got %s", fname, (int)i, luaL_typename(L, -1));
      labels[i - 1] = v;
      lua_pop(L, 1);
    }
  } else if (!lua_isnil(L, -1)) {
    return luaL_error(L, "%s: 'labels' must be a table of integers or nil", fname);
  }
  fl_loader_config cfg;
  memset(&cfg, 0, sizeof cfg);
  cfg.n = n;
  cfg.paths = paths;
  cfg.batch_size = (int)opt_integer(L, 1, "batch_size", 32, fname);
  cfg.shuffle = opt_bool(L, 1, "shuffle", 0, fname);
  cfg.drop_last = opt_bool(L, 1, "drop_last", 0, fname);
  cfg.workers = (int)opt_integer(L, 1, "workers", 2, fname);
  cfg.prefetch = (int)opt_integer(L, 1, "prefetch", 0, fname);
  cfg.seed = (uint64_t)opt_integer(L, 1, "seed", 0, fname);
  cfg.dtype = opt_enum(L, 1, "dtype", dtype_names, FL_OUT_F32, fname);
  int pin = opt_bool(L, 1, "pin_memory", 0, fname);
  static const char *const pres[] = { "none", "caffe", "tf", "torch", NULL };
  cfg.preprocess = opt_enum(L, 1, "preprocess", pres, FL_PRE_NONE, fname);
  int ty = lua_getfield(L, 1, "transform");
  if (ty != LUA_TTABLE && ty != LUA_TNIL) return luaL_error(L, "%s: 'transform' must be a table, got %s", fname, luaL_typename(L, -1));
  read_transform(L, ty == LUA_TTABLE ? lua_gettop(L) : 0, &cfg.tf, FL_TF_CENTER, "Loader: transform");
  if (cfg.tf.mode == FL_TF_NONE) return luaL_error(L, "%s: transform mode 'none' gives images of different sizes; use 'center', 'resize' or 'random_resized'", fname);
  loader_ud *u = lua_newuserdatauv(L, sizeof *u, 0);
  memset(u, 0, sizeof *u);
  luaL_setmetatable(L, LOADER_MT);
  cfg.alloc = (fl_batch_alloc){ storage_alloc, storage_release, u };
  u->pin = pin ? fl_lua_pinned_provider() : NULL;
  if (labels) {
    u->labels = malloc(sizeof(int64_t) * (size_t)(n ? n : 1));
    if (!u->labels) return luaL_error(L, "%s: out of memory", fname);
    memcpy(u->labels, labels, sizeof(int64_t) * (size_t)n);
  }
  u->ld = fl_loader_new(&cfg);
  if (!u->ld) return luaL_error(L, "%s", fl_errmsg());
  u->n = n;
  u->batch_bytes = (size_t)cfg.batch_size * fl_loader_sample_bytes(u->ld);
  /* the batch being used, the one before it (until the collector frees it) and two spare;
   * never more than 1 GB idle */
  u->pool_cap = 4;
  while (u->pool_cap > 0 && (size_t)u->pool_cap * u->batch_bytes > ((size_t)1 << 30)) u->pool_cap--;
  u->out_h = cfg.tf.out_h;
  u->out_w = cfg.tf.out_w;
  u->dtype = cfg.dtype;
  return 1;
}

/* loader:start(epoch) */
static int loader_start(lua_State *L) {
  loader_ud *u = check_loader(L, 1, "Loader:start");
  lua_Integer e = luaL_checkinteger(L, 2);
  /* optional shard (rank, size) of the epoch's batches: flower.dist's data parallelism */
  lua_Integer rank = luaL_optinteger(L, 3, 0), size = luaL_optinteger(L, 4, 1);
  if (size < 1 || size > 1 << 20 || rank < 0 || rank >= size)
    return luaL_error(L, "Loader:start: shard rank %d of %d: expected 0 <= rank < size", (int)rank, (int)size);
  if (fl_loader_start_shard(u->ld, e, (int)rank, (int)size)) return luaL_error(L, "Loader:start: %s", fl_errmsg());
  return 0;
}

/* loader:next() -> x (N, H, W, 3), y (N) int64 or nil, index {1-based data set indices},
 *                  failures {{index =, status =, message =}, ...} or nil; nothing at the end */
static int loader_next(lua_State *L) {
  loader_ud *u = check_loader(L, 1, "Loader:next");
  /* everything Lua allocates comes before the batch, so no raise can lose its buffer */
  fl_tensor *x = fl_lua_newtensor(L);
  fl_loader_batch b;
  int r = fl_loader_next(u->ld, &b);
  if (r < 0) return luaL_error(L, "Loader:next: %s", fl_errmsg());
  if (r == 0) return 0;
  x->storage = b.handle;
  pool_add(u, b.handle);
  /* Lua does not see the batch's bytes: advance the collector as if they were allocated, so
   * tensors of finished batches are freed (and their buffers reused) at the pace batches come */
  lua_gc(L, LUA_GCSTEP, (int)(u->batch_bytes >> 10));
  x->offset = 0;
  x->ndim = 4;
  x->dtype = u->dtype == FL_OUT_F32 ? FL_F32 : FL_U8;
  x->shape[0] = b.n;
  x->shape[1] = u->out_h;
  x->shape[2] = u->out_w;
  x->shape[3] = 3;
  fl_contiguous_strides(4, x->shape, x->stride);
  /* copy what the loader only lends until the next call, then build the Lua values */
  int n = b.n, nf = b.nfailed;
  int64_t *idx = lua_newuserdatauv(L, sizeof(int64_t) * (size_t)(n + 1), 0);
  memcpy(idx, b.index, sizeof(int64_t) * (size_t)n);
  fl_loader_failure *fails = NULL;
  if (nf) {
    fails = lua_newuserdatauv(L, sizeof(fl_loader_failure) * (size_t)nf, 0);
    memcpy(fails, b.failed, sizeof(fl_loader_failure) * (size_t)nf);
  }
  lua_pushvalue(L, -1 - (nf ? 2 : 1));  /* x again: the results are x, y, index, failures */
  if (u->labels) {
    int64_t shape[1] = { n };
    fl_tensor *y = push_tensor(L, FL_I64, 1, shape);
    int64_t *yd = fl_tensor_data(y);
    for (int i = 0; i < n; i++) yd[i] = u->labels[idx[i]];
  } else {
    lua_pushnil(L);
  }
  lua_createtable(L, n, 0);
  for (int i = 0; i < n; i++) {
    lua_pushinteger(L, idx[i] + 1);
    lua_rawseti(L, -2, i + 1);
  }
  if (nf) {
    lua_createtable(L, nf, 0);
    for (int i = 0; i < nf; i++) {
      lua_createtable(L, 0, 3);
      lua_pushinteger(L, fails[i].index + 1); lua_setfield(L, -2, "index");
      lua_pushstring(L, fl_img_status_name(fails[i].status)); lua_setfield(L, -2, "status");
      lua_pushstring(L, fails[i].message); lua_setfield(L, -2, "message");
      lua_rawseti(L, -2, i + 1);
    }
  } else {
    lua_pushnil(L);
  }
  return 4;
}

static int loader_nbatches(lua_State *L) {
  loader_ud *u = check_loader(L, 1, "Loader:nbatches");
  lua_pushinteger(L, fl_loader_num_batches(u->ld));
  return 1;
}

static int loader_size(lua_State *L) {
  loader_ud *u = check_loader(L, 1, "Loader:size");
  lua_pushinteger(L, fl_loader_size(u->ld));
  return 1;
}

/* loader:pinned(): true when batches come in page-locked memory (pin_memory with a device) */
static int loader_pinned(lua_State *L) {
  loader_ud *u = check_loader(L, 1, "Loader:pinned");
  lua_pushboolean(L, u->pin != NULL);
  return 1;
}

static const luaL_Reg loader_methods[] = {
  {"pinned", loader_pinned},
  {"start", loader_start},
  {"next", loader_next},
  {"nbatches", loader_nbatches},
  {"size", loader_size},
  {"close", loader_gc},
  {NULL, NULL}
};

/* ---------------------------------------------------------------- permutations, statistics */

static lua_Integer check_count(lua_State *L, int arg, const char *fname) {
  lua_Integer n = luaL_checkinteger(L, arg);
  if (n < 0 || n > 0xFFFFFFFFll) luaL_error(L, "%s: n must be 0..2^32-1, got %I", fname, n);
  return n;
}

static uint32_t check_seed(lua_State *L, int arg, const char *fname) {
  lua_Integer seed = luaL_checkinteger(L, arg);
  if (seed < 0 || seed > 0xFFFFFFFFll) luaL_error(L, "%s: seed must be 0..2^32-1 (as numpy's RandomState), got %I", fname, seed);
  return (uint32_t)seed;
}

/* Pushes {p[0] + 1, ..., p[n-1] + 1}. */
static void push_indices(lua_State *L, const int64_t *p, lua_Integer n) {
  lua_createtable(L, (int)n, 0);
  for (lua_Integer i = 0; i < n; i++) {
    lua_pushinteger(L, p[i] + 1);
    lua_rawseti(L, -2, i + 1);
  }
}

/* permutation(n, seed) -> {1-based indices}: numpy.random.RandomState(seed).permutation(n) + 1 */
static int l_permutation(lua_State *L) {
  lua_Integer n = check_count(L, 1, "permutation");
  uint32_t seed = check_seed(L, 2, "permutation");
  int64_t *p = lua_newuserdatauv(L, sizeof(int64_t) * (size_t)(n ? n : 1), 0);
  if (fl_permutation(p, n, seed)) return luaL_error(L, "%s", fl_errmsg());
  push_indices(L, p, n);
  return 1;
}

#define RANDOM_STATE_MT "flower.RandomState"

/* random_state(seed) -> a stream rs, numpy.random.RandomState(seed): rs:permutation(n) -> {1-based
 * indices}, each call continuing where the last one stopped */
static int l_random_state(lua_State *L) {
  uint32_t seed = check_seed(L, 1, "random_state");
  fl_mt19937 *s = lua_newuserdatauv(L, sizeof *s, 0);
  fl_mt19937_seed(s, seed);
  luaL_setmetatable(L, RANDOM_STATE_MT);
  return 1;
}

static int random_state_permutation(lua_State *L) {
  fl_mt19937 *s = luaL_checkudata(L, 1, RANDOM_STATE_MT);
  lua_Integer n = check_count(L, 2, "RandomState:permutation");
  int64_t *p = lua_newuserdatauv(L, sizeof(int64_t) * (size_t)(n ? n : 1), 0);
  if (fl_mt19937_permutation(s, p, n)) return luaL_error(L, "%s", fl_errmsg());
  push_indices(L, p, n);
  return 1;
}

/* pixel_stats(paths, first, last [, workers=2 [, eighths=8]]) -> {pixels, sum = {r, g, b},
 * sumsq = {r, g, b}, failed = {{index, status, message}, ...}} over paths[first..last]. */
static int l_pixel_stats(lua_State *L) {
  luaL_checktype(L, 1, LUA_TTABLE);
  lua_Integer first = luaL_checkinteger(L, 2), last = luaL_checkinteger(L, 3);
  int workers = (int)luaL_optinteger(L, 4, 2);
  int eighths = (int)luaL_optinteger(L, 5, 8);
  if (eighths < 1 || eighths > 8) return luaL_error(L, "pixel_stats: eighths must be 1..8, got %d", eighths);
  if (workers < 1 || workers > 256) return luaL_error(L, "pixel_stats: workers must be 1..256, got %d", workers);
  lua_Integer n = last - first + 1;
  if (first < 1 || n < 0) return luaL_error(L, "pixel_stats: bad range %I..%I", first, last);
  const char **paths = lua_newuserdatauv(L, sizeof(char *) * (size_t)(n ? n : 1), 0);
  int *status = lua_newuserdatauv(L, sizeof(int) * (size_t)(n ? n : 1), 0);
  char (*msgs)[192] = lua_newuserdatauv(L, 192 * (size_t)(n ? n : 1), 0);
  for (lua_Integer i = 0; i < n; i++) {
    if (lua_rawgeti(L, 1, first + i) != LUA_TSTRING)
      return luaL_error(L, "pixel_stats: paths[%I] must be a string", first + i);
    paths[i] = lua_tostring(L, -1);
    lua_pop(L, 1);
  }
  fl_pixel_sums acc;
  memset(&acc, 0, sizeof acc);
  if (fl_pixel_stats(paths, n, workers, eighths, &acc, status, msgs)) return luaL_error(L, "pixel_stats: out of memory");
  lua_createtable(L, 0, 4);
  lua_pushinteger(L, (lua_Integer)acc.pixels);
  lua_setfield(L, -2, "pixels");
  lua_createtable(L, 3, 0);
  for (int c = 0; c < 3; c++) { lua_pushinteger(L, (lua_Integer)acc.sum[c]); lua_rawseti(L, -2, c + 1); }
  lua_setfield(L, -2, "sum");
  lua_createtable(L, 3, 0);
  for (int c = 0; c < 3; c++) { lua_pushinteger(L, (lua_Integer)acc.sumsq[c]); lua_rawseti(L, -2, c + 1); }
  lua_setfield(L, -2, "sumsq");
  lua_newtable(L);
  int k = 0;
  for (lua_Integer i = 0; i < n; i++) {
    if (!status[i]) continue;
    lua_createtable(L, 0, 3);
    lua_pushinteger(L, first + i); lua_setfield(L, -2, "index");
    lua_pushstring(L, fl_img_status_name(status[i])); lua_setfield(L, -2, "status");
    lua_pushstring(L, msgs[i]); lua_setfield(L, -2, "message");
    lua_rawseti(L, -2, ++k);
  }
  lua_setfield(L, -2, "failed");
  return 1;
}

/* ---------------------------------------------------------------- synthetic flowers */

static void check_category(lua_State *L, lua_Integer c, lua_Integer K, const char *fname) {
  if (K < 1 || K > FL_FLOWERS_MAX_CLASSES) luaL_error(L, "%s: classes must be 1..%d, got %I", fname, FL_FLOWERS_MAX_CLASSES, K);
  if (c < 0 || c >= K) luaL_error(L, "%s: category must be 0..%I (0-based), got %I", fname, K - 1, c);
}

/* flowers_class(category, classes) -> petals, shape name, palette name */
static int l_flowers_class(lua_State *L) {
  lua_Integer c = luaL_checkinteger(L, 1), K = luaL_checkinteger(L, 2);
  check_category(L, c, K, "flowers_class");
  fl_flower_class fc;
  fl_flowers_class((int)c, (int)K, &fc);
  lua_pushinteger(L, fc.petals);
  lua_pushstring(L, fl_flowers_shape_name(fc.shape));
  lua_pushstring(L, fl_flowers_palette_name(fc.palette));
  return 3;
}

/* flowers_grid(classes) -> petal counts, shapes, palettes (attribute values in use) */
static int l_flowers_grid(lua_State *L) {
  lua_Integer K = luaL_checkinteger(L, 1);
  check_category(L, 0, K, "flowers_grid");
  int nc, ns, np;
  fl_flowers_grid((int)K, &nc, &ns, &np);
  lua_pushinteger(L, nc);
  lua_pushinteger(L, ns);
  lua_pushinteger(L, np);
  return 3;
}

/* flowers_draw(category, classes, w, h, seed) -> uint8 (h, w, 3) tensor */
static int l_flowers_draw(lua_State *L) {
  lua_Integer c = luaL_checkinteger(L, 1), K = luaL_checkinteger(L, 2);
  lua_Integer w = luaL_checkinteger(L, 3), h = luaL_checkinteger(L, 4), seed = luaL_checkinteger(L, 5);
  check_category(L, c, K, "flowers_draw");
  if (w < 16 || h < 16 || w > 8192 || h > 8192) return luaL_error(L, "flowers_draw: size must be 16..8192, got %Ix%I", w, h);
  int64_t shape[3] = { h, w, 3 };
  fl_tensor *t = push_tensor(L, FL_U8, 3, shape);
  if (fl_flowers_draw(fl_tensor_data(t), (int)w, (int)h, (int)c, (int)K, (uint64_t)seed))
    return luaL_error(L, "%s", fl_errmsg());
  return 1;
}

/* flowers_write(jobs, classes [, workers=2]): jobs = {{path =, category = (0-based), w =, h =,
 * quality =, seed =}, ...}; draws and writes each JPEG (atomically) in parallel. */
static int l_flowers_write(lua_State *L) {
  luaL_checktype(L, 1, LUA_TTABLE);
  lua_Integer K = luaL_checkinteger(L, 2);
  int workers = (int)luaL_optinteger(L, 3, 2);
  check_category(L, 0, K, "flowers_write");
  lua_Integer n = luaL_len(L, 1);
  fl_flowers_job *jobs = lua_newuserdatauv(L, sizeof *jobs * (size_t)(n ? n : 1), 0);
  for (lua_Integer i = 1; i <= n; i++) {
    if (lua_rawgeti(L, 1, i) != LUA_TTABLE) return luaL_error(L, "flowers_write: jobs[%I] must be a table", i);
    int j = lua_gettop(L);
    if (lua_getfield(L, j, "path") != LUA_TSTRING) return luaL_error(L, "flowers_write: jobs[%I].path must be a string", i);
    jobs[i - 1].path = lua_tostring(L, -1);  /* anchored by the job table */
    lua_pop(L, 1);
    lua_Integer c = opt_integer(L, j, "category", -1, "flowers_write");
    check_category(L, c, K, "flowers_write");
    lua_Integer w = opt_integer(L, j, "w", 0, "flowers_write"), h = opt_integer(L, j, "h", 0, "flowers_write");
    if (w < 16 || h < 16 || w > 8192 || h > 8192) return luaL_error(L, "flowers_write: jobs[%I] size must be 16..8192, got %Ix%I", i, w, h);
    lua_Integer q = opt_integer(L, j, "quality", 90, "flowers_write");
    if (q < 1 || q > 100) return luaL_error(L, "flowers_write: jobs[%I].quality must be 1..100, got %I", i, q);
    jobs[i - 1].cls = (int)c;
    jobs[i - 1].w = (int)w;
    jobs[i - 1].h = (int)h;
    jobs[i - 1].quality = (int)q;
    jobs[i - 1].seed = (uint64_t)opt_integer(L, j, "seed", 0, "flowers_write");
    lua_pop(L, 1);
  }
  if (fl_flowers_write(jobs, (int)n, (int)K, workers)) return luaL_error(L, "%s", fl_errmsg());
  return 0;
}

/* ---------------------------------------------------------------- small helpers */

static int cmp_str(const void *a, const void *b) { return strcmp(*(const char *const *)a, *(const char *const *)b); }

/* listdir(path) -> names (sorted bytewise, without . and ..), kinds ('dir', 'file' or 'other') */
static int l_listdir(lua_State *L) {
  const char *path = luaL_checkstring(L, 1);
  DIR *d = opendir(path);
  if (!d) return luaL_error(L, "listdir: cannot open directory '%s': %s", path, strerror(errno));
  /* names are collected in a Lua table first (so a raise cannot leak the DIR beyond this loop) */
  lua_newtable(L);
  int n = 0;
  struct dirent *e;
  while ((e = readdir(d)) != NULL) {
    if (strcmp(e->d_name, ".") == 0 || strcmp(e->d_name, "..") == 0) continue;
    lua_pushstring(L, e->d_name);
    lua_rawseti(L, -2, ++n);
  }
  closedir(d);
  const char **names = lua_newuserdatauv(L, sizeof(char *) * (size_t)(n ? n : 1), 0);
  for (int i = 0; i < n; i++) {
    lua_rawgeti(L, -2, i + 1);
    names[i] = lua_tostring(L, -1);  /* anchored by the table */
    lua_pop(L, 1);
  }
  qsort(names, (size_t)n, sizeof(char *), cmp_str);
  lua_createtable(L, n, 0);
  lua_createtable(L, n, 0);
  size_t plen = strlen(path);
  luaL_Buffer b;
  for (int i = 0; i < n; i++) {
    lua_pushstring(L, names[i]);
    lua_rawseti(L, -3, i + 1);
    luaL_buffinit(L, &b);
    luaL_addlstring(&b, path, plen);
    luaL_addchar(&b, '/');
    luaL_addstring(&b, names[i]);
    luaL_pushresult(&b);
    struct stat st;
    const char *kind = "other";
    if (stat(lua_tostring(L, -1), &st) == 0) kind = S_ISDIR(st.st_mode) ? "dir" : (S_ISREG(st.st_mode) ? "file" : "other");
    lua_pop(L, 1);
    lua_pushstring(L, kind);
    lua_rawseti(L, -2, i + 1);
  }
  return 2;
}

/* gather_rows(t, index) -> new tensor whose rows (first dim) are t's rows index[1], index[2], ...
 * (1-based). t: contiguous CPU tensor of any dtype; index: a table of integers. */
static int l_gather_rows(lua_State *L) {
  fl_tensor *t = fl_lua_checktensor(L, 1);
  luaL_checktype(L, 2, LUA_TTABLE);
  if (t->ndim < 1 || !fl_tensor_is_contiguous(t) || t->storage->backend != &fl_cpu_backend)
    return luaL_error(L, "gather_rows: expected a contiguous CPU tensor with at least one dim");
  lua_Integer k = luaL_len(L, 2);
  int64_t shape[FL_MAXDIM];
  memcpy(shape, t->shape, sizeof(int64_t) * (size_t)t->ndim);
  shape[0] = k;
  size_t row = fl_dtype_size(t->dtype);
  for (int i = 1; i < t->ndim; i++) row *= (size_t)t->shape[i];
  fl_tensor *o = push_tensor(L, t->dtype, t->ndim, shape);
  const char *src = fl_tensor_data(t);
  char *dst = fl_tensor_data(o);
  for (lua_Integer i = 1; i <= k; i++) {
    lua_rawgeti(L, 2, i);
    int isint;
    lua_Integer r = lua_tointegerx(L, -1, &isint);
    lua_pop(L, 1);
    if (!isint || r < 1 || r > t->shape[0])
      return luaL_error(L, "gather_rows: index[%I] must be an integer in 1..%I", i, (lua_Integer)t->shape[0]);
    memcpy(dst + (size_t)(i - 1) * row, src + (size_t)(r - 1) * row, row);
  }
  return 1;
}

/* epoch_seed(seed, epoch) -> the 32-bit permutation seed of that epoch (as the loader uses) */
static int l_epoch_seed(lua_State *L) {
  lua_pushinteger(L, fl_epoch_seed((uint64_t)luaL_checkinteger(L, 1), luaL_checkinteger(L, 2)));
  return 1;
}

/* sample_seed(seed, a, b) -> a 64-bit seed mixed from three integers (splitmix64 rounds) */
static int l_sample_seed(lua_State *L) {
  lua_pushinteger(L, (lua_Integer)fl_rng_sample_seed((uint64_t)luaL_checkinteger(L, 1), luaL_checkinteger(L, 2),
                                                     luaL_checkinteger(L, 3)));
  return 1;
}

static const luaL_Reg data_funcs[] = {
  {"listdir", l_listdir},
  {"gather_rows", l_gather_rows},
  {"epoch_seed", l_epoch_seed},
  {"now", fl_lua_now},   /* benchmarks time the loaders' threads with it */
  {"sample_seed", l_sample_seed},
  {"image_load", l_image_load},
  {"image_decode", l_image_decode},
  {"image_info", l_image_info},
  {"image_encode", l_image_encode},
  {"image_resize", l_image_resize},
  {"image_raw", l_image_raw},
  {"image_from_raw", l_image_from_raw},
  {"loader", l_loader},
  {"permutation", l_permutation},
  {"random_state", l_random_state},
  {"pixel_stats", l_pixel_stats},
  {"flowers_class", l_flowers_class},
  {"flowers_grid", l_flowers_grid},
  {"flowers_draw", l_flowers_draw},
  {"flowers_write", l_flowers_write},
  {NULL, NULL}
};

void fl_lua_open_data(lua_State *L) {
  if (luaL_newmetatable(L, LOADER_MT)) {
    luaL_newlib(L, loader_methods);
    lua_setfield(L, -2, "__index");
    lua_pushcfunction(L, loader_gc);
    lua_setfield(L, -2, "__gc");
    lua_pushcfunction(L, loader_gc);
    lua_setfield(L, -2, "__close");
  }
  lua_pop(L, 1);
  if (luaL_newmetatable(L, RANDOM_STATE_MT)) {
    lua_createtable(L, 0, 1);
    lua_pushcfunction(L, random_state_permutation);
    lua_setfield(L, -2, "permutation");
    lua_setfield(L, -2, "__index");
  }
  lua_pop(L, 1);
  luaL_newlib(L, data_funcs);
  lua_setfield(L, -2, "_data");
}
