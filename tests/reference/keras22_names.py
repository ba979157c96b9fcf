"""Rewrites a Keras 2 weight file (tf-keras save_weights, or flowerlua's keras.save_weights) as
standalone (multi-backend) Keras 2.2.4 would have written the same model in a fresh session.

  keras22_names.py IN OUT

Standalone Keras 1.x/2.x numbers unnamed layers per class prefix from 1 (conv2d_1, conv2d_2, ...;
K `keras/backend/tensorflow_backend.py` get_uid starts at 1), tf.keras from none (conv2d,
conv2d_1, ...; K `keras/backend.py` unique_object_name(zero_based=True)). So every automatic name
`<prefix>[_k]` (prefixes of the classes Keras auto-names) moves up by one, everywhere it appears:
the root's `layer_names`, the group names, each group's `weight_names` (`conv2d_1/kernel:0`) and
the datasets they point at (`/conv2d_1/conv2d_1/kernel:0`, K `engine/saving.py`@2.2.4
save_weights_to_hdf5_group). The root gets keras_version '2.2.4' and backend 'tensorflow', as
2.2.4 writes them (bytes attributes). Data is copied unchanged as '<f4', contiguous.
"""
import os
import re
import sys

import h5py
import numpy as np

AUTO = ("conv2d|batch_normalization|dense|separable_conv2d|depthwise_conv2d|activation|max_pooling2d|"
        "average_pooling2d|global_average_pooling2d|global_max_pooling2d|dropout|add|concatenate|zero_padding2d|"
        "flatten|reshape")   # not input: input_1 is one-based in tf.keras too
NAME = re.compile(r"^(%s)(?:_(\d+))?$" % AUTO)


def one_based(name):
    m = NAME.match(name)
    if not m:
        return name
    return "%s_%d" % (m.group(1), int(m.group(2) or 0) + 1)


def rename_path(path):
    """'conv2d/kernel:0' -> 'conv2d_1/kernel:0' (each path component that is an automatic name)."""
    return "/".join(one_based(p) for p in path.split("/"))


def fixed(names):
    width = max([len(n) for n in names] + [1])
    return np.array([n.encode("utf8") for n in names], dtype="S%d" % width)


def names_of(attrs, key):
    v = attrs[key]
    return [x.decode("utf8") if isinstance(x, bytes) else str(x) for x in v]


def main(src, dst):
    tmp = dst + ".tmp"
    with h5py.File(src, "r") as fin, h5py.File(tmp, "w") as fout:
        layers = names_of(fin.attrs, "layer_names")
        fout.attrs["layer_names"] = fixed([one_based(n) for n in layers])
        fout.attrs["backend"] = np.bytes_("tensorflow")
        fout.attrs["keras_version"] = np.bytes_("2.2.4")
        for name in layers:
            gin = fin[name]
            new = one_based(name)
            gout = fout.create_group(new)
            wn = names_of(gin.attrs, "weight_names") if len(gin.attrs["weight_names"]) else []
            gout.attrs["weight_names"] = fixed([rename_path(w) for w in wn]) if wn else np.array([])  # Keras writes [] (float64, empty)
            for w in wn:
                gout.create_dataset(rename_path(w), data=np.asarray(gin[w], dtype="<f4"))
    os.replace(tmp, dst)


if __name__ == "__main__":
    if len(sys.argv) != 3:
        raise SystemExit(__doc__)
    main(sys.argv[1], sys.argv[2])
