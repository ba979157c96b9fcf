"""HDF5 interop references for tests/lua/test_h5.lua, written by h5py.

  gen_h5.py OUTDIR          writes OUTDIR/h5py_made.h5 and OUTDIR/h5py_made.json (what it holds,
                            as numpy reads it back: dtype, shape, flattened values, attributes)
  gen_h5.py --dump FILE     prints the same JSON description of any file (used to check files
                            that flowerlua wrote)

Covers what Keras and the feature exporter write: nested groups, `name:0` datasets, every numeric
dtype flowerlua maps, scalars, empty arrays, chunked/gzip/extendible datasets, fixed- and
variable-length string attributes and datasets, Keras 1's empty float64 `weight_names`,
bool/int/float attributes, and groups with and without tracked creation order.
"""
import json
import os
import sys

import h5py
import numpy as np


def describe_attr(v):
    if isinstance(v, h5py.Empty):
        return {"kind": "empty"}
    if isinstance(v, (bytes, np.bytes_)):
        return {"kind": "str", "value": v.decode("utf8")}
    if isinstance(v, str):
        return {"kind": "str", "value": v}
    if isinstance(v, np.ndarray):
        vals = v.ravel().tolist()
        vals = [x.decode("utf8") if isinstance(x, bytes) else x for x in vals]
        if v.dtype == bool:
            vals = [int(x) for x in vals]
        return {"kind": "list", "dtype": str(v.dtype), "value": vals}
    if isinstance(v, (np.bool_, bool)):
        return {"kind": "num", "value": int(v)}
    if isinstance(v, (np.integer, int)):
        return {"kind": "num", "value": int(v)}
    return {"kind": "num", "value": float(v)}


def describe(path):
    out = {"datasets": {}, "groups": {}, "attrs": {}}
    with h5py.File(path, "r") as f:
        def visit(name, obj):
            full = "/" + name
            attrs = {k: describe_attr(obj.attrs[k]) for k in obj.attrs}
            if attrs:
                out["attrs"][full] = attrs
            if isinstance(obj, h5py.Dataset):
                d = {"shape": list(obj.shape), "dtype": str(obj.dtype),
                     "chunks": list(obj.chunks) if obj.chunks else None,
                     "compression": obj.compression, "maxshape": [m if m is not None else -1 for m in (obj.maxshape or [])]}
                data = obj[()]
                if obj.dtype.kind in "SOU":
                    d["value"] = [x.decode("utf8") if isinstance(x, bytes) else x for x in np.ravel(data).tolist()]
                else:
                    d["value"] = np.ravel(data).astype(np.float64).tolist()
                out["datasets"][full] = d
            else:
                out["groups"][full] = list(obj.keys())
        out["groups"]["/"] = list(f.keys())
        root_attrs = {k: describe_attr(f.attrs[k]) for k in f.attrs}
        if root_attrs:
            out["attrs"]["/"] = root_attrs
        f.visititems(visit)
    return out


