#!/usr/bin/env python3
"""Reference cases for flowerlua's tensor ops, computed with numpy.

Usage: gen_numpy.py OUTDIR    (writes OUTDIR/numpy_cases.json)

Each case: {"name", "op", "args": {...}, "inputs": [tensor...], "expected": tensor or [tensor...]}
with tensor = {"shape": [...], "dtype": "float32"|..., "data": [flat row-major values]}.
Values are exact in their dtype (float32 inputs are float32 numbers written as doubles).

flowerlua's own conventions are applied here, so numpy computes in the dtype flowerlua promises:
promotion float64 > float32 > int64 > int32 > uint8 (numpy would widen int32+float32 to float64);
integer / integer is float32; sum of integers is int64; mean/var/std of integers are float32;
argmax/argmin and max/min indices are 1-based; var/std default to ddof=1.

Also an independent implementation of Philox4x32-10 (checked against the Random123 known-answer
vectors) gives the first values of flowerlua's random streams (see core/rng.h).
"""
import json
import math
import os
import sys

import numpy as np

RNG = np.random.default_rng(20240601)
RANK = {"uint8": 0, "int32": 1, "int64": 2, "float32": 3, "float64": 4}
FLOATS = ("float32", "float64")


def promote(a, b):
    return a if RANK[a] >= RANK[b] else b


def T(x, dtype=None):
    x = np.asarray(x)
    if dtype is not None:
        x = x.astype(dtype)
    return {"shape": list(x.shape), "dtype": str(x.dtype), "data": [v.item() for v in x.reshape(-1)]}


def rand(shape, dtype, lo=-3.0, hi=3.0):
    if dtype in FLOATS:
        return RNG.uniform(lo, hi, size=shape).astype(dtype)
    if dtype == "uint8":
        return RNG.integers(0, 256, size=shape).astype(dtype)
    return RNG.integers(int(lo * 10), int(hi * 10) + 1, size=shape).astype(dtype)


cases = []


def add(name, op, inputs, expected, **args):
    exp = [T(e) for e in expected] if isinstance(expected, (list, tuple)) else T(expected)
    cases.append({"name": name, "op": op, "args": args, "inputs": [T(i) for i in inputs], "expected": exp})


# ---------------------------------------------------------------- binary ops with broadcasting

SHAPES = [([2, 3], [3]), ([4, 1, 3], [2, 1]), ([], [2, 3]), ([3, 1], [1, 4]), ([2, 3, 4], [2, 3, 4]),
          ([5, 1, 1, 2], [3, 1])]


def np_binary(op, a, b, dt):
    a, b = a.astype(dt), b.astype(dt)
    with np.errstate(all="ignore"):
        return {
            "add": lambda: a + b, "sub": lambda: a - b, "mul": lambda: a * b, "div": lambda: a / b,
            "maximum": lambda: np.maximum(a, b), "minimum": lambda: np.minimum(a, b),
            "pow": lambda: np.power(a, b),
        }[op]().astype(dt)


for op in ("add", "sub", "mul", "div", "maximum", "minimum"):
    for (sa, sb) in SHAPES:
        for dt in ("float32", "float64", "int32", "int64", "uint8"):
            a, b = rand(sa, dt), rand(sb, dt)
            if op == "div":
                if dt not in FLOATS:
                    b = np.where(b == 0, 1, b).astype(dt)
                rdt = dt if dt in FLOATS else "float32"
                add(f"{op} {dt} {sa}x{sb}", op, [a, b], np_binary(op, a, b, rdt))
            else:
                add(f"{op} {dt} {sa}x{sb}", op, [a, b], np_binary(op, a, b, dt))

# pow: positive bases for floats; small exponents for ints
for (sa, sb) in SHAPES[:3]:
    for dt in FLOATS:
        a, b = rand(sa, dt, 0.1, 3.0), rand(sb, dt, -2, 2)
        add(f"pow {dt} {sa}x{sb}", "pow", [a, b], np_binary("pow", a, b, dt))
    a = rand(sa, "int32", -0.5, 0.5)
    b = RNG.integers(0, 5, size=sb).astype("int32")
    add(f"pow int32 {sa}x{sb}", "pow", [a, b], np_binary("pow", a, b, "int32"))

