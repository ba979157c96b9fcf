"""Whole-model Keras files for flower.keras.load_model (tests/lua/test_keras_files.lua).

  gen_keras_files.py OUTDIR

Real Keras writes each file with `model.save(path.h5)`: tf-keras (the Keras 2 line, `tf2_*`) and
Keras 3 (its legacy .h5 format, `k3_*`). For every model, OUTDIR/<file>_io.h5 holds an input `x`
and Keras's prediction `y` (inference mode), so flowerlua must predict the same.

  seq       Sequential: InputLayer, Conv2D (stride 2, same, relu, bias), BatchNormalization,
            MaxPooling2D, DepthwiseConv2D, SeparableConv2D, AveragePooling2D same,
            Flatten, Dropout, Dense softmax
  seqdense  Sequential without an explicit InputLayer: Dense on a rank-3 input (applies to the
            last axis), Activation, Flatten, Dense
  nested    Functional with a Functional base model used as a layer (conv, BN, conv, GAP) + Dense
  func      Functional: ZeroPadding2D, Conv2D without bias, BatchNormalization(scale=False, axis=3),
            ReLU branches joined by Concatenate and Add, GlobalMaxPooling2D + GlobalAveragePooling2D
            concatenated, Dense sigmoid
  unsupported  a Functional model with Conv2DTranspose (flowerlua must refuse it by name)
Also `tf2_seq_weights.h5`: the seq model's `save_weights` (weights only, Keras 2 layout).
"""
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import h5py
import numpy as np

SEED = 777


def build(K, kind):
    L = K.layers
    if kind == "seq":
        return K.Sequential([
            L.InputLayer(**{("shape" if K.__name__ == "keras" else "input_shape"): (15, 13, 3)}),
            L.Conv2D(8, 3, strides=2, padding="same", activation="relu", name="c1"),
            L.BatchNormalization(name="bn1"),
            L.MaxPooling2D(2, strides=1, name="mp"),
            L.DepthwiseConv2D(3, padding="same", depth_multiplier=2, name="dw"),
            L.SeparableConv2D(12, 3, padding="valid", activation="relu", name="sep"),
            L.AveragePooling2D(2, padding="same", name="ap"),
            L.Flatten(name="flat"),
            L.Dropout(0.3, name="drop"),
            L.Dense(10, activation="softmax", name="out"),
        ], name="seq")
    if kind == "seqdense":
        return K.Sequential([
            L.Dense(4, activation="tanh", input_shape=(6, 5), name="d1"),
            L.Activation("relu", name="act"),
            L.Flatten(name="flat"),
            L.Dense(3, name="d2"),
        ], name="seqdense")
    if kind == "func":
        inp = K.Input((17, 16, 4), name="img")
        x = L.ZeroPadding2D(((1, 2), (0, 1)), name="pad")(inp)
        x = L.Conv2D(6, 3, use_bias=False, name="stem")(x)
        x = L.BatchNormalization(axis=3, scale=False, epsilon=1.001e-5, name="stem_bn")(x)
        x = L.Activation("relu", name="stem_relu")(x)
        a = L.Conv2D(5, 1, activation="relu", name="b_a")(x)
        b = L.Conv2D(7, (1, 3), padding="same", activation="relu", name="b_b")(x)
        c = L.Concatenate(name="cat")([b, a])
        p = L.Conv2D(12, 1, name="proj")(x)
        s = L.Add(name="add")([p, c])
        g1 = L.GlobalMaxPooling2D(name="gmp")(s)
        g2 = L.GlobalAveragePooling2D(name="gap")(s)
        g = L.Concatenate(name="cat2")([g2, g1])
        out = L.Dense(4, activation="sigmoid", name="head")(g)
        return K.Model(inp, out, name="func")
    if kind == "nested":
        # a base model used as a layer, as in transfer learning: Keras stores it as one group
        # whose weights are its trainable weights followed by its non-trainable ones
        bin_ = K.Input((9, 9, 3), name="base_in")
        b = L.Conv2D(4, 3, name="base_conv")(bin_)
        b = L.BatchNormalization(name="base_bn")(b)
        b = L.Activation("relu", name="base_relu")(b)
        b = L.Conv2D(5, 1, name="base_conv2")(b)
        b = L.GlobalAveragePooling2D(name="base_gap")(b)
        base = K.Model(bin_, b, name="base")
        inp = K.Input((9, 9, 3), name="img")
        out = L.Dense(3, activation="softmax", name="head")(base(inp))
        return K.Model(inp, out, name="nested")
    if kind == "unsupported":
        inp = K.Input((5, 5, 2))
        x = L.Conv2DTranspose(3, 3, name="deconv")(inp)
        return K.Model(inp, L.Flatten()(x))
    raise ValueError(kind)


def randomize(model, rng):
    for l in model.layers:
        ws = l.get_weights()
        if not ws:
            continue
        new = []
        for v, w in zip(l.weights, ws):
            n = v.name.split("/")[-1]
            if "moving_variance" in n:
                new.append(rng.uniform(0.5, 2.0, w.shape))
            elif "gamma" in n:
                new.append(rng.uniform(0.5, 1.5, w.shape))
            elif "kernel" in n:     # fan-in scaled, so that softmax/sigmoid outputs stay unsaturated
                fan_in = np.prod(w.shape[:2]) if "depthwise" in n else np.prod(w.shape[:-1])
                new.append(rng.normal(0, 1.0 / np.sqrt(fan_in), w.shape))
            else:
                new.append(rng.normal(0, 0.3, w.shape))
        l.set_weights([a.astype("float32") for a in new])


def save(K, prefix, kind, outdir, rng):
    model = build(K, kind)
    randomize(model, rng)
    path = os.path.join(outdir, "%s_%s.h5" % (prefix, kind))
    model.save(path + ".tmp.h5")
    os.replace(path + ".tmp.h5", path)
    if kind == "unsupported":
        return model
    shape = (3,) + tuple(model.input_shape[1:])
    x = rng.normal(0, 1, shape).astype("float32")
    y = np.asarray(model(x, training=False))
    io = os.path.join(outdir, "%s_%s_io.h5" % (prefix, kind))
    with h5py.File(io + ".tmp", "w") as f:
        f["x"] = x
        f["y"] = y.astype("float32")
        f.attrs["keras"] = K.__version__
        f.attrs["params"] = model.count_params()
    os.replace(io + ".tmp", io)
    return model


def main():
    if len(sys.argv) != 2:
        sys.exit("usage: gen_keras_files.py OUTDIR")
    outdir = sys.argv[1]
    os.makedirs(outdir, exist_ok=True)
    stamp = os.path.join(outdir, "files.stamp")
    if os.path.exists(stamp) and os.path.getmtime(stamp) >= os.path.getmtime(__file__):
        return
    import tf_keras
    import keras
    rng = np.random.default_rng(SEED)
    for prefix, K in (("tf2", tf_keras), ("k3", keras)):
        K.utils.set_random_seed(SEED)
        for kind in ("seq", "seqdense", "func", "nested", "unsupported"):
            m = save(K, prefix, kind, outdir, rng)
            if prefix == "tf2" and kind == "seq":
                p = os.path.join(outdir, "tf2_seq_weights.h5")
                m.save_weights(p + ".tmp.h5")
                os.replace(p + ".tmp.h5", p)
    with open(stamp, "w") as f:
        f.write("tf_keras %s, keras %s\n" % (tf_keras.__version__, keras.__version__))
    print("keras files written to", outdir)


if __name__ == "__main__":
    main()
