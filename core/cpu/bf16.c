/* bfloat16 on the CPU: every bfloat16 operand of a kernel gets a float32 stand-in, the float32
 * kernel runs, and each output is rounded back once. The CPU keeps bfloat16 for correctness (the
 * same numbers the GPU's mixed precision gives, within rounding) rather than speed: its float32
 * kernels are the tuned ones. */
#include "cpu.h"

#include <string.h>

void cpu_bf16_begin(cpu_bf16_call *c) { memset(c, 0, sizeof *c); }

/* wide = t's values in float32. Broadcast dims (stride 0) are converted once and expanded again,
 * so a bias broadcast over a batch costs its own size, not the batch's. */
static int widen(fl_tensor *wide, const fl_tensor *t, int load) {
  int64_t base[FL_MAXDIM];
  for (int d = 0; d < t->ndim; d++) base[d] = load && t->stride[d] == 0 ? 1 : t->shape[d];
  if (fl_tensor_init(wide, &fl_cpu_backend, 0, FL_F32, t->ndim, base)) return -1;
  if (!load) return 0;
  fl_tensor src = *t;
  for (int d = 0; d < t->ndim; d++) src.shape[d] = base[d];
  cpu_copy(wide, &src);
  return fl_view_expand(wide, t->ndim, t->shape);
}

fl_tensor *cpu_bf16_arg(cpu_bf16_call *c, const fl_tensor *t, int in, int out) {
  if (!t || t->dtype != FL_BF16 || c->rc) return (fl_tensor *)t;
  if (c->n == CPU_BF16_MAXARG) { c->rc = fl_fail("cpu: too many bfloat16 operands"); return (fl_tensor *)t; }
  fl_tensor *w = &c->wide[c->n];
  if (widen(w, t, in)) { c->rc = -1; return (fl_tensor *)t; }
  c->dst[c->n++] = out ? (fl_tensor *)t : NULL;
  return w;
}

int cpu_bf16_end(cpu_bf16_call *c, int rc) {
  for (int i = 0; i < c->n; i++) {
    if (!rc && c->dst[i]) cpu_copy(c->dst[i], &c->wide[i]);
    fl_tensor_free(&c->wide[i]);
  }
  return rc;
}
