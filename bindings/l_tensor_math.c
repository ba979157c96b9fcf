/* Tensor math for Lua: element-wise operators and methods (numpy broadcasting and promotion),
 * in-place forms (trailing underscore, return the tensor itself), comparisons (uint8 masks),
 * reductions, matmul, softmax. Conventions: see the top of l_tensor.c. */
#include "l_tensor.h"

#include <math.h>
#include <string.h>

/* ---------------------------------------------------------------- binary */

/* a op b where either may be a number (metamethods) or a is the method's tensor */
static int binary_new(lua_State *L, fl_binop op, const char *fname) {
  fl_tensor ta, tb;
  const fl_tensor *a, *b;
  if (lua_type(L, 1) == LUA_TNUMBER) {          /* 2 - t */
    b = fl_lua_tensorarg(L, 2, NULL, &tb, fname);
    a = fl_lua_tensorarg(L, 1, b, &ta, fname);
  } else {
    a = fl_lua_tensorarg(L, 1, NULL, &ta, fname);
    b = fl_lua_tensorarg(L, 2, a, &tb, fname);
  }
  fl_tensor *r = fl_lua_newtensor(L);
  int rc = fl_binary(op, r, a, b);
  if (rc && fl_last_failure_was_oom()) {
    lua_gc(L, LUA_GCCOLLECT);
    rc = fl_binary(op, r, a, b);
  }
  fl_tensor_free(&ta);
  fl_tensor_free(&tb);
  if (rc) return fl_lua_error(L);
  return 1;
}

static int binary_inplace(lua_State *L, fl_binop op, const char *fname) {
  fl_tensor *t = fl_lua_checktensor(L, 1);
  fl_tensor tb;
  const fl_tensor *b = fl_lua_tensorarg(L, 2, t, &tb, fname);
  int rc = fl_binary_into(op, t, t, b);
  fl_tensor_free(&tb);
  if (rc) return fl_lua_error(L);
  lua_settop(L, 1);
  return 1;
}

#define BINARY(NAME, OP)                                                                   \
  static int m_##NAME(lua_State *L) { return binary_new(L, OP, #NAME); }                   \
  static int m_##NAME##_(lua_State *L) { return binary_inplace(L, OP, #NAME "_"); }
BINARY(add, FL_ADD)
BINARY(sub, FL_SUB)
BINARY(mul, FL_MUL)
BINARY(div, FL_DIV)
BINARY(maximum, FL_MAXIMUM)
BINARY(minimum, FL_MINIMUM)

#define COMPARE(NAME, OP) static int m_##NAME(lua_State *L) { return binary_new(L, OP, #NAME); }
COMPARE(eq, FL_EQ)
COMPARE(ne, FL_NE)
COMPARE(lt, FL_LT)
COMPARE(le, FL_LE)
COMPARE(gt, FL_GT)
COMPARE(ge, FL_GE)

/* ---------------------------------------------------------------- unary */

static int unary_new(lua_State *L, fl_unop op, double p0, double p1) {
  fl_tensor *t = fl_lua_checktensor(L, 1);
  fl_tensor *r = fl_lua_newtensor(L);
  FL_TRY(L, fl_unary(op, r, t, p0, p1));
  return 1;
}

static int unary_inplace(lua_State *L, fl_unop op, double p0, double p1) {
  fl_tensor *t = fl_lua_checktensor(L, 1);
  if (fl_unary_into(op, t, t, p0, p1)) return fl_lua_error(L);
  lua_settop(L, 1);
  return 1;
}

#define UNARY(NAME, OP)                                                              \
  static int m_##NAME(lua_State *L) { return unary_new(L, OP, 0, 0); }               \
  static int m_##NAME##_(lua_State *L) { return unary_inplace(L, OP, 0, 0); }
UNARY(neg, FL_NEG)
UNARY(exp, FL_EXP)
UNARY(log, FL_LOG)
UNARY(sqrt, FL_SQRT)
UNARY(abs, FL_ABS)
UNARY(tanh, FL_TANH)
UNARY(sigmoid, FL_SIGMOID)
UNARY(relu, FL_RELU)

