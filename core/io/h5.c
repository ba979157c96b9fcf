/* HDF5 files on libhdf5 (serial): datasets as tensors, string lists, attributes.
 *
 * Every HDF5 id acquired in a function is released on every path out of it (the `done:` labels).
 * HDF5's automatic error printing is off; when an HDF5 call fails we walk its error stack and
 * append the innermost description ("truncated file: eof = ...") to our own message, which
 * names the operation, the file and the object. */
#include "h5.h"
#include "h5_sandbox.h"
#include "backend.h"
#include "ops.h"

#include <hdf5.h>

#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

struct fl_h5 {
  hid_t fid;                  /* -1 for an untrusted file: the reader process holds it */
  int writable;
  char *path;
  fl_h5_sandbox *sb;          /* untrusted: every read goes to the reader process */
};

/* Chunks of extendible / compressed datasets aim at this many bytes (HDF5's chunk cache is 1 MiB). */
#define CHUNK_BYTES (1 << 20)

/* ---------------------------------------------------------------- errors */

static void h5_quiet(void) {
  /* HDF5 prints its error stack to stderr by default; we report through fl_errmsg instead. */
  H5Eset_auto2(H5E_DEFAULT, NULL, NULL);
}

/* Keeps the last description seen while walking downward: the innermost, most specific one. */
static herr_t walk_cb(unsigned n, const H5E_error2_t *e, void *data) {
  (void)n;
  if (e->desc && e->desc[0]) snprintf((char *)data, 200, "%s", e->desc);
  return 0;
}

static void h5_reason(char *buf) {
  buf[0] = 0;
  H5Ewalk2(H5E_DEFAULT, H5E_WALK_DOWNWARD, walk_cb, buf);
  H5Eclear2(H5E_DEFAULT);
}

static const char *fname(const fl_h5 *f) { return f ? f->path : "?"; }

/* "h5.<op>: <file>: '<obj>': <what>" */
static int vfail(const char *op, const char *file, const char *obj, int hdf, const char *fmt,
                 va_list ap) {
  char what[256], why[200];
  vsnprintf(what, sizeof what, fmt, ap);
  why[0] = 0;
  if (hdf) h5_reason(why);
  else H5Eclear2(H5E_DEFAULT);
  if (obj)
    return fl_fail("h5.%s: %s: '%s': %s%s%s%s", op, file, obj, what, why[0] ? " (hdf5: " : "", why,
                   why[0] ? ")" : "");
  return fl_fail("h5.%s: %s: %s%s%s%s", op, file, what, why[0] ? " (hdf5: " : "", why,
                 why[0] ? ")" : "");
}

/* A failure of our own checks. */
__attribute__((format(printf, 4, 5)))
static int efail(const fl_h5 *f, const char *op, const char *obj, const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  int r = vfail(op, fname(f), obj, 0, fmt, ap);
  va_end(ap);
  return r;
}

/* A failure reported by an HDF5 call: appends HDF5's innermost message. */
__attribute__((format(printf, 4, 5)))
static int hfail(const fl_h5 *f, const char *op, const char *obj, const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  int r = vfail(op, fname(f), obj, 1, fmt, ap);
  va_end(ap);
  return r;
}

static void close_id(hid_t id) {
  if (id < 0) return;
  switch (H5Iget_type(id)) {
  case H5I_DATASET: H5Dclose(id); break;
  case H5I_GROUP: H5Gclose(id); break;
  case H5I_DATATYPE: H5Tclose(id); break;
  case H5I_DATASPACE: H5Sclose(id); break;
  case H5I_ATTR: H5Aclose(id); break;
  case H5I_GENPROP_LST: H5Pclose(id); break;
  default: H5Oclose(id); break;
  }
}

/* The C side of files.killpoint (scripts/flower/files.lua), for crash-safety tests: with
 * FLOWER_KILLPOINT='<name>[:n]' the n-th arrival at `name` SIGKILLs the process, here between
 * HDF5 calls that Lua cannot come between. */
static void killpoint(const char *name) {
  static int hits;
  const char *v = getenv("FLOWER_KILLPOINT");
  size_t n = strlen(name);
  if (!v || strncmp(v, name, n) != 0 || (v[n] != 0 && v[n] != ':')) return;
  if (++hits == (v[n] == ':' ? atoi(v + n + 1) : 1)) kill(getpid(), SIGKILL);
}

/* ---------------------------------------------------------------- files */

static int file_exists(const char *path) { return access(path, F_OK) == 0; }

static hid_t make_fapl(int locking) {
  hid_t fapl = H5Pcreate(H5P_FILE_ACCESS);
  if (fapl < 0) return -1;
  /* The reader process inherits its parent's HDF5 state, whose open files were opened with the
   * default (sec2) driver through descriptors the reader has closed. HDF5 shares a file opened
   * twice only when the drivers match: the stdio driver keeps the reader's open its own. */
  if (!locking) H5Pset_fapl_stdio(fapl);
  /* Closing the file closes everything in it: no id can keep a half-written file open. */
  H5Pset_fclose_degree(fapl, H5F_CLOSE_STRONG);
  /* Lock when the file system can; work on those that cannot (some container mounts). */
  H5Pset_file_locking(fapl, locking, 1);
  return fapl;
}

/* Groups we create list their children in creation order (Keras's layer groups read naturally). */
static hid_t make_gcpl(hid_t cls) {
  hid_t p = H5Pcreate(cls);
  if (p >= 0) H5Pset_link_creation_order(p, H5P_CRT_ORDER_TRACKED | H5P_CRT_ORDER_INDEXED);
  return p;
}

/* locking 0: the untrusted reader process (h5_sandbox.c), which only reads and must not conflict
 * with its parent's lock on a file that parent has open */
static int open_file(fl_h5 **out, const char *path, char mode, int locking) {
  h5_quiet();
  *out = NULL;
  if (mode != 'r' && mode != 'w' && mode != 'a')
    return fl_fail("h5.open: %s: mode must be 'r', 'w' or 'a', got '%c'", path, mode);
  if (mode == 'r' && !file_exists(path))
    return fl_fail("h5.open: %s: no such file", path);
  fl_h5 *f = calloc(1, sizeof *f);
  char *p = f ? strdup(path) : NULL;
  if (!p) { free(f); return fl_fail_oom("h5.open: %s: out of memory", path); }
  f->path = p;
  f->fid = -1;
  hid_t fapl = make_fapl(locking), fcpl = -1;
  if (mode == 'r' || (mode == 'a' && file_exists(path))) {
    htri_t is = H5Fis_hdf5(path);
    if (is == 0) { efail(f, "open", NULL, "not an HDF5 file"); goto fail; }
    f->fid = H5Fopen(path, mode == 'r' ? H5F_ACC_RDONLY : H5F_ACC_RDWR, fapl);
    if (f->fid < 0) {
      hfail(f, "open", NULL, "cannot open for %s (truncated or corrupt?)",
            mode == 'r' ? "reading" : "appending");
      goto fail;
    }
  } else {
    fcpl = make_gcpl(H5P_FILE_CREATE);
    f->fid = H5Fcreate(path, H5F_ACC_TRUNC, fcpl, fapl);
    if (f->fid < 0) { hfail(f, "open", NULL, "cannot create the file"); goto fail; }
  }
  f->writable = mode != 'r';
  close_id(fapl);
  close_id(fcpl);
  *out = f;
  return 0;
fail:
  close_id(fapl);
  close_id(fcpl);
  free(f->path);
  free(f);
  return -1;
}

