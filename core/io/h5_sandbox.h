/* Internal to core/io: the reader process behind fl_h5_open_untrusted (h5_sandbox.c) and the
 * two in-process functions it serves requests with (h5.c). */
#ifndef FLOWER_H5_SANDBOX_H
#define FLOWER_H5_SANDBOX_H

#include "h5.h"

typedef struct fl_h5_sandbox fl_h5_sandbox;

/* Requests that answer with a list of strings. */
enum { FL_H5SB_LIST = 1, FL_H5SB_STRINGS, FL_H5SB_ATTRS };

int fl_h5sb_start(fl_h5_sandbox **out, const char *path, const fl_h5_limits *lim);
void fl_h5sb_stop(fl_h5_sandbox *sb);      /* kills and reaps the reader; NULL allowed */
int fl_h5sb_kind(fl_h5_sandbox *sb, const char *path);
int fl_h5sb_strings(fl_h5_sandbox *sb, int what, const char *op, const char *path, const char *name,
                    char ***out, int64_t *n);
int fl_h5sb_info(fl_h5_sandbox *sb, const char *op, const char *path, int *ndim, int64_t *shape,
                 fl_dtype *dt, int *is_string);
int fl_h5sb_rows_shape(fl_h5_sandbox *sb, const char *op, const char *path, int64_t start, int64_t count,
                       fl_dtype *dt, int *ndim, int64_t *shape);
int fl_h5sb_read_rows(fl_h5_sandbox *sb, const char *op, const char *path, int64_t start, int64_t count,
                      void *buf, size_t nbytes);
int fl_h5sb_attr_get(fl_h5_sandbox *sb, const char *path, const char *name, fl_h5_attr *a);

/* In-process pieces the reader process calls (h5.c). */
int fl_h5_open_reader(fl_h5 **out, const char *path);      /* 'r' without file locking */
int fl_h5_rows_shape(fl_h5 *f, const char *op, const char *path, int64_t start, int64_t count,
                     fl_dtype *dt, int *ndim, int64_t *shape);
int fl_h5_read_raw(fl_h5 *f, const char *op, const char *path, int64_t start, int64_t count, void *buf,
                   size_t nbytes);

#endif
