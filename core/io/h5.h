/* flowerlua core: HDF5 files (libhdf5, serial) as tensors, string lists and attributes.
 * Plain C11, no Lua. Used for Keras weight files, checkpoints and feature exports.
 *
 * Paths are HDF5 object paths ("/conv1/conv1/kernel:0", "a/b"; "" and "/" are the root).
 * Every function returns 0 (or a count) on success and -1 on failure with a message in
 * fl_errmsg() of the form "h5.<op>: <file>: '<object>': <what was expected / found>".
 * HDF5's own error-stack printing is switched off; its innermost message is appended instead.
 * A corrupt or truncated file gives -1 and a message, never a crash. Not thread-safe (HDF5 is
 * built serial): call from one thread at a time. */
#ifndef FLOWER_H5_H
#define FLOWER_H5_H

#include <stdint.h>
#include "tensor.h"

typedef struct fl_h5 fl_h5;                 /* an open file */

/* mode: 'r' read-only, 'w' create/truncate, 'a' read-write (created if absent). The file is
 * trusted: libhdf5 parses it in this process (files flowerlua wrote). */
int fl_h5_open(fl_h5 **out, const char *path, char mode);

/* Opens a file flowerlua did not write (weights from the internet), read-only. libhdf5 parses it
 * in a child process (core/io/h5_sandbox.c) under limits; this process receives only checked
 * answers (names, shapes, attributes, raw array bytes). A crash, hang or runaway allocation in
 * libhdf5 ends that child and fails the call with a message; the handle then fails every call.
 * Every read function below works on such a handle; writes fail ("open read-only"). */
typedef struct fl_h5_limits {
  double timeout_s;           /* the longest one answer may take (a hang); <= 0: 60, or
                               * $FLOWER_H5_UNTRUSTED_TIMEOUT */
  int64_t memory;             /* address space the child may add, in bytes; <= 0: 2 GiB */
  double cpu_s;               /* CPU seconds for the child's whole life; <= 0: 3600 */
} fl_h5_limits;
int fl_h5_open_untrusted(fl_h5 **out, const char *path, const fl_h5_limits *lim);   /* lim may be NULL */
int fl_h5_untrusted(const fl_h5 *f);
/* Closes the file and frees `f` (NULL allowed). -1 with a message if HDF5 failed to flush;
 * `f` is freed either way. */
int fl_h5_close(fl_h5 *f);
int fl_h5_flush(fl_h5 *f);
const char *fl_h5_filename(const fl_h5 *f);
int fl_h5_writable(const fl_h5 *f);

/* ---- objects ---- */
typedef enum { FL_H5_NONE = 0, FL_H5_GROUP, FL_H5_DATASET, FL_H5_OTHER } fl_h5_objkind;
/* What `path` is (FL_H5_NONE if it does not exist or a link on the way dangles); -1 on error. */
int fl_h5_kind(fl_h5 *f, const char *path);
/* Children of a group in creation order when the group tracks it (ours do), else name order.
 * *names is a malloc'd array of malloc'd strings; free with fl_h5_free_strings. */
int fl_h5_list(fl_h5 *f, const char *group, char ***names, int64_t *n);
void fl_h5_free_strings(char **s, int64_t n);
int fl_h5_remove(fl_h5 *f, const char *path);   /* unlinks a dataset or group */
/* Creates a group (and the groups on the way); an existing group is left as it is. */
int fl_h5_create_group(fl_h5 *f, const char *path);

/* ---- datasets ---- */
/* Shape and element type of a dataset (`op` names the caller in messages); *dt is the dtype fl_h5_read gives. String datasets give
 * *is_string = 1 (dt unspecified). */
int fl_h5_info(fl_h5 *f, const char *op, const char *path, int *ndim, int64_t *shape, fl_dtype *dt, int *is_string);
/* Reads a numeric dataset into `out` (an empty tensor; made contiguous on the CPU). float16/float32
 * → float32, float64 → float64, uint8/bool → uint8, other integers of <= 32 bits → int32,
 * wider → int64. Rank 0 datasets give 0-dim tensors. */