int fl_h5_open(fl_h5 **out, const char *path, char mode) { return open_file(out, path, mode, 1); }

int fl_h5_open_reader(fl_h5 **out, const char *path) { return open_file(out, path, 'r', 0); }

int fl_h5_open_untrusted(fl_h5 **out, const char *path, const fl_h5_limits *lim) {
  *out = NULL;
  if (!file_exists(path)) return fl_fail("h5.open: %s: no such file", path);
  fl_h5 *f = calloc(1, sizeof *f);
  char *p = f ? strdup(path) : NULL;
  if (!p) { free(f); return fl_fail_oom("h5.open: %s: out of memory", path); }
  f->path = p;
  f->fid = -1;
  if (fl_h5sb_start(&f->sb, path, lim) < 0) { free(p); free(f); return -1; }
  *out = f;
  return 0;
}

int fl_h5_untrusted(const fl_h5 *f) { return f->sb != NULL; }

int fl_h5_close(fl_h5 *f) {
  if (!f) return 0;
  int r = 0;
  fl_h5sb_stop(f->sb);
  if (f->fid >= 0 && H5Fclose(f->fid) < 0) r = hfail(f, "close", NULL, "closing failed");
  free(f->path);
  free(f);
  return r;
}

int fl_h5_flush(fl_h5 *f) {
  if (f->sb) return 0;          /* read-only in another process: nothing to flush */
  if (H5Fflush(f->fid, H5F_SCOPE_GLOBAL) < 0) return hfail(f, "flush", NULL, "flushing failed");
  killpoint("h5.flushed");
  return 0;
}

const char *fl_h5_filename(const fl_h5 *f) { return f->path; }
int fl_h5_writable(const fl_h5 *f) { return f->writable; }

int fl_h5_fsync_path(const char *path) {
  int fd = open(path, O_RDONLY);
  if (fd < 0) return fl_fail("h5.fsync: %s: %s", path, strerror(errno));
  int r = fsync(fd);
  int e = errno;
  close(fd);
  if (r < 0) return fl_fail("h5.fsync: %s: %s", path, strerror(e));
  return 0;
}

/* ---------------------------------------------------------------- paths and objects */

static const char *norm(const char *path) { return (!path || !path[0]) ? "/" : path; }

static int is_root(const char *path) {
  for (; *path; path++)
    if (*path != '/') return 0;
  return 1;
}

/* 1 if every link on the way to `path` exists and the last resolves to an object, else 0.
 * (H5Lexists on "a/b" is an error when "a" is missing, so walk the prefixes.) */
static int path_exists(hid_t fid, const char *path) {
  if (is_root(path)) return 1;
  size_t n = strlen(path);
  char *buf = malloc(n + 1);
  if (!buf) return 0;
  memcpy(buf, path, n + 1);
  int ok = 1;
  for (size_t i = 1; i <= n && ok; i++) {
    if (i == n || (buf[i] == '/' && buf[i - 1] != '/')) {
      char c = buf[i];
      buf[i] = 0;
      if (buf[0] && !is_root(buf)) ok = H5Lexists(fid, buf, H5P_DEFAULT) > 0;
      buf[i] = c;
    }
  }
  if (ok) ok = H5Oexists_by_name(fid, path, H5P_DEFAULT) > 0;
  free(buf);
  H5Eclear2(H5E_DEFAULT);
  return ok;
}

int fl_h5_kind(fl_h5 *f, const char *path) {
  path = norm(path);
  if (f->sb) return fl_h5sb_kind(f->sb, path);
  if (!path_exists(f->fid, path)) return FL_H5_NONE;
  hid_t o = H5Oopen(f->fid, path, H5P_DEFAULT);
  if (o < 0) return hfail(f, "kind", path, "cannot open the object");
  H5I_type_t t = H5Iget_type(o);
  H5Oclose(o);
  return t == H5I_GROUP ? FL_H5_GROUP : t == H5I_DATASET ? FL_H5_DATASET : FL_H5_OTHER;
}

static const char *kind_name(int k) {
  return k == FL_H5_GROUP ? "a group" : k == FL_H5_DATASET ? "a dataset" : k == FL_H5_NONE ? "missing" : "a named datatype";
}

/* Opens a dataset, or explains what is there instead. */
static hid_t open_dataset(fl_h5 *f, const char *op, const char *path) {
  int k = fl_h5_kind(f, path);
  if (k < 0) return -1;
  if (k == FL_H5_NONE) return efail(f, op, path, "no such dataset");
  if (k != FL_H5_DATASET) return efail(f, op, path, "expected a dataset, found %s", kind_name(k));
  hid_t d = H5Dopen2(f->fid, path, H5P_DEFAULT);
  if (d < 0) return hfail(f, op, path, "cannot open the dataset");
  return d;
}

/* Creates the groups on the way to `path` (not its last component). */
static int make_parents(fl_h5 *f, const char *op, const char *path) {
  size_t n = strlen(path);
  char *buf = malloc(n + 1);
  if (!buf) return fl_fail_oom("h5.%s: out of memory", op);
  memcpy(buf, path, n + 1);
  int r = 0;
  hid_t gcpl = make_gcpl(H5P_GROUP_CREATE);
  for (size_t i = 1; i < n && r == 0; i++) {
    if (buf[i] != '/' || buf[i - 1] == '/') continue;
    buf[i] = 0;
    int k = fl_h5_kind(f, buf);
    if (k < 0) r = -1;
    else if (k == FL_H5_NONE) {
      hid_t g = H5Gcreate2(f->fid, buf, H5P_DEFAULT, gcpl, H5P_DEFAULT);
      if (g < 0) r = hfail(f, op, buf, "cannot create the group");
      else H5Gclose(g);
    } else if (k != FL_H5_GROUP)
      r = efail(f, op, buf, "expected a group on the way to '%s', found %s", path, kind_name(k));
    buf[i] = '/';
  }
  close_id(gcpl);
  free(buf);
  return r;
}

/* Makes room for a new dataset at `path`: parents created, an old dataset there unlinked. */
static int prepare_new(fl_h5 *f, const char *op, const char *path) {
  if (!f->writable) return efail(f, op, path, "file is open read-only");
  if (is_root(path)) return efail(f, op, path, "cannot write a dataset at the root");
  if (make_parents(f, op, path) < 0) return -1;
  int k = fl_h5_kind(f, path);
  if (k < 0) return -1;
  if (k == FL_H5_GROUP) return efail(f, op, path, "is a group, cannot replace it with a dataset");
  if (k != FL_H5_NONE && H5Ldelete(f->fid, path, H5P_DEFAULT) < 0)
    return hfail(f, op, path, "cannot replace the existing dataset");
  return 0;
}