/* clamp(lo, hi): either bound may be nil (no bound) */
static void clamp_args(lua_State *L, double *lo, double *hi) {
  fl_lua_checktensor(L, 1);
  *lo = lua_isnoneornil(L, 2) ? -HUGE_VAL : luaL_checknumber(L, 2);
  *hi = lua_isnoneornil(L, 3) ? HUGE_VAL : luaL_checknumber(L, 3);
  if (*lo != *lo || *hi != *hi) luaL_error(L, "clamp: bounds must not be NaN");
}
static int m_clamp(lua_State *L) { double lo, hi; clamp_args(L, &lo, &hi); return unary_new(L, FL_CLAMP, lo, hi); }
static int m_clamp_(lua_State *L) { double lo, hi; clamp_args(L, &lo, &hi); return unary_inplace(L, FL_CLAMP, lo, hi); }

/* pow(x): a number exponent (integer exponents keep integer dtypes) or a tensor (broadcast) */
static int m_pow(lua_State *L) {
  if (lua_type(L, 1) != LUA_TNUMBER && lua_type(L, 2) == LUA_TNUMBER)
    return unary_new(L, FL_POWS, lua_tonumber(L, 2), 0);
  return binary_new(L, FL_POW, "pow");
}
static int m_pow_(lua_State *L) {
  if (lua_type(L, 2) == LUA_TNUMBER) return unary_inplace(L, FL_POWS, lua_tonumber(L, 2), 0);
  return binary_inplace(L, FL_POW, "pow_");
}

/* ---------------------------------------------------------------- where / matmul / softmax */

/* where(mask, a, b): a where mask is nonzero, else b; a and b tensors or numbers */
static int m_where(lua_State *L) {
  fl_tensor *mask = fl_lua_checktensor(L, 1);
  fl_tensor ta, tb;
  const fl_tensor *a, *b;
  if (lua_type(L, 2) == LUA_TNUMBER && lua_type(L, 3) != LUA_TNUMBER) {
    b = fl_lua_tensorarg(L, 3, NULL, &tb, "where");
    a = fl_lua_tensorarg(L, 2, b, &ta, "where");
  } else {
    a = fl_lua_tensorarg(L, 2, NULL, &ta, "where");
    b = fl_lua_tensorarg(L, 3, a, &tb, "where");
  }
  fl_tensor *r = fl_lua_newtensor(L);
  int rc = fl_where(r, mask, a, b);
  fl_tensor_free(&ta);
  fl_tensor_free(&tb);
  if (rc) return fl_lua_error(L);
  return 1;
}

static int m_matmul(lua_State *L) {
  fl_tensor *a = fl_lua_checktensor(L, 1), *b = fl_lua_checktensor(L, 2);
  fl_tensor *r = fl_lua_newtensor(L);
  FL_TRY(L, fl_matmul(r, a, b));
  return 1;
}

static int softmax_impl(lua_State *L, int lg) {
  fl_tensor *t = fl_lua_checktensor(L, 1);
  const char *fname = lg ? "logsoftmax" : "softmax";
  if (t->ndim == 0) return luaL_error(L, "%s: expected a tensor with at least 1 dim, got a 0-d tensor", fname);
  int d = lua_isnoneornil(L, 2) ? t->ndim - 1 : fl_lua_checkdim(L, 2, t->ndim, 0, fname);
  fl_tensor *r = fl_lua_newtensor(L);
  FL_TRY(L, fl_softmax(r, t, d, lg));
  return 1;
}
static int m_softmax(lua_State *L) { return softmax_impl(L, 0); }
static int m_logsoftmax(lua_State *L) { return softmax_impl(L, 1); }

/* ---------------------------------------------------------------- reductions */

/* (dim or nil, keepdim) at 2 and 3 -> 0-based dim or -1 for everything */
static int red_args(lua_State *L, const fl_tensor *t, const char *fname, int *keepdim) {
  *keepdim = lua_toboolean(L, 3);
  if (lua_isnoneornil(L, 2)) return -1;
  return fl_lua_checkdim(L, 2, t->ndim, 0, fname);
}

static int reduce_simple(lua_State *L, fl_redop op, const char *fname) {
  fl_tensor *t = fl_lua_checktensor(L, 1);
  int keepdim;
  int d = red_args(L, t, fname, &keepdim);
  int corr = 1;
  if (op == FL_VAR || op == FL_STD) {   /* 4th argument: correction (1 = unbiased, default) or boolean unbiased */
    if (lua_isboolean(L, 4)) corr = lua_toboolean(L, 4);
    else corr = (int)luaL_optinteger(L, 4, 1);
    if (corr < 0) return luaL_error(L, "%s: correction must be >= 0, got %d", fname, corr);
  }
  fl_tensor *r = fl_lua_newtensor(L);
  FL_TRY(L, fl_reduce(op, r, t, d, keepdim, corr));
  return 1;
}

