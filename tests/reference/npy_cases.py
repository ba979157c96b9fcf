"""numpy's side of tests/lua/test_npy.lua.
  npy_cases.py write DIR   numpy writes DIR/<case>.npy (and idx files) and DIR/<case>.bin: the same
                           values as C-order little-endian bytes, with DIR/cases.json
  npy_cases.py check DIR   numpy loads DIR/ours_<case>.npy (written by flowerlua) and compares with
                           DIR/ours_<case>.bin; prints one line per case: name, dtype, shape, ok/bad"""
import gzip
import json
import os
import struct
import sys

import numpy as np


def values(shape, dtype):
    n = int(np.prod(shape)) if shape else 1
    a = (np.arange(n, dtype=np.float64) * 1.37 - n / 3).reshape(shape)
    return a.astype(dtype)


def write(d):
    cases = {}

    def case(name, arr, saved=None, flower_dtype=None):
        np.save(os.path.join(d, name + ".npy"), arr if saved is None else saved)
        c = np.ascontiguousarray(arr).astype(arr.dtype.newbyteorder("<"))
        c.tofile(os.path.join(d, name + ".bin"))
        cases[name] = {"shape": list(arr.shape), "dtype": flower_dtype or arr.dtype.name}

    for dt in ["float32", "float64", "int32", "int64", "uint8"]:
        case("c_" + dt, values((3, 4, 5), dt))
        case("f_" + dt, np.asfortranarray(values((3, 4, 5), dt)))
    case("be_float32", values((7, 2), ">f4"), flower_dtype="float32")
    case("be_int64", values((5,), ">i8"), flower_dtype="int64")
    case("scalar", np.array(2.5, dtype=np.float32))
    case("empty", np.zeros((0, 3), dtype=np.float32))
    b = (values((4, 4), "float64") > 0)
    case("bool", b.astype(np.uint8), saved=b, flower_dtype="uint8")
    case("eight_dims", values((1, 2, 1, 1, 1, 1, 2, 3), "float32"))
    np.save(os.path.join(d, "bad_nine_dims.npy"), values((1,) * 8 + (2,), "float32"))
    np.save(os.path.join(d, "bad_float16.npy"), values((2, 2), "float16"))
    # idx: uint8 images gzipped, big-endian int16 and float32 raw
    def idx(name, arr, code, gz=False):
        raw = bytes([0, 0, code, arr.ndim]) + b"".join(struct.pack(">I", s) for s in arr.shape)
        raw += arr.astype(arr.dtype.newbyteorder(">")).tobytes()
        path = os.path.join(d, name)
        with (gzip.open(path, "wb") if gz else open(path, "wb")) as f:
            f.write(raw)
        flower = {"uint8": "uint8", "int16": "int32", "int32": "int32", "float32": "float32", "float64": "float64"}
        wid = arr.astype(flower[arr.dtype.name])
        wid.astype(wid.dtype.newbyteorder("<")).tofile(path + ".bin")
        cases[name] = {"shape": list(arr.shape), "dtype": flower[arr.dtype.name], "idx": True}
    idx("images-idx3-ubyte.gz", (values((6, 5, 4), "float64") % 256).astype(np.uint8), 0x08, gz=True)
    idx("short-idx2", values((3, 7), "int16"), 0x0B)
    idx("float-idx1", values((9,), "float32"), 0x0D)
    with open(os.path.join(d, "cases.json"), "w") as f:
        json.dump(cases, f, sort_keys=True)


def check(d):
    cases = json.load(open(os.path.join(d, "cases.json")))
    for name, c in sorted(cases.items()):
        a = np.load(os.path.join(d, "ours_" + name + ".npy"))
        want = np.fromfile(os.path.join(d, "ours_" + name + ".bin"), dtype=a.dtype).reshape(c["shape"])
        ok = a.dtype.name == c["dtype"] and list(a.shape) == c["shape"] and a.flags.c_contiguous and np.array_equal(a, want)
        print(name, a.dtype.name, list(a.shape), "ok" if ok else "bad")


if __name__ == "__main__":
    {"write": write, "check": check}[sys.argv[1]](sys.argv[2])