int fl_h5_remove(fl_h5 *f, const char *path) {
  path = norm(path);
  if (!f->writable) return efail(f, "remove", path, "file is open read-only");
  if (is_root(path)) return efail(f, "remove", path, "cannot remove the root group");
  if (!path_exists(f->fid, path)) return efail(f, "remove", path, "no such object");
  if (H5Ldelete(f->fid, path, H5P_DEFAULT) < 0) return hfail(f, "remove", path, "cannot unlink");
  return 0;
}

int fl_h5_create_group(fl_h5 *f, const char *path) {
  path = norm(path);
  if (!f->writable) return efail(f, "create_group", path, "file is open read-only");
  if (is_root(path)) return 0;
  if (make_parents(f, "create_group", path) < 0) return -1;
  int k = fl_h5_kind(f, path);
  if (k < 0) return -1;
  if (k == FL_H5_GROUP) return 0;
  if (k != FL_H5_NONE) return efail(f, "create_group", path, "expected a group, found %s", kind_name(k));
  hid_t gcpl = make_gcpl(H5P_GROUP_CREATE);
  hid_t g = H5Gcreate2(f->fid, path, H5P_DEFAULT, gcpl, H5P_DEFAULT);
  close_id(gcpl);
  if (g < 0) return hfail(f, "create_group", path, "cannot create the group");
  H5Gclose(g);
  return 0;
}

void fl_h5_free_strings(char **s, int64_t n) {
  if (!s) return;
  for (int64_t i = 0; i < n; i++) free(s[i]);
  free(s);
}

/* A growing list of strings. */
typedef struct { char **v; int64_t n, cap; int oom; } strlist;

static void strlist_push(strlist *l, const char *s, size_t len) {
  if (l->oom) return;
  if (l->n == l->cap) {
    int64_t cap = l->cap ? 2 * l->cap : 16;
    char **v = realloc(l->v, (size_t)cap * sizeof *v);
    if (!v) { l->oom = 1; return; }
    l->v = v;
    l->cap = cap;
  }
  char *c = malloc(len + 1);
  if (!c) { l->oom = 1; return; }
  memcpy(c, s, len);
  c[len] = 0;
  l->v[l->n++] = c;
}

/* Hands the strings gathered by an HDF5 iteration (status r) to the caller, or frees them and fails
 * naming op and obj. */
static int strlist_finish(const fl_h5 *f, strlist *l, herr_t r, const char *op, const char *obj, char ***names,
                          int64_t *n) {
  if (r < 0 || l->oom) {
    fl_h5_free_strings(l->v, l->n);
    return l->oom ? fl_fail_oom("h5.%s: out of memory", op) : hfail(f, op, obj, "cannot iterate");
  }
  *names = l->v;
  *n = l->n;
  return 0;
}

static herr_t list_cb(hid_t g, const char *name, const H5L_info_t *info, void *data) {
  (void)g; (void)info;
  strlist_push(data, name, strlen(name));
  return 0;
}

int fl_h5_list(fl_h5 *f, const char *group, char ***names, int64_t *n) {
  group = norm(group);
  *names = NULL;
  *n = 0;
  if (f->sb) return fl_h5sb_strings(f->sb, FL_H5SB_LIST, "list", group, "", names, n);
  int k = fl_h5_kind(f, group);
  if (k < 0) return -1;
  if (k == FL_H5_NONE) return efail(f, "list", group, "no such group");
  if (k != FL_H5_GROUP) return efail(f, "list", group, "expected a group, found %s", kind_name(k));
  hid_t g = H5Gopen2(f->fid, group, H5P_DEFAULT);
  if (g < 0) return hfail(f, "list", group, "cannot open the group");
  unsigned flags = 0;
  hid_t gcpl = H5Gget_create_plist(g);
  if (gcpl >= 0) { H5Pget_link_creation_order(gcpl, &flags); H5Pclose(gcpl); }
  H5_index_t idx = (flags & H5P_CRT_ORDER_INDEXED) ? H5_INDEX_CRT_ORDER : H5_INDEX_NAME;
  strlist l = {0};
  hsize_t pos = 0;
  herr_t r = H5Literate(g, idx, H5_ITER_INC, &pos, list_cb, &l);
  H5Gclose(g);
  return strlist_finish(f, &l, r, "list", group, names, n);
}

/* ---------------------------------------------------------------- element types */

/* The dtype a file type reads as, and the matching memory type (a copy to close, or a native
 * predefined type: close_id on those is harmless as H5Tclose refuses them... so we track it). */
static int map_type(fl_h5 *f, const char *op, const char *path, hid_t ftype, fl_dtype *dt,
                    hid_t *mtype, int *is_string) {
  *mtype = -1;
  if (is_string) *is_string = 0;
  H5T_class_t c = H5Tget_class(ftype);
  size_t size = H5Tget_size(ftype);
  switch (c) {
  case H5T_FLOAT:
    *dt = size <= 4 ? FL_F32 : FL_F64;
    *mtype = H5Tcopy(size <= 4 ? H5T_NATIVE_FLOAT : H5T_NATIVE_DOUBLE);
    break;
  case H5T_INTEGER: {
    int sign = H5Tget_sign(ftype) == H5T_SGN_2;
    if (size == 1 && !sign) { *dt = FL_U8; *mtype = H5Tcopy(H5T_NATIVE_UINT8); }
    else if (size < 4 || (size == 4 && sign)) { *dt = FL_I32; *mtype = H5Tcopy(H5T_NATIVE_INT32); }
    else { *dt = FL_I64; *mtype = H5Tcopy(H5T_NATIVE_INT64); }
    break;
  }
  case H5T_ENUM:
    /* h5py stores numpy bools as a 1-byte enum {FALSE, TRUE}; read its raw values. */
    if (size != 1) return efail(f, op, path, "unsupported element type: enum of %zu bytes", size);
    *dt = FL_U8;
    *mtype = H5Tget_native_type(ftype, H5T_DIR_ASCEND);
    break;
  case H5T_STRING:
    if (is_string) { *is_string = 1; *dt = FL_U8; return 0; }
    return efail(f, op, path, "expected numbers, found strings");
  default:
    return efail(f, op, path, "unsupported element type (HDF5 class %d, %zu bytes)", (int)c, size);
  }
  if (*mtype < 0) return hfail(f, op, path, "cannot make a memory type");
  return 0;
}

/* HDF5 has no standard bfloat16 type that Keras or h5py would read back */
#define BF16_REFUSED "bfloat16 tensors are not written (HDF5 has no standard bfloat16 type): convert with :float()"

static hid_t file_type_of(fl_dtype dt) {
  switch (dt) {
  case FL_F32: return H5T_IEEE_F32LE;
  case FL_F64: return H5T_IEEE_F64LE;
  case FL_I32: return H5T_STD_I32LE;
  case FL_I64: return H5T_STD_I64LE;
  default: return H5T_STD_U8LE;
  }
}

static hid_t mem_type_of(fl_dtype dt) {
  switch (dt) {
  case FL_F32: return H5T_NATIVE_FLOAT;
  case FL_F64: return H5T_NATIVE_DOUBLE;
  case FL_I32: return H5T_NATIVE_INT32;
  case FL_I64: return H5T_NATIVE_INT64;
  default: return H5T_NATIVE_UINT8;
  }
}