static int m_sum(lua_State *L) { return reduce_simple(L, FL_SUM, "sum"); }
static int m_mean(lua_State *L) { return reduce_simple(L, FL_MEAN, "mean"); }
static int m_var(lua_State *L) { return reduce_simple(L, FL_VAR, "var"); }
static int m_std(lua_State *L) { return reduce_simple(L, FL_STD, "std"); }

/* indices from the core are 0-based; Lua sees 1-based */
static int push_indices(lua_State *L, fl_redop op, const fl_tensor *t, int d, int keepdim) {
  fl_tensor *r = fl_lua_newtensor(L);
  FL_TRY(L, fl_reduce(op, r, t, d, keepdim, 0));
  if (fl_unary_into(FL_AFFINE, r, r, 1, 1)) return fl_lua_error(L);
  return 1;
}

static int argred(lua_State *L, fl_redop op, const char *fname) {
  fl_tensor *t = fl_lua_checktensor(L, 1);
  int keepdim;
  int d = red_args(L, t, fname, &keepdim);
  return push_indices(L, op, t, d, keepdim);
}
static int m_argmax(lua_State *L) { return argred(L, FL_ARGMAX, "argmax"); }
static int m_argmin(lua_State *L) { return argred(L, FL_ARGMIN, "argmin"); }

/* max() -> 0-dim tensor; max(dim [, keepdim]) -> values, indices (1-based int64) */
static int maxmin(lua_State *L, fl_redop op, fl_redop argop, const char *fname) {
  fl_tensor *t = fl_lua_checktensor(L, 1);
  int keepdim;
  int d = red_args(L, t, fname, &keepdim);
  fl_tensor *r = fl_lua_newtensor(L);
  FL_TRY(L, fl_reduce(op, r, t, d, keepdim, 0));
  if (d < 0) return 1;
  push_indices(L, argop, t, d, keepdim);
  return 2;
}
static int m_max(lua_State *L) { return maxmin(L, FL_MAX, FL_ARGMAX, "max"); }
static int m_min(lua_State *L) { return maxmin(L, FL_MIN, FL_ARGMIN, "min"); }

/* ---------------------------------------------------------------- registration */

#define BOTH(NAME) {#NAME, m_##NAME}, {#NAME "_", m_##NAME##_}
static const luaL_Reg math_methods[] = {
  BOTH(add), BOTH(sub), BOTH(mul), BOTH(div), BOTH(maximum), BOTH(minimum), BOTH(pow),
  BOTH(neg), BOTH(exp), BOTH(log), BOTH(sqrt), BOTH(abs), BOTH(tanh), BOTH(sigmoid), BOTH(relu),
  BOTH(clamp),
  {"eq", m_eq}, {"ne", m_ne}, {"lt", m_lt}, {"le", m_le}, {"gt", m_gt}, {"ge", m_ge},
  {"sum", m_sum}, {"mean", m_mean}, {"var", m_var}, {"std", m_std}, {"max", m_max}, {"min", m_min},
  {"argmax", m_argmax}, {"argmin", m_argmin},
  {"matmul", m_matmul}, {"mm", m_matmul}, {"softmax", m_softmax}, {"logsoftmax", m_logsoftmax},
  {NULL, NULL},
};

static const luaL_Reg metamethods[] = {
  {"__add", m_add}, {"__sub", m_sub}, {"__mul", m_mul}, {"__div", m_div}, {"__pow", m_pow},
  {"__unm", m_neg},
  {NULL, NULL},
};

/* mt: the metatable's stack index; the module table sits just below it */
void fl_lua_open_tensor_math(lua_State *L, int mt) {
  lua_pushvalue(L, mt);
  luaL_setfuncs(L, math_methods, 0);
  luaL_setfuncs(L, metamethods, 0);
  lua_pop(L, 1);
  /* also as functions: flower.add(a, b), flower.exp(t), flower.matmul(a, b), flower.where(m, a, b) */
  lua_pushvalue(L, mt - 1);
  luaL_setfuncs(L, math_methods, 0);
  lua_pushcfunction(L, m_where);
  lua_setfield(L, -2, "where");
  lua_pop(L, 1);
}
