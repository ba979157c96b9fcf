"""Reference data for flower.nn, computed by Keras (tf-keras) itself.

Usage: .venv/bin/python tests/reference/gen_layers.py OUTDIR   (the Lua tests pass build/ref/layers)

For every layer case: seeded random inputs and weights, the layer's output, and with a fixed random
upstream gradient gy (loss = sum(y * gy), tf.GradientTape) the gradients for the inputs and the
trainable weights; BatchNormalization training cases also record the moving statistics after the
step. Further sections: losses and metrics, optimizer steps (SGD, momentum, Nesterov, Adam, weight
decay, gradient clipping), learning-rate schedules, and model.summary() texts.

Output: OUTDIR/manifest.json and one OUTDIR/<case>.bin per case holding its arrays back to back
(little-endian raw data); the manifest gives each array as {offset, shape, dtype} in that file, plus
the versions of TensorFlow/tf-keras/numpy and the seed used.
"""
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
import tf_keras as keras  # noqa: E402
from refcase import Case, write_manifest  # noqa: E402

SEED = 20240611
OUT = sys.argv[1] if len(sys.argv) > 1 else "build/ref/layers"
rng = np.random.default_rng(SEED)


manifest = {
    "versions": {"tensorflow": tf.__version__, "tf_keras": keras.__version__, "numpy": np.__version__},
    "seed": SEED,
    "layers": [],
    "losses": [],
    "metrics": [],
    "optimizers": [],
    "schedules": [],
    "summaries": [],
}


def rnd(*shape, scale=1.0):
    return (rng.standard_normal(shape) * scale).astype(np.float32)


def weights_for(layer):
    """Seeded weights in Keras order; BatchNorm statistics kept realistic (variance > 0)."""
    ws = []
    for w in layer.weights:
        n = w.name.split("/")[-1].split(":")[0]
        shape = tuple(w.shape)
        if n == "moving_variance":
            ws.append(rng.uniform(0.5, 1.5, shape).astype(np.float32))
        elif n == "gamma":
            ws.append(rng.uniform(0.5, 1.5, shape).astype(np.float32))
        elif n == "moving_mean":
            ws.append(rnd(*shape, scale=0.3))
        else:
            ws.append(rnd(*shape, scale=0.5))
    return ws


def layer_case(name, cls, config, input_shapes, training=False, trainable=True, flower_class=None,
               flower_config=None, keras_layer=None, input_scale=1.0):
    """One layer case. input_shapes include the batch dim; several inputs for merge layers."""
    layer = keras_layer if keras_layer is not None else getattr(keras.layers, cls)(**config)
    xs = [rnd(*s, scale=input_scale) for s in input_shapes]
    if cls == "Preprocess":
        xs = [rng.uniform(0, 255, s).astype(np.float32) for s in input_shapes]
    tx = [tf.constant(x) for x in xs]
    arg = tx if len(tx) > 1 else tx[0]
    layer(arg)  # build
    ws = weights_for(layer)
    if ws:
        layer.set_weights(ws)
    layer.trainable = trainable
    y0 = layer(arg, training=training) if not hasattr(layer, "_is_preprocess") else layer(arg)
    gy = rnd(*y0.shape)
    # restore the moving statistics the shape-probing call above may have changed
    if ws:
        layer.set_weights(ws)
    with tf.GradientTape() as tape:
        tape.watch(tx)
        y = layer(arg, training=training)
        loss = tf.reduce_sum(y * gy)
        if layer.losses:
            loss = loss + tf.add_n(layer.losses)
    tw = layer.trainable_weights
    grads = tape.gradient(loss, tx + list(tw))
    c = Case(OUT, name)
    entry = {
        "name": name,
        "class": flower_class or cls,
        "config": flower_config if flower_config is not None else json_config(config),
        "training": training,
        "trainable": trainable,
        "inputs": [c.add(x) for x in xs],
        "weight_names": [w.name.split("/")[-1].split(":")[0] for w in layer.weights],
        "weights": [c.add(w) for w in ws],
        "gy": c.add(gy),
        "y": c.add(y.numpy()),
        "gx": [c.add(g.numpy()) for g in grads[: len(tx)]],
        "trainable_names": [w.name.split("/")[-1].split(":")[0] for w in tw],
        "gw": [c.add(g.numpy()) for g in grads[len(tx):]],
        "weights_after": [c.add(w.numpy()) for w in layer.weights],
        "reg_loss": float(tf.add_n(layer.losses).numpy()) if layer.losses else 0.0,
    }
    c.write()
    manifest["layers"].append(entry)