/* Rank and dims of a dataspace; a null dataspace reads as rank 1 with 0 elements. */
static int space_dims(fl_h5 *f, const char *op, const char *path, hid_t space, int *ndim,
                      hsize_t *dims, hsize_t *maxdims) {
  H5S_class_t sc = H5Sget_simple_extent_type(space);
  if (sc == H5S_NULL) { *ndim = 1; dims[0] = 0; if (maxdims) maxdims[0] = 0; return 0; }
  int nd = H5Sget_simple_extent_ndims(space);
  if (nd < 0) return hfail(f, op, path, "cannot read the dataspace");
  if (nd > FL_MAXDIM)
    return efail(f, op, path, "rank %d is larger than flowerlua's maximum %d", nd, FL_MAXDIM);
  H5Sget_simple_extent_dims(space, dims, maxdims);
  *ndim = nd;
  return 0;
}

int fl_h5_info(fl_h5 *f, const char *op, const char *path, int *ndim, int64_t *shape, fl_dtype *dt,
                int *is_string) {
  path = norm(path);
  if (f->sb) return fl_h5sb_info(f->sb, op, path, ndim, shape, dt, is_string);
  hid_t d = open_dataset(f, op, path), type = -1, space = -1, mt = -1;
  if (d < 0) return -1;
  int r = -1;
  hsize_t dims[H5S_MAX_RANK];
  type = H5Dget_type(d);
  space = H5Dget_space(d);
  if (type < 0 || space < 0) { hfail(f, op, path, "cannot read the type/dataspace"); goto done; }
  if (map_type(f, op, path, type, dt, &mt, is_string) < 0) goto done;
  if (space_dims(f, op, path, space, ndim, dims, NULL) < 0) goto done;
  for (int i = 0; i < *ndim; i++) shape[i] = (int64_t)dims[i];
  r = 0;
done:
  close_id(mt); close_id(type); close_id(space); close_id(d);
  return r;
}

/* ---------------------------------------------------------------- reading datasets */

/* The dtype and shape that reading rows [start, start+count) (everything when count < 0) gives,
 * after the range checks. */
int fl_h5_rows_shape(fl_h5 *f, const char *op, const char *path, int64_t start, int64_t count,
                     fl_dtype *dt, int *ndim, int64_t *shape) {
  path = norm(path);
  if (f->sb) return fl_h5sb_rows_shape(f->sb, op, path, start, count, dt, ndim, shape);
  if (fl_h5_info(f, op, path, ndim, shape, dt, NULL) < 0) return -1;
  if (count < 0) return 0;
  if (*ndim == 0) return efail(f, op, path, "cannot take rows of a scalar dataset");
  if (start < 0 || start + count > shape[0])
    return efail(f, op, path, "rows %lld..%lld out of range: the dataset has %lld rows",
                 (long long)start + 1, (long long)(start + count), (long long)shape[0]);
  shape[0] = count;
  return 0;
}

/* Reads rows [start, start+count) (everything when count < 0), converted to the dtype
 * fl_h5_rows_shape gives, into buf of exactly nbytes. */
int fl_h5_read_raw(fl_h5 *f, const char *op, const char *path, int64_t start, int64_t count, void *buf,
                   size_t nbytes) {
  path = norm(path);
  hid_t d = open_dataset(f, op, path), type = -1, space = -1, mt = -1, mspace = -1;
  if (d < 0) return -1;
  int r = -1, ndim;
  fl_dtype dt;
  hsize_t dims[H5S_MAX_RANK], off[H5S_MAX_RANK] = {0};
  type = H5Dget_type(d);
  space = H5Dget_space(d);
  if (type < 0 || space < 0) { hfail(f, op, path, "cannot read the type/dataspace"); goto done; }
  if (map_type(f, op, path, type, &dt, &mt, NULL) < 0) goto done;
  if (space_dims(f, op, path, space, &ndim, dims, NULL) < 0) goto done;
  if (count >= 0) {
    if (ndim == 0 || start < 0 || (hsize_t)(start + count) > dims[0]) {
      efail(f, op, path, "rows %lld..%lld out of range", (long long)start + 1, (long long)(start + count));
      goto done;
    }
    off[0] = (hsize_t)start;
    dims[0] = (hsize_t)count;
  }
  size_t want = fl_dtype_size(dt);
  for (int i = 0; i < ndim; i++) want *= (size_t)dims[i];
  if (want != nbytes) { efail(f, op, path, "expected %zu bytes of data, the selection holds %zu", nbytes, want); goto done; }
  if (nbytes == 0 || H5Sget_simple_extent_type(space) == H5S_NULL) { r = 0; goto done; }
  herr_t w;
  if (count >= 0) {
    mspace = H5Screate_simple(ndim, dims, NULL);
    if (mspace < 0 || H5Sselect_hyperslab(space, H5S_SELECT_SET, off, NULL, dims, NULL) < 0) {
      hfail(f, op, path, "cannot select rows");
      goto done;
    }
    w = H5Dread(d, mt, mspace, space, H5P_DEFAULT, buf);
  } else {
    w = H5Dread(d, mt, H5S_ALL, H5S_ALL, H5P_DEFAULT, buf);
  }
  if (w < 0) { hfail(f, op, path, "reading %s data failed (truncated or corrupt file?)", fl_dtype_name(dt)); goto done; }
  r = 0;
done:
  close_id(mspace); close_id(mt); close_id(type); close_id(space); close_id(d);
  return r;
}

/* Reads rows [start, start+count) (or everything when count < 0) into a new CPU tensor. */
static int read_rows(fl_h5 *f, const char *op, const char *path, int64_t start, int64_t count,
                     fl_tensor *out) {
  path = norm(path);
  int ndim;
  fl_dtype dt;
  int64_t shape[FL_MAXDIM];
  if (fl_h5_rows_shape(f, op, path, start, count, &dt, &ndim, shape) < 0) return -1;
  if (fl_tensor_init(out, &fl_cpu_backend, 0, dt, ndim, shape) < 0) return fl_fail_prefix("h5.read");
  size_t nbytes = (size_t)fl_tensor_numel(out) * fl_dtype_size(dt);
  int r = f->sb ? fl_h5sb_read_rows(f->sb, op, path, start, count, fl_tensor_data(out), nbytes)
                : fl_h5_read_raw(f, op, path, start, count, fl_tensor_data(out), nbytes);
  if (r < 0) fl_tensor_free(out);
  return r;
}

int fl_h5_read(fl_h5 *f, const char *path, fl_tensor *out) {
  return read_rows(f, "read", path, 0, -1, out);
}

int fl_h5_read_slice(fl_h5 *f, const char *path, int64_t start, int64_t count, fl_tensor *out) {
  if (count < 0) return efail(f, "read_slice", norm(path), "row count must be >= 0, got %lld", (long long)count);
  return read_rows(f, "read_slice", path, start, count, out);
}

/* ---------------------------------------------------------------- prefetch */

