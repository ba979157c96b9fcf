/* Walks every object of an HDF5 file through the fl_h5 read API: list, kind, attribute names and
 * values, dataset info and contents. It goes on after a failed call, as a user's script in a
 * pcall would: that order reached libhdf5's crashes in issue 14. Shared by the fuzz harness and
 * the crash reproducer. */
#ifndef FLOWER_H5_WALK_H
#define FLOWER_H5_WALK_H
#include <stdio.h>
#include <string.h>
#include "io/h5.h"

static void h5_walk_object(fl_h5 *f, const char *path, int depth, int *budget) {
  if (depth > 8 || --*budget < 0) return;
  char **names = NULL;
  int64_t n = 0;
  if (fl_h5_attr_names(f, path, &names, &n) == 0) {
    for (int64_t i = 0; i < n; i++) {
      fl_h5_attr a;
      if (fl_h5_attr_get(f, path, names[i], &a) == 1) fl_h5_attr_free(&a);
    }
    fl_h5_free_strings(names, n);
  }
  int k = fl_h5_kind(f, path);
  if (k == FL_H5_DATASET) {
    int nd, is_string;
    int64_t shape[FL_MAXDIM];
    fl_dtype dt;
    if (fl_h5_info(f, "read", path, &nd, shape, &dt, &is_string) == 0) {
      if (is_string) {
        if (fl_h5_read_strings(f, path, &names, &n) == 0) fl_h5_free_strings(names, n);
      } else {
        int64_t numel = 1;
        for (int i = 0; i < nd; i++) numel *= shape[i];
        fl_tensor t = {0};
        if (numel <= (1 << 22) && fl_h5_read(f, path, &t) == 0) fl_tensor_free(&t);
        if (nd > 0 && shape[0] > 0 && fl_h5_read_slice(f, path, 0, 1, &t) == 0) fl_tensor_free(&t);
      }
    }
  }
  if (fl_h5_list(f, path, &names, &n) == 0) {       /* also after a failure above */
    for (int64_t i = 0; i < n; i++) {
      char child[1024];
      snprintf(child, sizeof child, "%s/%s", strcmp(path, "/") ? path : "", names[i]);
      h5_walk_object(f, child, depth + 1, budget);
    }
    fl_h5_free_strings(names, n);
  }
}

static void h5_walk(fl_h5 *f) {
  int budget = 200;
  h5_walk_object(f, "/", 0, &budget);
  fl_h5_attr a;                               /* what keras.load_* ask first */
  if (fl_h5_attr_get(f, "/", "layer_names", &a) == 1) fl_h5_attr_free(&a);
  if (fl_h5_attr_get(f, "/", "model_config", &a) == 1) fl_h5_attr_free(&a);
}
#endif
