"""The file layout the Keras reference generators share (read by tests/lua/nn_ref.lua).

Each case's arrays go back to back into OUTDIR/<case>.bin (little-endian raw data); Case.add gives
the {offset, shape, dtype} that the manifest records for an array. Floats are stored as float32
(float64, float16 and bfloat16 are converted), other dtypes as they are. write_manifest writes
OUTDIR/manifest.json atomically (a temp file renamed over it), so a generator that dies halfway
leaves no manifest that the tests would take as current.
"""
import json
import os

import numpy as np


class Case:
    """Arrays of one case, written to one .bin file in outdir."""

    def __init__(self, outdir, name):
        self.outdir = outdir
        self.name = name
        self.parts = []
        self.offset = 0

    def add(self, a):
        a = np.ascontiguousarray(np.asarray(a))
        if a.dtype != np.float32 and (a.dtype.kind == "f" or a.dtype.name == "bfloat16"):
            a = a.astype(np.float32)
        b = a.astype(a.dtype.newbyteorder("<")).tobytes()
        ref = {"offset": self.offset, "shape": list(a.shape), "dtype": str(a.dtype)}
        self.parts.append(b)
        self.offset += len(b)
        return ref

    def write(self):
        with open(os.path.join(self.outdir, self.name + ".bin"), "wb") as f:
            for p in self.parts:
                f.write(p)


def write_manifest(outdir, manifest):
    tmp = os.path.join(outdir, "manifest.json.tmp")
    with open(tmp, "w") as f:
        json.dump(manifest, f, indent=1)
    os.replace(tmp, os.path.join(outdir, "manifest.json"))