/* The byte ranges holding rows [start, start+count) of d, passed to posix_fadvise(WILLNEED): the
 * contiguous range, or each allocated chunk that the rows touch (every column chunk). */
static int advise_rows(int fd, hid_t d, hid_t space, int64_t start, int64_t count) {
  int ndim = H5Sget_simple_extent_ndims(space);
  hsize_t dims[H5S_MAX_RANK];
  if (ndim < 1 || H5Sget_simple_extent_dims(space, dims, NULL) < 0) return -1;
  hid_t type = H5Dget_type(d), dcpl = H5Dget_create_plist(d);
  size_t row = type >= 0 ? H5Tget_size(type) : 0;
  for (int i = 1; i < ndim; i++) row *= (size_t)dims[i];
  int r = -1;
  if (dcpl < 0 || row == 0) goto done;
  if (H5Pget_layout(dcpl) == H5D_CONTIGUOUS) {
    haddr_t off = H5Dget_offset(d);
    if (off != HADDR_UNDEF)
      posix_fadvise(fd, (off_t)(off + (haddr_t)start * row), (off_t)((size_t)count * row), POSIX_FADV_WILLNEED);
    r = 0;
  } else if (H5Pget_layout(dcpl) == H5D_CHUNKED) {
    hsize_t chunk[H5S_MAX_RANK], coord[H5S_MAX_RANK] = {0};
    if (H5Pget_chunk(dcpl, ndim, chunk) != ndim) goto done;
    /* the chunks' first rows from the one holding `start`, and every chunk across the columns */
    for (hsize_t r0 = (hsize_t)start / chunk[0] * chunk[0]; r0 < (hsize_t)(start + count); r0 += chunk[0]) {
      coord[0] = r0;
      for (int i = 1; i < ndim; i++) coord[i] = 0;
      for (;;) {
        haddr_t addr;
        hsize_t size;
        if (H5Dget_chunk_info_by_coord(d, coord, NULL, &addr, &size) >= 0 && addr != HADDR_UNDEF)
          posix_fadvise(fd, (off_t)addr, (off_t)size, POSIX_FADV_WILLNEED);
        int i = ndim - 1;   /* the next chunk across the other dimensions, last fastest */
        while (i >= 1 && (coord[i] += chunk[i]) >= dims[i]) coord[i--] = 0;
        if (i < 1) break;
      }
    }
    r = 0;
  }
done:
  close_id(dcpl);
  close_id(type);
  H5Eclear2(H5E_DEFAULT);
  return r;
}

int fl_h5_prefetch(fl_h5 *f, const char *path, int64_t start, int64_t count) {
  if (f->sb || f->fid < 0 || count <= 0) return 0;   /* untrusted files: the reader process reads */
  path = norm(path);
  hid_t d = open_dataset(f, "prefetch", path), fapl = -1, space = -1;
  if (d < 0) return -1;
  int r = -1;
  void *handle = NULL;
  space = H5Dget_space(d);
  fapl = H5Fget_access_plist(f->fid);
  /* the descriptor is the sec2 driver's (the default here); another driver: nothing to advise */
  if (space < 0 || fapl < 0 || H5Pget_driver(fapl) != H5FD_SEC2) { r = 0; goto done; }
  if (H5Fget_vfd_handle(f->fid, fapl, &handle) < 0 || !handle) { r = 0; goto done; }
  advise_rows(*(int *)handle, d, space, start, count);
  r = 0;
done:
  H5Eclear2(H5E_DEFAULT);
  close_id(fapl); close_id(space); close_id(d);
  return r;
}

/* ---------------------------------------------------------------- writing datasets */

/* A contiguous CPU tensor with t's contents: a view of t when it already is one. */
static int host_contiguous(fl_tensor *out, const fl_tensor *t) {
  if (!t->storage) return fl_fail("empty (freed) tensor");
  if (t->storage->backend == &fl_cpu_backend && fl_tensor_is_contiguous(t)) {
    fl_tensor_init_view(out, t);
    return 0;
  }
  if (fl_tensor_init(out, &fl_cpu_backend, 0, t->dtype, t->ndim, t->shape) < 0) return -1;
  if (fl_copy_into(out, t) < 0) { fl_tensor_free(out); return -1; }
  return 0;
}

static int64_t auto_chunk_rows(const fl_tensor *t) {
  int64_t row = (int64_t)fl_dtype_size(t->dtype);
  for (int i = 1; i < t->ndim; i++) row *= t->shape[i] > 0 ? t->shape[i] : 1;
  int64_t rows = CHUNK_BYTES / (row > 0 ? row : 1);
  return rows < 1 ? 1 : rows;
}

int fl_h5_write(fl_h5 *f, const char *path, const fl_tensor *t, const fl_h5_write_opts *opts) {
  path = norm(path);
  fl_tensor h = {0};
  hid_t space = -1, dcpl = -1, d = -1;
  int r = -1;
  if (t->storage && t->dtype == FL_BF16) return efail(f, "write", path, BF16_REFUSED);
  if (host_contiguous(&h, t) < 0) return fl_fail_prefix("h5.write");
  int64_t n = fl_tensor_numel(&h);
  int nd = h.ndim;
  hsize_t dims[FL_MAXDIM], chunk[FL_MAXDIM];
  for (int i = 0; i < nd; i++) dims[i] = (hsize_t)h.shape[i];
  int chunked = 0, level = opts ? opts->compress : 0;
  if (level < 0 || level > 9) { efail(f, "write", path, "compress must be 0..9, got %d", level); goto done; }
  if (opts && opts->nchunk) {
    if (opts->nchunk != nd) {
      efail(f, "write", path, "chunk has %d dims, the tensor has %d", opts->nchunk, nd);
      goto done;
    }
    for (int i = 0; i < nd; i++) {
      if (opts->chunk[i] < 1 || opts->chunk[i] > h.shape[i]) {
        efail(f, "write", path, "chunk dim %d is %lld, expected 1..%lld", i + 1,
              (long long)opts->chunk[i], (long long)h.shape[i]);
        goto done;
      }
      chunk[i] = (hsize_t)opts->chunk[i];
    }
    chunked = 1;
  } else if (level > 0 && nd > 0 && n > 0) {
    for (int i = 0; i < nd; i++) chunk[i] = dims[i];
    int64_t rows = auto_chunk_rows(&h);
    if ((hsize_t)rows < chunk[0]) chunk[0] = (hsize_t)rows;
    chunked = 1;
  }
  if (level > 0 && !chunked) level = 0;   /* scalars and empty tensors: nothing to compress */
  if (level > 0 && H5Zfilter_avail(H5Z_FILTER_DEFLATE) <= 0) {
    efail(f, "write", path, "gzip compression is not available in this libhdf5");
    goto done;
  }
  if (prepare_new(f, "write", path) < 0) goto done;
  space = nd == 0 ? H5Screate(H5S_SCALAR) : H5Screate_simple(nd, dims, NULL);
  dcpl = H5Pcreate(H5P_DATASET_CREATE);
  if (space < 0 || dcpl < 0) { hfail(f, "write", path, "cannot make a dataspace"); goto done; }
  if (chunked && H5Pset_chunk(dcpl, nd, chunk) < 0) { hfail(f, "write", path, "bad chunk shape"); goto done; }
  if (level > 0 && H5Pset_deflate(dcpl, (unsigned)level) < 0) { hfail(f, "write", path, "cannot set gzip"); goto done; }
  d = H5Dcreate2(f->fid, path, file_type_of(h.dtype), space, H5P_DEFAULT, dcpl, H5P_DEFAULT);
  if (d < 0) { hfail(f, "write", path, "cannot create the dataset"); goto done; }
  if (n > 0 && H5Dwrite(d, mem_type_of(h.dtype), H5S_ALL, H5S_ALL, H5P_DEFAULT, fl_tensor_data(&h)) < 0) {
    hfail(f, "write", path, "writing failed");
    goto done;
  }
  killpoint("h5.write.done");
  r = 0;
done:
  close_id(d); close_id(dcpl); close_id(space);
  fl_tensor_free(&h);
  return r;
}