def make(outdir):
    os.makedirs(outdir, exist_ok=True)
    path = os.path.join(outdir, "h5py_made.h5")
    tmp = path + ".tmp"
    rng = np.random.default_rng(5)
    with h5py.File(tmp, "w") as f:
        # Keras 2 layout: /layer/layer/kernel:0 with fixed-length byte-string name lists
        f.attrs["layer_names"] = np.array([b"conv1", b"bn_conv1", b"activation_1"])
        f.attrs["backend"] = "tensorflow"          # variable-length str (h5py default)
        f.attrs["keras_version"] = b"2.2.4"        # fixed-length bytes scalar
        g = f.create_group("conv1")
        g.attrs["weight_names"] = np.array([b"conv1/kernel:0", b"conv1/bias:0"])
        g.create_dataset("conv1/kernel:0", data=rng.standard_normal((3, 3, 2, 4)).astype("<f4"))
        g.create_dataset("conv1/bias:0", data=rng.standard_normal(4).astype("<f4"))
        a = f.create_group("activation_1")
        a.attrs["weight_names"] = np.array([])     # Keras 1 writes [] as a 0-length float64
        b = f.create_group("bn_conv1")
        # Keras 3 style: a list of str is stored as variable-length strings
        b.attrs["weight_names"] = ["bn_conv1/gamma", "bn_conv1/beta"]
        b.create_dataset("bn_conv1/gamma", data=rng.standard_normal(4).astype("<f4"))
        b.create_dataset("bn_conv1/beta", data=rng.standard_normal(4).astype("<f4"))
        # every dtype
        t = f.create_group("types")
        t.create_dataset("f64", data=rng.standard_normal((2, 3)))
        t.create_dataset("f16", data=np.array([0.5, -1.25, 3.0], dtype="<f2"))
        t.create_dataset("i8", data=np.array([-128, 0, 127], dtype="i1"))
        t.create_dataset("i16", data=np.array([-300, 7], dtype="<i2"))
        t.create_dataset("i32", data=np.arange(-3, 3, dtype="<i4").reshape(2, 3))
        t.create_dataset("u32", data=np.array([4000000000, 1], dtype="<u4"))
        t.create_dataset("i64", data=np.array([-(2 ** 40), 2 ** 40 + 3], dtype="<i8"))
        t.create_dataset("u8", data=np.arange(250, 256, dtype="u1"))
        t.create_dataset("bool", data=np.array([True, False, True]))
        t.create_dataset("be_f32", data=np.array([1.5, -2.0], dtype=">f4"))
        t.create_dataset("scalar", data=np.int64(42))
        t.create_dataset("empty", data=np.zeros((0, 3), dtype="<f4"))
        t.create_dataset("rank5", data=np.arange(32, dtype="<f4").reshape(2, 2, 2, 2, 2))
        # storage layouts
        s = f.create_group("storage")
        s.create_dataset("gzip", data=np.arange(1000, dtype="<f4").reshape(100, 10), chunks=(7, 10),
                         compression="gzip", compression_opts=4)
        e = s.create_dataset("grow", shape=(0, 3), maxshape=(None, 3), chunks=(4, 3), dtype="<f4")
        e.resize((5, 3))
        e[...] = np.arange(15, dtype="<f4").reshape(5, 3)
        # strings
        st = f.create_group("strings")
        st.create_dataset("vlen", data=["daisy.jpg", "rose/é.jpg", ""], dtype=h5py.string_dtype())
        st.create_dataset("fixed", data=np.array([b"ab", b"cde"]))
        st.attrs["int"] = 7
        st.attrs["float"] = 2.5
        st.attrs["floats"] = np.array([0.5, 1.5])
        st.attrs["ints"] = np.array([1, 2, 3], dtype="<i4")
        st.attrs["flag"] = True
        st.attrs["empty"] = h5py.Empty("f")
        # order: a tracked group lists in creation order, an untracked one in name order
        o = f.create_group("ordered", track_order=True)
        for n in ["zeta", "alpha", "mid"]:
            o.create_group(n)
        u = f.create_group("unordered")
        for n in ["zeta", "alpha", "mid"]:
            u.create_group(n)
        f["soft"] = h5py.SoftLink("/conv1")
        f["dangling"] = h5py.SoftLink("/nowhere")
    os.replace(tmp, path)
    desc = describe(path)
    with open(os.path.join(outdir, "h5py_made.json.tmp"), "w") as fh:
        json.dump(desc, fh)
    os.replace(os.path.join(outdir, "h5py_made.json.tmp"), os.path.join(outdir, "h5py_made.json"))


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--dump":
        json.dump(describe(sys.argv[2]), sys.stdout)
    elif len(sys.argv) == 2:
        make(sys.argv[1])
    else:
        sys.exit("usage: gen_h5.py OUTDIR | gen_h5.py --dump FILE")