def json_config(cfg):
    def conv(v):
        if isinstance(v, tuple):
            return [conv(x) for x in v]
        if isinstance(v, list):
            return [conv(x) for x in v]
        return v
    return {k: conv(v) for k, v in cfg.items() if k not in ("kernel_regularizer",)}


class LambdaScale(keras.layers.Layer):
    def __init__(self, scale, **kw):
        super().__init__(**kw)
        self.scale = scale

    def call(self, x):
        return x * self.scale


class LambdaScaledAdd(keras.layers.Layer):
    def __init__(self, scale, **kw):
        super().__init__(**kw)
        self.scale = scale

    def call(self, xs):
        return xs[0] + self.scale * xs[1]


class PreprocessLayer(keras.layers.Layer):
    _is_preprocess = True

    def __init__(self, mode, **kw):
        super().__init__(**kw)
        self.mode = mode

    def call(self, x):
        return keras.applications.imagenet_utils.preprocess_input(x, mode=self.mode)


def gen_layers():
    L = layer_case
    # Conv2D: strides 1 and 2, both paddings, odd/even sizes, rectangular kernels, dilation, bias
    L("conv_3x3_s1_same_bias", "Conv2D", dict(filters=4, kernel_size=3, padding="same"), [(2, 7, 6, 3)])
    L("conv_3x3_s2_same_even", "Conv2D", dict(filters=5, kernel_size=3, strides=2, padding="same", use_bias=False),
      [(2, 8, 8, 3)])
    L("conv_3x3_s2_valid", "Conv2D", dict(filters=4, kernel_size=3, strides=2, padding="valid"), [(2, 9, 7, 3)])
    L("conv_1x1_s1", "Conv2D", dict(filters=5, kernel_size=1), [(2, 5, 4, 6)])
    L("conv_1x1_s2_same", "Conv2D", dict(filters=3, kernel_size=1, strides=2, padding="same"), [(2, 7, 7, 4)])
    L("conv_7x7_s2_same", "Conv2D", dict(filters=4, kernel_size=7, strides=2, padding="same"), [(2, 11, 10, 3)])
    L("conv_1x7_same", "Conv2D", dict(filters=3, kernel_size=(1, 7), padding="same", use_bias=False), [(2, 6, 9, 4)])
    L("conv_7x1_same", "Conv2D", dict(filters=3, kernel_size=(7, 1), padding="same", use_bias=False), [(2, 9, 6, 4)])
    L("conv_5x3_s21_valid", "Conv2D", dict(filters=3, kernel_size=(5, 3), strides=(2, 1)), [(1, 11, 8, 2)])
    L("conv_3x3_dil2_same", "Conv2D", dict(filters=3, kernel_size=3, dilation_rate=2, padding="same"), [(2, 9, 8, 2)])
    L("conv_relu", "Conv2D", dict(filters=4, kernel_size=3, padding="same", activation="relu"), [(2, 6, 6, 3)])
    L("conv_sigmoid", "Conv2D", dict(filters=2, kernel_size=2, activation="sigmoid"), [(2, 5, 5, 2)])
    L("conv_frozen", "Conv2D", dict(filters=4, kernel_size=3, padding="same"), [(2, 6, 5, 3)], trainable=False)
    L("conv_l2", "Conv2D", dict(filters=3, kernel_size=3, kernel_regularizer=keras.regularizers.l2(0.01)),
      [(2, 5, 5, 2)], flower_config={"filters": 3, "kernel_size": 3, "kernel_regularizer": {"l2": 0.01}})
    # DepthwiseConv2D / SeparableConv2D
    L("depthwise_3x3_s1_same", "DepthwiseConv2D", dict(kernel_size=3, padding="same"), [(2, 7, 6, 5)])
    L("depthwise_3x3_s2_same_m2", "DepthwiseConv2D",
      dict(kernel_size=3, strides=2, padding="same", depth_multiplier=2, use_bias=False), [(2, 8, 7, 3)])
    L("depthwise_5x5_valid", "DepthwiseConv2D", dict(kernel_size=5), [(1, 9, 9, 2)])
    L("separable_3x3_same_nobias", "SeparableConv2D",
      dict(filters=5, kernel_size=3, padding="same", use_bias=False), [(2, 7, 6, 4)])
    L("separable_3x3_s2_bias_m2", "SeparableConv2D",
      dict(filters=3, kernel_size=3, strides=2, padding="same", depth_multiplier=2), [(2, 8, 8, 3)])
    # BatchNormalization: training and inference, scale/center off, frozen, 2-d input, other eps
    L("bn_train", "BatchNormalization", dict(), [(3, 4, 5, 6)], training=True, input_scale=2.0)
    L("bn_infer", "BatchNormalization", dict(), [(3, 4, 5, 6)], training=False)
    L("bn_train_noscale", "BatchNormalization", dict(scale=False), [(2, 5, 4, 3)], training=True)
    L("bn_infer_noscale", "BatchNormalization", dict(scale=False), [(2, 5, 4, 3)], training=False)
    L("bn_train_nocenter", "BatchNormalization", dict(center=False), [(2, 3, 3, 4)], training=True)
    L("bn_frozen_training", "BatchNormalization", dict(), [(2, 4, 4, 3)], training=True, trainable=False)
    L("bn_train_2d_eps_mom", "BatchNormalization", dict(epsilon=1.001e-5, momentum=0.9), [(8, 5)], training=True)
    # activations
    for a in ("relu", "sigmoid", "tanh", "softmax", "linear"):
        L("activation_" + a, "Activation", dict(activation=a), [(2, 3, 3, 4)])
    L("relu_layer", "ReLU", dict(), [(2, 7)])
    # pooling
    L("maxpool_3_s2_same_even", "MaxPooling2D", dict(pool_size=3, strides=2, padding="same"), [(2, 8, 8, 3)])
    L("maxpool_3_s2_valid", "MaxPooling2D", dict(pool_size=3, strides=2), [(2, 9, 7, 3)])
    L("maxpool_2", "MaxPooling2D", dict(pool_size=2), [(2, 6, 5, 2)])
    L("maxpool_3_s1_same", "MaxPooling2D", dict(pool_size=3, strides=1, padding="same"), [(2, 5, 6, 2)])
    L("avgpool_3_s1_same", "AveragePooling2D", dict(pool_size=3, strides=1, padding="same"), [(2, 5, 6, 3)])
    L("avgpool_3_s2_valid", "AveragePooling2D", dict(pool_size=3, strides=2), [(2, 9, 8, 2)])
    L("avgpool_2_same_odd", "AveragePooling2D", dict(pool_size=2, padding="same"), [(2, 7, 5, 2)])
    L("gap", "GlobalAveragePooling2D", dict(), [(2, 5, 4, 6)])
    L("gap_keepdims", "GlobalAveragePooling2D", dict(keepdims=True), [(2, 3, 4, 2)])
    L("gmp", "GlobalMaxPooling2D", dict(), [(2, 5, 4, 6)])
    # Dense, Flatten, Reshape
    L("dense_relu", "Dense", dict(units=5, activation="relu"), [(4, 7)])
    L("dense_softmax", "Dense", dict(units=6, activation="softmax"), [(3, 4)])
    L("dense_linear_nobias", "Dense", dict(units=3, use_bias=False), [(2, 8)])
    L("dense_rank3", "Dense", dict(units=4), [(2, 3, 5)])
    L("dense_l2", "Dense", dict(units=3, kernel_regularizer=keras.regularizers.l2(0.05)), [(4, 5)],
      flower_config={"units": 3, "kernel_regularizer": {"l2": 0.05}})
    L("dense_frozen", "Dense", dict(units=3), [(2, 4)], trainable=False)
    L("flatten", "Flatten", dict(), [(2, 3, 4, 5)])
    L("reshape", "Reshape", dict(target_shape=(6, -1)), [(2, 3, 4, 2)])
    # merges
    L("concat_3", "Concatenate", dict(axis=-1), [(2, 4, 3, 2), (2, 4, 3, 5), (2, 4, 3, 1)])
    L("concat_axis1", "Concatenate", dict(axis=1), [(2, 2, 3), (2, 4, 3)])
    L("add_2", "Add", dict(), [(2, 4, 3, 2), (2, 4, 3, 2)])
    L("add_3", "Add", dict(), [(2, 5), (2, 5), (2, 5)])
    L("zeropad_asym", "ZeroPadding2D", dict(padding=((1, 2), (3, 0))), [(2, 4, 3, 2)])
    L("zeropad_3", "ZeroPadding2D", dict(padding=3), [(1, 2, 3, 2)])
    L("scale", "Scale", {}, [(2, 3, 3, 4)], keras_layer=LambdaScale(0.17), flower_config={"scale": 0.17})
    L("scaled_add", "ScaledAdd", {}, [(2, 3, 3, 4), (2, 3, 3, 4)], keras_layer=LambdaScaledAdd(0.1),
      flower_config={"scale": 0.1})
    for mode in ("caffe", "tf", "torch"):
        L("preprocess_" + mode, "Preprocess", {}, [(2, 3, 4, 3)], keras_layer=PreprocessLayer(mode),
          flower_config={"mode": mode})