int fl_h5_read(fl_h5 *f, const char *path, fl_tensor *out);
/* Rows [start, start+count) along dimension 0 (0-based). */
int fl_h5_read_slice(fl_h5 *f, const char *path, int64_t start, int64_t count, fl_tensor *out);
/* Starts reading rows [start, start+count) in the background (posix_fadvise WILLNEED on the bytes
 * that hold them), so a later fl_h5_read_slice finds them in the page cache: streamed passes
 * overlap their reads with compute without a reader thread (libhdf5 here is not thread-safe). A
 * hint: rows past the end are ignored, and files it cannot advise (untrusted ones, other drivers)
 * are left alone. -1 only when the dataset is not there. */
int fl_h5_prefetch(fl_h5 *f, const char *path, int64_t start, int64_t count);

typedef struct fl_h5_write_opts {
  int nchunk;                 /* 0: contiguous (unless compress or extendible); else rank of chunk[] */
  int64_t chunk[FL_MAXDIM];
  int compress;               /* 0: none; 1..9: gzip level (chunked automatically) */
} fl_h5_write_opts;
/* Writes `t` (any backend, any strides) as a dataset, creating intermediate groups; an existing
 * dataset at `path` is replaced. opts may be NULL. */
int fl_h5_write(fl_h5 *f, const char *path, const fl_tensor *t, const fl_h5_write_opts *opts);
/* Appends t's rows (dim 0) to an extendible dataset, creating it (chunked, unlimited dim 0) on
 * first use; trailing dims and dtype must match. *total gets the row count afterwards. */
int fl_h5_append_rows(fl_h5 *f, const char *path, const fl_tensor *t, int64_t *total);

/* Keeps the first `rows` rows of an extendible dataset (rows <= its row count): a resumed append
 * drops rows written after its last commit. */
int fl_h5_truncate_rows(fl_h5 *f, const char *path, int64_t rows);

/* String datasets (1-D; fixed- or variable-length on read, variable-length UTF-8 on write). */
int fl_h5_read_strings(fl_h5 *f, const char *path, char ***out, int64_t *n);
int fl_h5_write_strings(fl_h5 *f, const char *path, const char *const *s, int64_t n);

/* ---- attributes ---- */
typedef enum { FL_H5A_STRING, FL_H5A_INT, FL_H5A_FLOAT } fl_h5_akind;
typedef struct fl_h5_attr {
  fl_h5_akind kind;
  int scalar;                 /* 1: one value (rank-0 dataspace); 0: a list of n values */
  int64_t n;
  char **s;                   /* kind STRING: n NUL-terminated strings (fixed-length: NULs trimmed) */
  int64_t *i;                 /* kind INT */
  double *d;                  /* kind FLOAT */
} fl_h5_attr;
void fl_h5_attr_free(fl_h5_attr *a);
/* 1 and *a filled if the attribute exists, 0 if the object has no such attribute, -1 on error
 * (including a missing object). Empty attributes (H5S_NULL) read as an empty FLOAT list. */
int fl_h5_attr_get(fl_h5 *f, const char *path, const char *name, fl_h5_attr *a);
/* Writes (replacing) an attribute. Scalar strings are stored as variable-length UTF-8 (as h5py
 * does); string lists as fixed-length NUL-padded byte strings (as Keras does); an empty list of
 * any kind as a 0-length float64 array (as Keras 1 does for weightless layers). */
int fl_h5_attr_set(fl_h5 *f, const char *path, const char *name, const fl_h5_attr *a);
int fl_h5_attr_names(fl_h5 *f, const char *path, char ***names, int64_t *n);

/* fsync(2) a closed file by name, so that a following rename publishes complete data. */
int fl_h5_fsync_path(const char *path);

#endif