static int create_extendible(fl_h5 *f, const char *path, const fl_tensor *t) {
  int nd = t->ndim;
  hsize_t dims[FL_MAXDIM], maxd[FL_MAXDIM], chunk[FL_MAXDIM];
  for (int i = 0; i < nd; i++) dims[i] = maxd[i] = chunk[i] = (hsize_t)t->shape[i];
  dims[0] = 0;
  maxd[0] = H5S_UNLIMITED;
  chunk[0] = (hsize_t)auto_chunk_rows(t);
  if (prepare_new(f, "append_rows", path) < 0) return -1;
  hid_t space = H5Screate_simple(nd, dims, maxd), dcpl = H5Pcreate(H5P_DATASET_CREATE), d = -1;
  int r = -1;
  if (space < 0 || dcpl < 0 || H5Pset_chunk(dcpl, nd, chunk) < 0) {
    hfail(f, "append_rows", path, "cannot set up an extendible dataset");
    goto done;
  }
  d = H5Dcreate2(f->fid, path, file_type_of(t->dtype), space, H5P_DEFAULT, dcpl, H5P_DEFAULT);
  if (d < 0) { hfail(f, "append_rows", path, "cannot create the dataset"); goto done; }
  r = 0;
done:
  close_id(d); close_id(dcpl); close_id(space);
  return r;
}

int fl_h5_append_rows(fl_h5 *f, const char *path, const fl_tensor *t, int64_t *total) {
  path = norm(path);
  const char *op = "append_rows";
  if (!t->storage) return efail(f, op, path, "empty (freed) tensor");
  if (t->ndim < 1) return efail(f, op, path, "expected a tensor of rank >= 1, got a scalar");
  if (t->dtype == FL_BF16) return efail(f, op, path, BF16_REFUSED);
  for (int i = 1; i < t->ndim; i++)
    if (t->shape[i] < 1) return efail(f, op, path, "row dims must be >= 1 (tensor dim %d is %lld)", i + 1, (long long)t->shape[i]);
  if (!f->writable) return efail(f, op, path, "file is open read-only");
  int k = fl_h5_kind(f, path);
  if (k < 0) return -1;
  if (k == FL_H5_NONE && create_extendible(f, path, t) < 0) return -1;
  fl_tensor h = {0};
  hid_t d = open_dataset(f, op, path), type = -1, mt = -1, space = -1, mspace = -1;
  if (d < 0) return -1;
  int r = -1, nd;
  fl_dtype dt;
  hsize_t dims[H5S_MAX_RANK], maxd[H5S_MAX_RANK];
  type = H5Dget_type(d);
  space = H5Dget_space(d);
  if (type < 0 || space < 0) { hfail(f, op, path, "cannot read the type/dataspace"); goto done; }
  if (map_type(f, op, path, type, &dt, &mt, NULL) < 0) goto done;
  if (space_dims(f, op, path, space, &nd, dims, maxd) < 0) goto done;
  if (dt != t->dtype) {
    efail(f, op, path, "dataset holds %s, the rows are %s", fl_dtype_name(dt), fl_dtype_name(t->dtype));
    goto done;
  }
  if (nd != t->ndim) { efail(f, op, path, "dataset has rank %d, the rows rank %d", nd, t->ndim); goto done; }
  for (int i = 1; i < nd; i++)
    if ((int64_t)dims[i] != t->shape[i]) {
      char a[96], b[96];
      int64_t ds[FL_MAXDIM];
      for (int j = 0; j < nd; j++) ds[j] = (int64_t)dims[j];
      fl_shape_str(a, sizeof a, nd, ds);
      fl_shape_str(b, sizeof b, t->ndim, t->shape);
      efail(f, op, path, "dataset is %s, rows %s: trailing dims differ", a, b);
      goto done;
    }
  if (maxd[0] != H5S_UNLIMITED) {
    efail(f, op, path, "dataset is not extendible (not created by append_rows)");
    goto done;
  }
  hsize_t old = dims[0], cnt[H5S_MAX_RANK], off[H5S_MAX_RANK] = {0};
  if (t->shape[0] > 0) {
    if (host_contiguous(&h, t) < 0) { fl_fail_prefix("h5.append_rows"); goto done; }
    dims[0] = old + (hsize_t)t->shape[0];
    if (H5Dset_extent(d, dims) < 0) { hfail(f, op, path, "cannot extend the dataset"); goto done; }
    killpoint("h5.append.extended");
    close_id(space);
    space = H5Dget_space(d);
    for (int i = 0; i < nd; i++) cnt[i] = (hsize_t)t->shape[i];
    off[0] = old;
    mspace = H5Screate_simple(nd, cnt, NULL);
    if (space < 0 || mspace < 0 || H5Sselect_hyperslab(space, H5S_SELECT_SET, off, NULL, cnt, NULL) < 0) {
      hfail(f, op, path, "cannot select the new rows");
      goto done;
    }
    if (H5Dwrite(d, mt, mspace, space, H5P_DEFAULT, fl_tensor_data(&h)) < 0) {
      hfail(f, op, path, "writing rows failed");
      goto done;
    }
    killpoint("h5.append.written");
  }
  if (total) *total = (int64_t)dims[0];
  r = 0;
done:
  fl_tensor_free(&h);
  close_id(mspace); close_id(mt); close_id(type); close_id(space); close_id(d);
  return r;
}

int fl_h5_truncate_rows(fl_h5 *f, const char *path, int64_t rows) {
  path = norm(path);
  const char *op = "truncate_rows";
  if (!f->writable) return efail(f, op, path, "file is open read-only");
  hid_t d = open_dataset(f, op, path), space = -1;
  if (d < 0) return -1;
  int r = -1, nd;
  hsize_t dims[H5S_MAX_RANK], maxd[H5S_MAX_RANK];
  space = H5Dget_space(d);
  if (space < 0) { hfail(f, op, path, "cannot read the dataspace"); goto done; }
  if (space_dims(f, op, path, space, &nd, dims, maxd) < 0) goto done;
  if (nd < 1 || maxd[0] != H5S_UNLIMITED) { efail(f, op, path, "dataset is not extendible (not created by append_rows)"); goto done; }
  if (rows < 0 || (hsize_t)rows > dims[0]) {
    efail(f, op, path, "cannot keep %lld rows of %lld", (long long)rows, (long long)dims[0]);
    goto done;
  }
  dims[0] = (hsize_t)rows;
  if (H5Dset_extent(d, dims) < 0) { hfail(f, op, path, "cannot shrink the dataset"); goto done; }
  r = 0;
done:
  close_id(space); close_id(d);
  return r;
}