def gen_losses():
    n, k = 6, 5
    logits = rnd(n, k, scale=2.0)
    labels = rng.integers(0, k, n)
    onehot = np.eye(k, dtype=np.float32)[labels]
    soft = rng.uniform(0, 1, (n, k)).astype(np.float32)
    soft /= soft.sum(1, keepdims=True)
    probs = tf.nn.softmax(logits).numpy()
    cases = [
        ("cce_logits_onehot", True, 0.0, logits, onehot),
        ("cce_logits_smooth", True, 0.1, logits, onehot),
        ("cce_logits_soft", True, 0.0, logits, soft),
        ("cce_probs_onehot", False, 0.0, probs, onehot),
        ("cce_probs_smooth", False, 0.2, probs, onehot),
    ]
    for name, from_logits, ls, out, tgt in cases:
        loss_fn = keras.losses.CategoricalCrossentropy(from_logits=from_logits, label_smoothing=ls)
        t_out = tf.constant(out)
        with tf.GradientTape() as tape:
            tape.watch(t_out)
            loss = loss_fn(tf.constant(tgt), t_out)
        g = tape.gradient(loss, t_out)
        c = Case(OUT, "loss_" + name)
        manifest["losses"].append({"name": name, "from_logits": from_logits, "label_smoothing": ls,
                                   "output": c.add(out), "target": c.add(tgt), "loss": float(loss.numpy()),
                                   "grad": c.add(g.numpy()), "labels": None})
        c.write()
    for name, from_logits, out in (("sparse_logits", True, logits), ("sparse_probs", False, probs)):
        loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=from_logits)
        t_out = tf.constant(out)
        with tf.GradientTape() as tape:
            tape.watch(t_out)
            loss = loss_fn(tf.constant(labels), t_out)
        g = tape.gradient(loss, t_out)
        c = Case(OUT, "loss_" + name)
        manifest["losses"].append({"name": name, "from_logits": from_logits, "label_smoothing": 0.0,
                                   "output": c.add(out), "labels": c.add(labels.astype(np.int64) + 1),
                                   "target": None, "loss": float(loss.numpy()), "grad": c.add(g.numpy())})
        c.write()
    # metrics (with a tie straddling the top-k boundary in row 1)
    scores = rnd(8, 6)
    scores[1, :] = [0.5, 0.1, 0.5, 0.5, -1.0, 0.2]
    lab = rng.integers(0, 6, 8)
    lab[1] = 3
    acc = keras.metrics.sparse_categorical_accuracy(lab, scores).numpy().mean()
    c = Case(OUT, "metrics")
    entry = {"scores": c.add(scores), "labels": c.add(lab.astype(np.int64) + 1), "accuracy": float(acc), "top_k": {}}
    for kk in (1, 2, 3):
        entry["top_k"][str(kk)] = float(
            keras.metrics.sparse_top_k_categorical_accuracy(lab, scores, k=kk).numpy().mean())
    c.write()
    manifest["metrics"].append(entry)