# mixed dtypes: flowerlua's promotion
for (da, db) in (("int32", "float32"), ("uint8", "int64"), ("float32", "float64"), ("int32", "int64"),
                 ("uint8", "float32")):
    a, b = rand([2, 3], da), rand([3], db)
    for op in ("add", "mul", "sub"):
        add(f"{op} {da}+{db}", op, [a, b], np_binary(op, a, b, promote(da, db)))
    rdt = promote(da, db)
    rdt = rdt if rdt in FLOATS else "float32"
    bb = np.where(b == 0, 1, b).astype(db)
    add(f"div {da}/{db}", "div", [a, bb], np_binary("div", a, bb, rdt))

# comparisons: uint8 masks; operands with repeated values so equality happens
for op, f in (("eq", np.equal), ("ne", np.not_equal), ("lt", np.less), ("le", np.less_equal),
              ("gt", np.greater), ("ge", np.greater_equal)):
    for dt in ("float32", "int32", "uint8", "float64"):
        a = RNG.integers(0, 4, size=[3, 4]).astype(dt)
        b = RNG.integers(0, 4, size=[4]).astype(dt)
        add(f"{op} {dt}", op, [a, b], f(a, b).astype("uint8"))

# ---------------------------------------------------------------- unary ops

for dt in FLOATS:
    x = rand([3, 5], dt)
    xp = rand([3, 5], dt, 0.01, 5.0)
    add(f"neg {dt}", "neg", [x], -x)
    add(f"exp {dt}", "exp", [x], np.exp(x).astype(dt))
    add(f"log {dt}", "log", [xp], np.log(xp).astype(dt))
    add(f"sqrt {dt}", "sqrt", [xp], np.sqrt(xp).astype(dt))
    add(f"abs {dt}", "abs", [x], np.abs(x))
    add(f"tanh {dt}", "tanh", [x], np.tanh(x).astype(dt))
    add(f"sigmoid {dt}", "sigmoid", [x], (1 / (1 + np.exp(-x.astype("float64")))).astype(dt))
    add(f"relu {dt}", "relu", [x], np.maximum(x, 0).astype(dt))
    add(f"clamp {dt}", "clamp", [x], np.clip(x, -1.0, 0.5).astype(dt), lo=-1.0, hi=0.5)
    add(f"pow scalar {dt}", "pows", [xp], np.power(xp, 1.5).astype(dt), p=1.5)
    add(f"pow scalar 2 {dt}", "pows", [x], np.power(x, 2).astype(dt), p=2)