/* ---------------------------------------------------------------- strings */

/* Reads the strings of a dataset or attribute (`obj`, with `type` and `space` already open). */
static int read_strings_obj(fl_h5 *f, const char *op, const char *what, hid_t obj, int is_attr,
                            hid_t type, hid_t space, char ***out, int64_t *n) {
  *out = NULL;
  *n = 0;
  hssize_t np = H5Sget_simple_extent_npoints(space);
  if (H5Sget_simple_extent_type(space) == H5S_NULL) np = 0;
  if (np < 0) return hfail(f, op, what, "cannot read the dataspace");
  strlist l = {0};
  int r = -1;
  hid_t mt = H5Tcopy(H5T_C_S1);
  if (mt < 0) return hfail(f, op, what, "cannot make a string type");
  H5Tset_cset(mt, H5Tget_cset(type));
  if (np == 0) { r = 0; goto done; }
  if (H5Tis_variable_str(type) > 0) {
    char **buf = calloc((size_t)np, sizeof *buf);
    if (!buf) { fl_fail_oom("h5.%s: out of memory", op); goto done; }
    H5Tset_size(mt, H5T_VARIABLE);
    herr_t e = is_attr ? H5Aread(obj, mt, buf) : H5Dread(obj, mt, H5S_ALL, H5S_ALL, H5P_DEFAULT, buf);
    if (e < 0) { free(buf); hfail(f, op, what, "reading strings failed"); goto done; }
    for (hssize_t i = 0; i < np; i++) strlist_push(&l, buf[i] ? buf[i] : "", buf[i] ? strlen(buf[i]) : 0);
    H5Dvlen_reclaim(mt, space, H5P_DEFAULT, buf);
    free(buf);
  } else {
    size_t sz = H5Tget_size(type);
    H5T_str_t pad = H5Tget_strpad(type);
    char *buf = malloc((size_t)np * sz + 1);
    if (!buf || sz == 0) { free(buf); fl_fail_oom("h5.%s: out of memory", op); goto done; }
    H5Tset_size(mt, sz);
    H5Tset_strpad(mt, H5T_STR_NULLPAD);
    herr_t e = is_attr ? H5Aread(obj, mt, buf) : H5Dread(obj, mt, H5S_ALL, H5S_ALL, H5P_DEFAULT, buf);
    if (e < 0) { free(buf); hfail(f, op, what, "reading strings failed"); goto done; }
    for (hssize_t i = 0; i < np; i++) {
      const char *s = buf + (size_t)i * sz;
      size_t len = strnlen(s, sz);                  /* NUL-padded: trim at the first NUL */
      if (pad == H5T_STR_SPACEPAD) while (len > 0 && s[len - 1] == ' ') len--;
      strlist_push(&l, s, len);
    }
    free(buf);
  }
  if (l.oom) { fl_fail_oom("h5.%s: out of memory", op); goto done; }
  r = 0;
done:
  close_id(mt);
  if (r < 0) fl_h5_free_strings(l.v, l.n);
  else { *out = l.v; *n = l.n; }
  return r;
}

int fl_h5_read_strings(fl_h5 *f, const char *path, char ***out, int64_t *n) {
  path = norm(path);
  *out = NULL;
  *n = 0;
  if (f->sb) return fl_h5sb_strings(f->sb, FL_H5SB_STRINGS, "read", path, "", out, n);
  hid_t d = open_dataset(f, "read", path), type = -1, space = -1;
  if (d < 0) return -1;
  int r = -1;
  type = H5Dget_type(d);
  space = H5Dget_space(d);
  if (type < 0 || space < 0) { hfail(f, "read", path, "cannot read the type/dataspace"); goto done; }
  if (H5Tget_class(type) != H5T_STRING) { efail(f, "read", path, "expected strings, found numbers"); goto done; }
  r = read_strings_obj(f, "read", path, d, 0, type, space, out, n);
done:
  close_id(type); close_id(space); close_id(d);
  return r;
}

static hid_t vlen_utf8(void) {
  hid_t t = H5Tcopy(H5T_C_S1);
  if (t >= 0) { H5Tset_size(t, H5T_VARIABLE); H5Tset_cset(t, H5T_CSET_UTF8); }
  return t;
}

int fl_h5_write_strings(fl_h5 *f, const char *path, const char *const *s, int64_t n) {
  path = norm(path);
  if (prepare_new(f, "write", path) < 0) return -1;
  hsize_t dims[1] = {(hsize_t)n};
  hid_t t = vlen_utf8(), space = H5Screate_simple(1, dims, NULL), d = -1;
  int r = -1;
  if (t < 0 || space < 0) { hfail(f, "write", path, "cannot make a string type"); goto done; }
  d = H5Dcreate2(f->fid, path, t, space, H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT);
  if (d < 0) { hfail(f, "write", path, "cannot create the dataset"); goto done; }
  if (n > 0 && H5Dwrite(d, t, H5S_ALL, H5S_ALL, H5P_DEFAULT, s) < 0) {
    hfail(f, "write", path, "writing strings failed");
    goto done;
  }
  killpoint("h5.write.done");
  r = 0;
done:
  close_id(d); close_id(space); close_id(t);
  return r;
}

/* ---------------------------------------------------------------- attributes */

void fl_h5_attr_free(fl_h5_attr *a) {
  if (!a) return;
  fl_h5_free_strings(a->s, a->n);
  free(a->i);
  free(a->d);
  a->s = NULL; a->i = NULL; a->d = NULL;
  a->n = 0;
}

static int need_object(fl_h5 *f, const char *op, const char *path) {
  int k = fl_h5_kind(f, path);
  if (k < 0) return -1;
  if (k == FL_H5_NONE) return efail(f, op, path, "no such object");
  return 0;
}

/* "path@name" for messages */
static void attr_label(char *buf, size_t n, const char *path, const char *name) {
  snprintf(buf, n, "%s@%s", path, name);
}