def gen_optimizers():
    steps = 5
    shapes = [(3, 4), (5,)]
    w0 = [rnd(*s) for s in shapes]
    gs = [[rnd(*s) for s in shapes] for _ in range(steps)]
    O = keras.optimizers
    cases = [
        ("sgd", O.SGD(learning_rate=0.1), {"kind": "SGD", "lr": 0.1}),
        ("sgd_momentum", O.SGD(learning_rate=0.05, momentum=0.9), {"kind": "SGD", "lr": 0.05, "momentum": 0.9}),
        ("sgd_nesterov", O.SGD(learning_rate=0.05, momentum=0.8, nesterov=True),
         {"kind": "SGD", "lr": 0.05, "momentum": 0.8, "nesterov": True}),
        ("adam_defaults", O.Adam(), {"kind": "Adam"}),
        ("adam_lr", O.Adam(learning_rate=0.01, beta_1=0.8, beta_2=0.99, epsilon=1e-5),
         {"kind": "Adam", "lr": 0.01, "beta_1": 0.8, "beta_2": 0.99, "epsilon": 1e-5}),
        ("sgd_weight_decay", O.SGD(learning_rate=0.1, momentum=0.9, weight_decay=0.01),
         {"kind": "SGD", "lr": 0.1, "momentum": 0.9, "weight_decay": 0.01}),
        ("adamw", O.AdamW(learning_rate=0.01, weight_decay=0.05),
         {"kind": "Adam", "lr": 0.01, "weight_decay": 0.05}),
        ("sgd_clipnorm", O.SGD(learning_rate=0.1, clipnorm=0.5), {"kind": "SGD", "lr": 0.1, "clipnorm": 0.5}),
        ("adam_global_clipnorm", O.Adam(learning_rate=0.01, global_clipnorm=1.0),
         {"kind": "Adam", "lr": 0.01, "global_clipnorm": 1.0}),
    ]
    for name, opt, cfg in cases:
        vs = [tf.Variable(w) for w in w0]
        c = Case(OUT, "opt_" + name)
        after = []
        for s in range(steps):
            opt.apply_gradients(zip([tf.constant(g) for g in gs[s]], vs))
            after.append([c.add(v.numpy()) for v in vs])
        manifest["optimizers"].append({"name": name, "config": cfg, "w0": [c.add(w) for w in w0],
                                       "grads": [[c.add(g) for g in gstep] for gstep in gs], "after": after})
        c.write()


