"""Reference for bfloat16 mixed precision, computed by Keras (tf-keras) under its 'mixed_bfloat16'
policy: a small Conv2D + BatchNormalization + ReLU + strided Conv2D + BatchNormalization +
GlobalAveragePooling2D + Dense model with seeded random weights.

Usage: .venv/bin/python tests/reference/gen_mixed.py OUTDIR   (tests/lua/test_mixed_precision.lua
passes build/ref/mixed)

Records the input, the inference output under the mixed policy and under float32 (the same
weights), a training-mode forward and, with a fixed random upstream gradient gy (loss =
sum(y * gy), tf.GradientTape), the gradients of the input and of every trainable weight, the moving
statistics after that step, and the dtypes of the model's variables (float32 under the policy).
The model's output is cast to float32 (as flowerlua's model:forward does at its exit).

Output: OUTDIR/manifest.json and OUTDIR/<case>.bin with the arrays back to back (little-endian raw
data), each given in the manifest as {offset, shape, dtype}; the manifest also holds the versions
of TensorFlow/tf-keras/numpy and the seed. The layout is gen_layers.py's (tests/lua/nn_ref.lua
reads both).
"""
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
import tf_keras as keras  # noqa: E402
from refcase import Case, write_manifest  # noqa: E402

SEED = 20250127
OUT = sys.argv[1] if len(sys.argv) > 1 else "build/ref/mixed"
rng = np.random.default_rng(SEED)


def build(policy):
    keras.mixed_precision.set_global_policy(policy)
    x = keras.Input((8, 8, 3))
    y = keras.layers.Conv2D(8, 3, padding="same", name="conv")(x)
    y = keras.layers.BatchNormalization(name="bn")(y)
    y = keras.layers.ReLU(name="relu")(y)
    y = keras.layers.Conv2D(8, 3, strides=2, padding="same", name="conv2")(y)
    y = keras.layers.BatchNormalization(name="bn2")(y)
    y = keras.layers.GlobalAveragePooling2D(name="gap")(y)
    y = keras.layers.Dense(4, name="dense")(y)
    m = keras.Model(x, y)
    keras.mixed_precision.set_global_policy("float32")
    return m


def main():
    os.makedirs(OUT, exist_ok=True)
    tf.random.set_seed(SEED)
    mixed, f32 = build("mixed_bfloat16"), build("float32")
    # seeded weights: kernels ~ N(0, 1/fan_in), biases small, BatchNorm statistics away from 0/1
    weights = {}
    for layer in mixed.layers:
        ws = []
        for w in layer.weights:
            short = w.name.split("/")[-1].split(":")[0]
            shape = tuple(w.shape)
            if short == "kernel":
                fan_in = int(np.prod(shape[:-1]))
                v = rng.standard_normal(shape) / np.sqrt(fan_in)
            elif short in ("bias", "beta", "moving_mean"):
                v = 0.3 * rng.standard_normal(shape)
            elif short == "gamma":
                v = rng.uniform(0.5, 1.5, shape)
            elif short == "moving_variance":
                v = rng.uniform(0.5, 2.0, shape)
            else:
                raise SystemExit(f"unexpected weight {w.name}")
            ws.append(v.astype(np.float32))
        if ws:
            weights[layer.name] = ws
            layer.set_weights(ws)
            f32.get_layer(layer.name).set_weights(ws)

    case = Case(OUT, "conv_bn_dense")
    x = rng.standard_normal((4, 8, 8, 3)).astype(np.float32)
    gy = rng.standard_normal((4, 4)).astype(np.float32)
    entry = {"name": case.name, "x": case.add(x), "gy": case.add(gy)}
    entry["weights"] = {name: [case.add(w) for w in ws] for name, ws in weights.items()}
    entry["y_infer_mixed"] = case.add(tf.cast(mixed(x, training=False), tf.float32).numpy())
    entry["y_infer_f32"] = case.add(f32(x, training=False).numpy())

    xv = tf.constant(x)
    with tf.GradientTape() as tape:
        tape.watch(xv)
        y = tf.cast(mixed(xv, training=True), tf.float32)
        loss = tf.reduce_sum(y * gy)
    tvars = mixed.trainable_weights
    grads = tape.gradient(loss, [xv] + tvars)
    entry["y_train_mixed"] = case.add(y.numpy())
    entry["gx_mixed"] = case.add(grads[0].numpy())
    entry["grads"] = []
    for v, g in zip(tvars, grads[1:]):
        path = "/".join(v.name.split(":")[0].split("/")[-2:])
        entry["grads"].append({"path": path, "value": case.add(tf.cast(g, tf.float32).numpy())})
    entry["moving"] = []
    for name in ("bn", "bn2"):
        bn = mixed.get_layer(name)
        entry["moving"].append({"layer": name, "name": "moving_mean", "value": case.add(bn.moving_mean.numpy())})
        entry["moving"].append({"layer": name, "name": "moving_variance", "value": case.add(bn.moving_variance.numpy())})
    entry["variable_dtypes"] = [v.dtype.name for v in mixed.weights]
    entry["output_dtype_under_policy"] = mixed.outputs[0].dtype.name
    case.write()

    manifest = {
        "versions": {"tensorflow": tf.__version__, "tf_keras": keras.__version__, "numpy": np.__version__},
        "seed": SEED,
        "policy": "mixed_bfloat16",
        "cases": [entry],
    }
    write_manifest(OUT, manifest)


if __name__ == "__main__":
    main()