for dt in ("int32", "int64"):
    x = rand([4, 3], dt)
    add(f"neg {dt}", "neg", [x], -x)
    add(f"abs {dt}", "abs", [x], np.abs(x))
    add(f"relu {dt}", "relu", [x], np.maximum(x, 0).astype(dt))
    add(f"clamp {dt}", "clamp", [x], np.clip(x, -5, 7).astype(dt), lo=-5, hi=7)
    add(f"pow scalar 3 {dt}", "pows", [x], np.power(x, 3).astype(dt), p=3)
    add(f"exp {dt} gives float32", "exp", [x[:, :1] // 10], np.exp((x[:, :1] // 10).astype("float32")))

# ---------------------------------------------------------------- reductions

for shape in ([7], [3, 4], [2, 3, 4], [2, 1, 5]):
    for dt in ("float32", "float64", "int32", "uint8"):
        x = rand(shape, dt)
        xf = x.astype("float64")
        fdt = "float64" if dt == "float64" else "float32"
        sdt = dt if dt in FLOATS else "int64"
        dims = [None] + list(range(len(shape)))
        for d in dims:
            for keep in ((False, True) if d is not None else (False,)):
                kw = {"dim": (d + 1) if d is not None else None, "keepdim": keep}
                ax = d
                tag = f"{dt} {shape} dim={kw['dim']} keep={keep}"

                def r(v, rdt):
                    v = np.asarray(v)
                    return v.astype(rdt)

                add(f"sum {tag}", "sum", [x], r(np.sum(x.astype(sdt) if dt not in FLOATS else xf, axis=ax, keepdims=keep), sdt), **kw)
                add(f"mean {tag}", "mean", [x], r(np.mean(xf, axis=ax, keepdims=keep), fdt), **kw)
                n = x.size if d is None else shape[d]
                if n > 1:
                    add(f"var {tag}", "var", [x], r(np.var(xf, axis=ax, ddof=1, keepdims=keep), fdt), **kw)
                    add(f"std {tag}", "std", [x], r(np.std(xf, axis=ax, ddof=1, keepdims=keep), fdt), **kw)
                    add(f"var0 {tag}", "var", [x], r(np.var(xf, axis=ax, ddof=0, keepdims=keep), fdt),
                        correction=0, **kw)
                if d is None:
                    add(f"max {tag}", "max", [x], np.max(x))
                    add(f"min {tag}", "min", [x], np.min(x))
                    add(f"argmax {tag}", "argmax", [x], np.int64(np.argmax(x) + 1))
                    add(f"argmin {tag}", "argmin", [x], np.int64(np.argmin(x) + 1))
                else:
                    add(f"max {tag}", "max", [x],
                        [np.max(x, axis=d, keepdims=keep), (np.argmax(x, axis=d) + 1).astype("int64").reshape(np.max(x, axis=d, keepdims=keep).shape)], **kw)
                    add(f"min {tag}", "min", [x],
                        [np.min(x, axis=d, keepdims=keep), (np.argmin(x, axis=d) + 1).astype("int64").reshape(np.min(x, axis=d, keepdims=keep).shape)], **kw)
                    add(f"argmax {tag}", "argmax", [x],
                        (np.argmax(x, axis=d) + 1).astype("int64").reshape(np.max(x, axis=d, keepdims=keep).shape), **kw)

# a larger reduction that runs on several threads and on the vertical (blocked) path
x = rand([300, 130], "float32")
for d in (None, 0, 1):
    add(f"sum large dim={d}", "sum", [x], np.sum(x.astype("float64"), axis=d).astype("float32"),
        dim=(d + 1) if d is not None else None, keepdim=False)
    add(f"max large dim={d}", "max", [x], np.max(x, axis=d) if d is None else
        [np.max(x, axis=d), (np.argmax(x, axis=d) + 1).astype("int64")], dim=(d + 1) if d is not None else None,
        keepdim=False)

# ---------------------------------------------------------------- matmul

MM = [([3, 4], [4, 5]), ([4], [4, 5]), ([3, 4], [4]), ([4], [4]), ([2, 3, 4], [4, 5]), ([2, 3, 4], [2, 4, 5]),
      ([2, 1, 3, 4], [5, 4, 6]), ([3, 4], [2, 4, 2]), ([1, 7], [7, 1]), ([6, 0], [0, 3])]
for dt in FLOATS:
    for sa, sb in MM:
        a, b = rand(sa, dt), rand(sb, dt)
        add(f"matmul {dt} {sa}x{sb}", "matmul", [a, b], np.matmul(a.astype("float64"), b.astype("float64")).astype(dt))
    # transposed operands (stored transposed, transposed back in Lua: non-contiguous views)
    a, b = rand([5, 3], dt), rand([6, 5], dt)
    add(f"matmul {dt} a^T b^T", "matmul", [a, b], np.matmul(a.T.astype("float64"), b.T.astype("float64")).astype(dt),
        transpose_a=True, transpose_b=True)
    a, b = rand([2, 5, 3], dt), rand([5, 4], dt)
    add(f"matmul {dt} batched a^T", "matmul", [a, b],
        np.matmul(np.swapaxes(a, 1, 2).astype("float64"), b.astype("float64")).astype(dt), transpose_a=True)
a, b = rand([3, 4], "float32"), rand([4, 2], "float64")
add("matmul float32 x float64", "matmul", [a, b], np.matmul(a.astype("float64"), b))

# ---------------------------------------------------------------- softmax

for dt in FLOATS:
    for shape, d in (([4, 6], 1), ([4, 6], 0), ([2, 3, 5], 2), ([2, 3, 5], 1)):
        x = rand(shape, dt, -10, 10)
        xf = x.astype("float64")
        e = np.exp(xf - xf.max(axis=d, keepdims=True))
        sm = e / e.sum(axis=d, keepdims=True)
        add(f"softmax {dt} {shape} dim={d + 1}", "softmax", [x], sm.astype(dt), dim=d + 1)
        add(f"logsoftmax {dt} {shape} dim={d + 1}", "logsoftmax", [x], np.log(sm).astype(dt), dim=d + 1)

# ---------------------------------------------------------------- where, views

for dt in ("float32", "int64"):
    m = RNG.integers(0, 2, size=[3, 1]).astype("uint8")
    a, b = rand([3, 4], dt), rand([4], dt)
    add(f"where {dt}", "where", [m, a, b], np.where(m != 0, a, b))

x = rand([2, 3, 4], "float32")
add("permute contiguous", "permute", [x], np.transpose(x, (2, 0, 1)).copy(), perm=[3, 1, 2])
add("transpose sum", "transpose_sum", [x], np.sum(np.swapaxes(x, 0, 2).astype("float64"), axis=0).astype("float32"))
add("narrow", "narrow", [x], x[:, 1:3, :], dim=2, start=2, len=2)
add("expand add", "expand_add", [x[:, :1, :], x], x[:, :1, :] + x)
add("strided copy", "stride_copy", [x], np.ascontiguousarray(x[:, ::2, ::-1][:, :, ::-1]))

# ---------------------------------------------------------------- Philox4x32-10

M0, M1 = 0xD2511F53, 0xCD9E8D57
W0, W1 = 0x9E3779B9, 0xBB67AE85
MASK = 0xFFFFFFFF


def philox4x32_10(ctr, key):
    c = list(ctr)
    k0, k1 = key
    for _ in range(10):
        p0, p1 = M0 * c[0], M1 * c[2]
        c = [((p1 >> 32) ^ c[1] ^ k0) & MASK, p1 & MASK, ((p0 >> 32) ^ c[3] ^ k1) & MASK, p0 & MASK]
        k0, k1 = (k0 + W0) & MASK, (k1 + W1) & MASK
    return c


# Known-answer vectors published with Random123 (kat_vectors, philox4x32 10 rounds).
KAT = [
    ([0, 0, 0, 0], [0, 0], [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]),
    ([MASK] * 4, [MASK] * 2, [0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD]),
    ([0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344], [0xA4093822, 0x299F31D0],
     [0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1]),
]
for ctr, key, want in KAT:
    got = philox4x32_10(ctr, key)
    if got != want:
        sys.exit("philox known-answer test failed: %s != %s" % ([hex(g) for g in got], [hex(w) for w in want]))


def words(seed, offset, i):
    c = offset + i
    return philox4x32_10([c & MASK, (c >> 32) & MASK, 0, 0], [seed & MASK, (seed >> 32) & MASK])


def draw(seed, offset, n, kind, dtype, p0, p1):
    out = []
    for i in range(n):
        r = words(seed, offset, i)
        if kind == "int":
            rng = int(p1) - int(p0)
            out.append(int(p0) + (((r[1] << 32) | r[0]) % rng))
        elif kind == "normal":
            u1 = (((r[1] << 32) | r[0]) >> 11) * 2.0 ** -53 + 2.0 ** -54
            u2 = (((r[3] << 32) | r[2]) >> 11) * 2.0 ** -53
            out.append(p0 + p1 * math.sqrt(-2.0 * math.log(u1)) * math.cos(6.283185307179586 * u2))
        elif dtype == "float32":
            out.append(p0 + (p1 - p0) * ((r[0] >> 8) * 2.0 ** -24))
        else:
            out.append(p0 + (p1 - p0) * ((((r[1] << 32) | r[0]) >> 11) * 2.0 ** -53))
    return np.array(out).astype(dtype)


rng_cases = []
for seed, offset, n, kind, dtype, p0, p1, call in (
        (42, 0, 8, "uniform", "float32", 0.0, 1.0, "rand"),
        (42, 0, 8, "uniform", "float64", 0.0, 1.0, "rand"),
        (7, 0, 8, "normal", "float32", 0.0, 1.0, "randn"),
        (7, 0, 8, "normal", "float64", 0.0, 1.0, "randn"),
        (123456789, 0, 10, "int", "int64", 1, 7, "randint"),
        (2 ** 40 + 5, 0, 6, "uniform", "float32", -2.0, 3.0, "uniform_")):
    rng_cases.append({"seed": seed, "n": n, "kind": kind, "dtype": dtype, "p0": p0, "p1": p1, "call": call,
                      "expected": [v.item() for v in draw(seed, offset, n, kind, dtype, p0, p1)]})
# a stream continued: after drawing 8 values, the next 4 start at offset 8
cont = draw(42, 8, 4, "uniform", "float32", 0.0, 1.0)
rng_cases.append({"seed": 42, "n": 4, "skip": 8, "kind": "uniform", "dtype": "float32", "p0": 0.0, "p1": 1.0,
                  "call": "rand", "expected": [v.item() for v in cont]})

out = sys.argv[1] if len(sys.argv) > 1 else "build/ref"
os.makedirs(out, exist_ok=True)
path = os.path.join(out, "numpy_cases.json")
tmp = path + ".tmp"
with open(tmp, "w") as f:
    json.dump({"numpy": np.__version__, "cases": cases, "rng": rng_cases}, f)
os.replace(tmp, path)
print(f"{len(cases)} cases, {len(rng_cases)} rng streams -> {path}")
