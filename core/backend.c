/* The registry of backends (backend.h): the built-in ones, listed once here, and any a program
 * registers at run time (tests register a fake device backend). */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "backend.h"

#ifdef FLOWER_CUDA
#include "cuda/cuda_backend.h"
#endif

static const fl_backend *backends[FL_MAX_BACKENDS];
static int nbackends;
static pthread_once_t builtin_once = PTHREAD_ONCE_INIT;
static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;

/* The built-in backends, the CPU's first: one line each. */
static void register_builtin(void) {
  backends[nbackends++] = &fl_cpu_backend;
#ifdef FLOWER_CUDA
  backends[nbackends++] = fl_cuda_backend();
#endif
}

int fl_backend_count(void) {
  pthread_once(&builtin_once, register_builtin);
  pthread_mutex_lock(&lock);
  int n = nbackends;
  pthread_mutex_unlock(&lock);
  return n;
}

const fl_backend *fl_backend_at(int i) {
  int n = fl_backend_count();
  return i >= 0 && i < n ? backends[i] : NULL;
}

const fl_backend *fl_backend_find(const char *name) {
  for (int i = 0, n = fl_backend_count(); i < n; i++)
    if (strcmp(backends[i]->name, name) == 0) return backends[i];
  return NULL;
}

int fl_backend_register(const fl_backend *be) {
  if (!be || !be->name) return fl_fail("backend register: a backend needs a table and a name");
  if (fl_backend_find(be->name)) return fl_fail("backend register: a backend named '%s' exists", be->name);
  pthread_mutex_lock(&lock);
  int full = nbackends == FL_MAX_BACKENDS;
  if (!full) backends[nbackends++] = be;
  pthread_mutex_unlock(&lock);
  if (full) return fl_fail("backend register: '%s': the list holds %d backends", be->name, FL_MAX_BACKENDS);
  return 0;
}

int fl_backend_devices(const fl_backend *be) { return be->device_count ? be->device_count() : 1; }

/* "cpu, cuda": the registered names, for messages */
static void names(char *buf, size_t n) {
  buf[0] = '\0';
  for (int i = 0, k = fl_backend_count(); i < k; i++) {
    size_t len = strlen(buf);
    snprintf(buf + len, n - len, "%s%s", i ? ", " : "", backends[i]->name);
  }
}

int fl_device_parse(const char *op, const char *spec, const fl_backend **be, int *device) {
  char name[64];
  const char *colon = strchr(spec, ':');
  size_t len = colon ? (size_t)(colon - spec) : strlen(spec);
  long index = 0;
  if (colon) {
    char *end;
    index = strtol(colon + 1, &end, 10);
    if (end == colon + 1 || *end || index < 0 || index > 1 << 20)
      return fl_fail("%s: device '%s': the index after ':' must be an integer >= 0", op, spec);
  }
  if (len == 0 || len >= sizeof name) return fl_fail("%s: device '%s' is not of the form 'name' or 'name:<n>'", op, spec);
  memcpy(name, spec, len);
  name[len] = '\0';
  const fl_backend *b = fl_backend_find(name);
  if (!b) {
    char have[256];
    names(have, sizeof have);
    return fl_fail("%s: device '%s': no backend '%s' in this build (it has: %s)", op, spec, name, have);
  }
  int count = fl_backend_devices(b);
  if (count == 0)
    return fl_fail("%s: device '%s': %s", op, spec, b->unavailable_reason ? b->unavailable_reason() : "no device");
  if (index >= count)
    return fl_fail("%s: device '%s': there %s %d %s device%s (0..%d)", op, spec, count == 1 ? "is" : "are", count,
                   name, count == 1 ? "" : "s", count - 1);
  *be = b;
  *device = (int)index;
  return 0;
}