def gen_schedules():
    S = keras.optimizers.schedules
    cos = S.CosineDecay(0.1, decay_steps=10, alpha=0.1)
    pw = S.PiecewiseConstantDecay([3, 7], [0.1, 0.01, 0.001])
    ex = S.ExponentialDecay(0.1, decay_steps=4, decay_rate=0.5, staircase=True)
    steps = list(range(0, 14))
    manifest["schedules"] = [
        {"kind": "cosine", "config": {"lr": 0.1, "decay_steps": 10, "alpha": 0.1},
         "values": [float(cos(s).numpy()) for s in steps]},
        {"kind": "piecewise", "config": {"boundaries": [3, 7], "values": [0.1, 0.01, 0.001]},
         "values": [float(pw(s).numpy()) for s in steps]},
        {"kind": "step", "config": {"lr": 0.1, "decay_steps": 4, "decay_rate": 0.5},
         "values": [float(ex(s).numpy()) for s in steps]},
    ]


def gen_plateau():
    """Keras's ReduceLROnPlateau callback on a metric sequence: the lr after each epoch."""
    m = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    m.compile(optimizer=keras.optimizers.SGD(learning_rate=1.0), loss="mse")
    cfg = {"factor": 0.5, "patience": 2, "cooldown": 1, "min_lr": 0.2, "min_delta": 1e-4}
    cb = keras.callbacks.ReduceLROnPlateau(monitor="val_loss", **cfg)
    cb.set_model(m)
    cb.on_train_begin()
    metrics = [1.0, 0.9, 0.95, 0.9, 0.89995, 0.91, 0.92, 0.93, 0.94, 0.95, 0.96, 0.5, 0.6, 0.7, 0.8]
    lrs = []
    for e, v in enumerate(metrics):
        cb.on_epoch_end(e, {"val_loss": v})
        lrs.append(float(keras.backend.get_value(m.optimizer.learning_rate)))
    manifest["plateau"] = {"config": cfg, "metrics": metrics, "lr": lrs}