int fl_h5_attr_get(fl_h5 *f, const char *path, const char *name, fl_h5_attr *a) {
  path = norm(path);
  memset(a, 0, sizeof *a);
  if (f->sb) return fl_h5sb_attr_get(f->sb, path, name, a);
  if (need_object(f, "attr", path) < 0) return -1;
  char lab[320];
  attr_label(lab, sizeof lab, path, name);
  htri_t ex = H5Aexists_by_name(f->fid, path, name, H5P_DEFAULT);
  if (ex < 0) return hfail(f, "attr", lab, "cannot look up the attribute");
  if (ex == 0) return 0;
  hid_t at = H5Aopen_by_name(f->fid, path, name, H5P_DEFAULT, H5P_DEFAULT), type = -1, space = -1, mt = -1;
  if (at < 0) return hfail(f, "attr", lab, "cannot open the attribute");
  int r = -1;
  type = H5Aget_type(at);
  space = H5Aget_space(at);
  if (type < 0 || space < 0) { hfail(f, "attr", lab, "cannot read the type/dataspace"); goto done; }
  H5S_class_t sc = H5Sget_simple_extent_type(space);
  hssize_t np = sc == H5S_NULL ? 0 : H5Sget_simple_extent_npoints(space);
  if (np < 0) { hfail(f, "attr", lab, "cannot read the dataspace"); goto done; }
  a->scalar = sc == H5S_SCALAR;
  H5T_class_t c = H5Tget_class(type);
  if (sc == H5S_NULL) {
    a->kind = FL_H5A_FLOAT;       /* h5py.Empty: read as an empty list */
  } else if (c == H5T_STRING) {
    a->kind = FL_H5A_STRING;
    if (read_strings_obj(f, "attr", lab, at, 1, type, space, &a->s, &a->n) < 0) goto done;
  } else if (c == H5T_INTEGER || c == H5T_ENUM) {
    a->kind = FL_H5A_INT;
    a->n = np;
    a->i = calloc((size_t)(np ? np : 1), sizeof *a->i);
    if (!a->i) { fl_fail_oom("h5.attr: out of memory"); goto done; }
    if (np > 0) {
      if (c == H5T_ENUM) {        /* bools: 1-byte enums; read raw bytes, then widen */
        if (H5Tget_size(type) != 1) { efail(f, "attr", lab, "unsupported enum attribute"); goto done; }
        unsigned char *b = malloc((size_t)np);
        mt = H5Tget_native_type(type, H5T_DIR_ASCEND);
        if (!b || mt < 0 || H5Aread(at, mt, b) < 0) { free(b); hfail(f, "attr", lab, "reading failed"); goto done; }
        for (hssize_t i = 0; i < np; i++) a->i[i] = b[i];
        free(b);
      } else if (H5Aread(at, H5T_NATIVE_INT64, a->i) < 0) {
        hfail(f, "attr", lab, "reading failed");
        goto done;
      }
    }
  } else if (c == H5T_FLOAT) {
    a->kind = FL_H5A_FLOAT;
    a->n = np;
    a->d = calloc((size_t)(np ? np : 1), sizeof *a->d);
    if (!a->d) { fl_fail_oom("h5.attr: out of memory"); goto done; }
    if (np > 0 && H5Aread(at, H5T_NATIVE_DOUBLE, a->d) < 0) { hfail(f, "attr", lab, "reading failed"); goto done; }
  } else {
    efail(f, "attr", lab, "unsupported attribute type (HDF5 class %d)", (int)c);
    goto done;
  }
  r = 1;
done:
  close_id(mt); close_id(type); close_id(space); close_id(at);
  if (r < 0) fl_h5_attr_free(a);
  return r;
}

int fl_h5_attr_set(fl_h5 *f, const char *path, const char *name, const fl_h5_attr *a) {
  path = norm(path);
  char lab[320];
  attr_label(lab, sizeof lab, path, name);
  if (!f->writable) return efail(f, "set_attr", lab, "file is open read-only");
  if (need_object(f, "set_attr", path) < 0) return -1;
  htri_t ex = H5Aexists_by_name(f->fid, path, name, H5P_DEFAULT);
  if (ex > 0 && H5Adelete_by_name(f->fid, path, name, H5P_DEFAULT) < 0)
    return hfail(f, "set_attr", lab, "cannot replace the attribute");
  hid_t type = -1, space = -1, at = -1;
  int own_type = 0, r = -1;
  const void *buf = NULL;
  char *fixed = NULL;
  hsize_t dims[1] = {(hsize_t)a->n};
  if (!a->scalar && a->n == 0) {
    type = H5T_IEEE_F64LE;         /* Keras 1's `[]`: a 0-length float64 array */
  } else if (a->kind == FL_H5A_STRING && a->scalar) {
    type = vlen_utf8();
    own_type = 1;
    buf = a->s;
  } else if (a->kind == FL_H5A_STRING) {
    size_t w = 1;
    int utf8 = 0;
    for (int64_t i = 0; i < a->n; i++) {
      size_t len = strlen(a->s[i]);
      if (len > w) w = len;
      for (size_t j = 0; j < len; j++) utf8 |= (unsigned char)a->s[i][j] >= 0x80;
    }
    fixed = calloc((size_t)a->n, w);
    if (!fixed) return fl_fail_oom("h5.set_attr: out of memory");
    for (int64_t i = 0; i < a->n; i++) memcpy(fixed + (size_t)i * w, a->s[i], strlen(a->s[i]));
    type = H5Tcopy(H5T_C_S1);
    own_type = 1;
    if (type >= 0) {
      H5Tset_size(type, w);
      H5Tset_strpad(type, H5T_STR_NULLPAD);
      H5Tset_cset(type, utf8 ? H5T_CSET_UTF8 : H5T_CSET_ASCII);
    }
    buf = fixed;
  } else if (a->kind == FL_H5A_INT) {
    type = H5T_STD_I64LE;
    buf = a->i;
  } else {
    type = H5T_IEEE_F64LE;
    buf = a->d;
  }
  space = a->scalar ? H5Screate(H5S_SCALAR) : H5Screate_simple(1, dims, NULL);
  if (type < 0 || space < 0) { hfail(f, "set_attr", lab, "cannot make the type/dataspace"); goto done; }
  at = H5Acreate_by_name(f->fid, path, name, type, space, H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT);
  if (at < 0) { hfail(f, "set_attr", lab, "cannot create the attribute (more than 64 KiB?)"); goto done; }
  if (buf && a->n > 0) {
    hid_t mt = type == H5T_STD_I64LE ? H5T_NATIVE_INT64 : type == H5T_IEEE_F64LE ? H5T_NATIVE_DOUBLE : type;
    if (H5Awrite(at, mt, buf) < 0) { hfail(f, "set_attr", lab, "writing failed"); goto done; }
  }
  killpoint("h5.attr.set");
  r = 0;
done:
  close_id(at); close_id(space);
  if (own_type) close_id(type);
  free(fixed);
  return r;
}

static herr_t aname_cb(hid_t loc, const char *name, const H5A_info_t *info, void *data) {
  (void)loc; (void)info;
  strlist_push(data, name, strlen(name));
  return 0;
}

int fl_h5_attr_names(fl_h5 *f, const char *path, char ***names, int64_t *n) {
  path = norm(path);
  *names = NULL;
  *n = 0;
  if (f->sb) return fl_h5sb_strings(f->sb, FL_H5SB_ATTRS, "attrs", path, "", names, n);
  if (need_object(f, "attrs", path) < 0) return -1;
  hid_t o = H5Oopen(f->fid, path, H5P_DEFAULT);
  if (o < 0) return hfail(f, "attrs", path, "cannot open the object");
  strlist l = {0};
  hsize_t pos = 0;
  herr_t r = H5Aiterate2(o, H5_INDEX_NAME, H5_ITER_INC, &pos, aname_cb, &l);
  H5Oclose(o);
  return strlist_finish(f, &l, r, "attrs", path, names, n);
}