def gen_summaries():
    lines = []
    x = keras.Input((9, 9, 3), name="input_1")
    y = keras.layers.Conv2D(4, 3, padding="same", use_bias=False, name="conv1")(x)
    y = keras.layers.BatchNormalization(name="bn1")(y)
    y = keras.layers.Activation("relu", name="act1")(y)
    s = keras.layers.Conv2D(4, 1, strides=2, name="short")(x)
    p = keras.layers.MaxPooling2D(3, strides=2, padding="same", name="max_pooling2d")(y)
    a = keras.layers.Add(name="add")([p, s])
    c = keras.layers.Concatenate(name="concatenate")([a, s])
    g = keras.layers.GlobalAveragePooling2D(name="global_average_pooling2d")(c)
    o = keras.layers.Dense(5, activation="softmax", name="predictions")(g)
    m = keras.Model(x, o, name="tiny")
    m.get_layer("short").trainable = False
    m.summary(print_fn=lines.append)
    manifest["summaries"].append({"name": "functional", "text": "\n".join(lines)})
    lines = []
    seq = keras.Sequential([keras.Input((8,), name="input_2"), keras.layers.Dense(4, name="dense_a"),
                            keras.layers.ReLU(name="relu_a"), keras.layers.Dense(3, name="dense_b")], name="seq")
    seq.summary(print_fn=lines.append)
    manifest["summaries"].append({"name": "sequential", "text": "\n".join(lines)})


def main():
    os.makedirs(OUT, exist_ok=True)
    tf.random.set_seed(SEED)
    gen_layers()
    gen_losses()
    gen_optimizers()
    gen_schedules()
    gen_plateau()
    gen_summaries()
    write_manifest(OUT, manifest)
    print("gen_layers: wrote %d layer cases, %d losses, %d optimizers to %s" % (
        len(manifest["layers"]), len(manifest["losses"]), len(manifest["optimizers"]), OUT))


if __name__ == "__main__":
    main()
