"""Keras Applications references for flowerlua's model zoo (tests/lua/test_models_keras.lua).

  gen_keras_models.py OUTDIR [MODEL ...]     MODEL: resnet50 inception_v3 xception inception_resnet_v2

For each model, real Keras (tf-keras, the Keras 2 line that TensorFlow ships) builds the
application with weights=None, include_top=False, pooling='avg' at a reduced input size, fills it
with seeded random weights, sets *realistic* BatchNorm statistics (a training-mode pass with
momentum 0 over calibration images, so every BN normalises what really reaches it), saves it with
Keras's own `save_weights` (a real Keras HDF5 file), and records Keras's pooled features for two
test images. It then derives, from the same weights, the layouts of the standard ImageNet files
that today's Keras can no longer write (see ../shared/specs/keras_applications.md §1-2):

  resnet50_keras1_notop.h5            Keras 1 names (conv1, bn_conv1, res2a_branch2a, ...), flat
                                      `conv1_W:0` datasets, `_running_std` holding the variance,
                                      no keras_version; its features come from a tf-keras build
                                      of the old resnet50.py (epsilon 1e-3, Add([x, shortcut]))
  inception_v3_keras20_notop.h5       Keras 2.0 one-based auto names (conv2d_1 ... conv2d_94)
  xception_keras1_notop.h5            Keras 1 auto names (convolution2d_N,
                                      separableconvolution2d_N, batchnormalization_N), `_W:0`
  inception_resnet_v2_tfslim_notop.h5 TF-slim names (Conv2d_1a_3x3, ..._BatchNorm,
                                      Block35_1_Branch_0_Conv2d_1x1, Block35_1_Conv2d_1x1, ...)

Outputs per model, in OUTDIR: <model>_notop.h5 (tf-keras save_weights), the derived file, for
Xception also xception_top5.h5 (include_top=True, classes=5, same base weights), and
<model>_ref.h5 with `images` (uint8, N x S x S x 3), `inputs` (Keras preprocess_input of them),
`features` (N x F, float32), for ResNet50 also `features_keras1`, for Xception
`predictions_top5`, and attributes: size, preprocess,
versions, seed, notop param counts, `layer_order` (model.layers names in Keras's order) and
`weighted_layers`. A model whose outputs are newer than this script is skipped (cache).
"""
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import h5py
import numpy as np

SEED = 20240
NIMG = 2
MODELS = {
    # name: (tf_keras constructor, reduced input size, preprocess mode)
    "resnet50": ("ResNet50", 97, "caffe"),
    "inception_v3": ("InceptionV3", 139, "tf"),
    "xception": ("Xception", 139, "tf"),
    "inception_resnet_v2": ("InceptionResNetV2", 139, "tf"),
}


def fixed(strings):
    """A list of names as Keras stores it: fixed-length NUL-padded byte strings (float64 [] if empty)."""
    if not strings:
        return np.array([])
    return np.array([s.encode("utf8") for s in strings])


def write_keras_file(path, groups, keras_version=None, backend=None):
    """groups: list of (layer group name, [(dataset path relative to the group, array)]) in Keras's
    layer order, weightless layers included with []. Writes atomically."""
    tmp = path + ".tmp"
    with h5py.File(tmp, "w") as f:
        f.attrs["layer_names"] = fixed([g for g, _ in groups])
        if keras_version is not None:
            f.attrs["keras_version"] = np.bytes_(keras_version)
        if backend is not None:
            f.attrs["backend"] = np.bytes_(backend)
        for gname, ws in groups:
            g = f.create_group(gname)
            g.attrs["weight_names"] = fixed([n for n, _ in ws])
            for n, a in ws:
                g.create_dataset(n, data=np.asarray(a, dtype="<f4"))
    os.replace(tmp, path)


def smooth_images(rng, n, size):
    """Natural-ish images: low-frequency colour fields plus edges and fine noise, uint8."""
    out = np.empty((n, size, size, 3), np.uint8)
    yy, xx = np.mgrid[0:size, 0:size] / size
    for i in range(n):
        img = np.zeros((size, size, 3))
        for _ in range(6):
            fx, fy, ph = rng.uniform(0.5, 6, 2).tolist() + [rng.uniform(0, 6.28)]
            img += rng.uniform(-1, 1, 3) * np.sin(2 * np.pi * (fx * xx + fy * yy) + ph)[..., None]
        img += (xx > rng.uniform(0.2, 0.8))[..., None] * rng.uniform(-1, 1, 3)
        img = 128 + 50 * img + rng.normal(0, 8, img.shape)
        out[i] = np.clip(img, 0, 255).astype(np.uint8)
    return out


class CreationOrder:
    """Records layers in the order their constructors run (Keras 1/2 auto-numbering follows it)."""

    def __enter__(self):
        from tf_keras.src.engine import base_layer
        self.cls, self.orig, self.layers = base_layer.Layer, base_layer.Layer.__init__, []
        rec, orig = self.layers, self.orig

        def init(layer, *a, **k):
            rec.append(layer)
            orig(layer, *a, **k)

        self.cls.__init__ = init
        return self.layers

    def __exit__(self, *exc):
        self.cls.__init__ = self.orig


def randomize(model, rng, calib):
    """Seeded random weights and calibrated BatchNorm statistics."""
    import tf_keras as K
    bns = [l for l in model.layers if isinstance(l, K.layers.BatchNormalization)]
    for l in model.layers:
        ws = []
        for v in l.weights:
            n = v.name.split("/")[-1]
            shp = tuple(v.shape)
            if "kernel" in n:                      # He-normal, so activations keep their scale
                fan_in = np.prod(shp[:-1]) if "depthwise" not in n else np.prod(shp[:2])
                ws.append(rng.normal(0, np.sqrt(2.0 / fan_in), shp))
            elif n.startswith("bias"):
                ws.append(rng.normal(0, 0.1, shp))
            elif n.startswith("gamma"):
                ws.append(rng.uniform(0.6, 1.4, shp))
            elif n.startswith("beta"):
                ws.append(rng.normal(0, 0.2, shp))
            elif n.startswith("moving_mean"):
                ws.append(np.zeros(shp))
            elif n.startswith("moving_variance"):
                ws.append(np.ones(shp))
            else:
                raise SystemExit("unexpected weight " + v.name)
        if ws:
            l.set_weights([w.astype("float32") for w in ws])
    # One training-mode pass with momentum 0: moving statistics := the batch statistics that
    # each BN sees, then perturbed a little so inference differs from training mode.
    for b in bns:
        b.momentum = 0.0
    model(calib, training=True)
    for b in bns:
        b.momentum = 0.99
        w = b.get_weights()
        w[-2] = w[-2] + rng.normal(0, 0.05, w[-2].shape) * np.sqrt(w[-1])
        w[-1] = w[-1] * rng.uniform(0.9, 1.1, w[-1].shape)
        b.set_weights([x.astype("float32") for x in w])


def weighted(model):
    return [l for l in model.layers if l.weights]


def layer_weights(l):
    return [np.array(v.numpy()) for v in l.weights]


# ---------------------------------------------------------------------------- old ResNet50

def resnet50_old(input_shape):
    """keras-applications 1.0.8 resnet50.py (the file of the Keras 1 weights): epsilon 1e-3,
    Add([x, shortcut]), names conv1 / bn_conv1 / res2a_branch2a / bn2a_branch2a / res2a_branch1."""
    from tf_keras import layers, Model

    def block(x, filters, stage, blk, strides, conv_shortcut):
        f1, f2, f3 = filters
        cb, bb = "res%d%s_branch" % (stage, blk), "bn%d%s_branch" % (stage, blk)
        y = layers.Conv2D(f1, 1, strides=strides, name=cb + "2a")(x)
        y = layers.BatchNormalization(axis=3, name=bb + "2a")(y)
        y = layers.Activation("relu")(y)
        y = layers.Conv2D(f2, 3, padding="same", name=cb + "2b")(y)
        y = layers.BatchNormalization(axis=3, name=bb + "2b")(y)
        y = layers.Activation("relu")(y)
        y = layers.Conv2D(f3, 1, name=cb + "2c")(y)
        y = layers.BatchNormalization(axis=3, name=bb + "2c")(y)
        if conv_shortcut:
            s = layers.Conv2D(f3, 1, strides=strides, name=cb + "1")(x)
            s = layers.BatchNormalization(axis=3, name=bb + "1")(s)
        else:
            s = x
        y = layers.add([y, s])
        return layers.Activation("relu")(y)

    inp = layers.Input(input_shape, name="input_1")   # as in a fresh session
    x = layers.ZeroPadding2D(3, name="conv1_pad")(inp)
    x = layers.Conv2D(64, 7, strides=2, padding="valid", name="conv1")(x)
    x = layers.BatchNormalization(axis=3, name="bn_conv1")(x)
    x = layers.Activation("relu")(x)
    x = layers.ZeroPadding2D(1, name="pool1_pad")(x)
    x = layers.MaxPooling2D(3, strides=2)(x)
    for stage, (f, n, s) in zip((2, 3, 4, 5), ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2))):
        for i in range(n):
            x = block(x, (f, f, 4 * f), stage, "abcdef"[i], s if i == 0 else 1, i == 0)
    x = layers.GlobalAveragePooling2D()(x)          # notop, pooling='avg': unnamed in resnet50.py
    return Model(inp, x, name="resnet50")


def resnet50_new_to_old(name):
    """conv{s}_block{i}_{k}_{conv,bn} -> res{s}{a..f}_branch{1,2a,2b,2c} / bn..."""
    if name == "conv1_conv":
        return "conv1"
    if name == "conv1_bn":
        return "bn_conv1"
    st, blk, k, kind = name.split("_")
    s, i = int(st[4:]), int(blk[5:])
    br = {"0": "1", "1": "2a", "2": "2b", "3": "2c"}[k]
    return ("res" if kind == "conv" else "bn") + "%d%s_branch%s" % (s, "abcdef"[i - 1], br)


def keras1_datasets(gname, layer, arrays):
    """Keras 1 dataset names: flat `<layer>_W:0` etc.; BN variance stored as `_running_std`."""
    import tf_keras as K
    if isinstance(layer, K.layers.BatchNormalization):
        suffixes = (["gamma"] if layer.scale else []) + ["beta", "running_mean", "running_std"]
    elif isinstance(layer, K.layers.SeparableConv2D):
        suffixes = ["depthwise_kernel", "pointwise_kernel"] + (["b"] if layer.use_bias else [])
    else:
        suffixes = ["W"] + (["b"] if layer.use_bias else [])
    assert len(suffixes) == len(arrays), gname
    return [("%s_%s:0" % (gname, s), a) for s, a in zip(suffixes, arrays)]


def keras2_datasets(gname, layer, arrays):
    names = [v.name.split("/")[-1] for v in layer.weights]
    return [("%s/%s" % (gname, n if n.endswith(":0") else n + ":0"), a) for n, a in zip(names, arrays)]


# ---------------------------------------------------------------------------- TF-slim IRv2 names

def irv2_tfslim_conv_names():
    """The TF-slim scope of every Conv2D of InceptionResNetV2 in creation order (YH's
    inception_resnet_v2.py joins scopes with '_'); None marks the biased 'up' convolutions,
    whose name is the block's own Conv2d_1x1."""
    n = ["Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "Conv2d_3b_1x1", "Conv2d_4a_3x3"]
    n += ["Mixed_5b_Branch_0_Conv2d_1x1", "Mixed_5b_Branch_1_Conv2d_0a_1x1", "Mixed_5b_Branch_1_Conv2d_0b_5x5",
          "Mixed_5b_Branch_2_Conv2d_0a_1x1", "Mixed_5b_Branch_2_Conv2d_0b_3x3", "Mixed_5b_Branch_2_Conv2d_0c_3x3",
          "Mixed_5b_Branch_3_Conv2d_0b_1x1"]
    blocks = [("Block35", 10, ["Branch_0_Conv2d_1x1", "Branch_1_Conv2d_0a_1x1", "Branch_1_Conv2d_0b_3x3",
                               "Branch_2_Conv2d_0a_1x1", "Branch_2_Conv2d_0b_3x3", "Branch_2_Conv2d_0c_3x3"])]
    for i in range(1, 11):
        n += ["Block35_%d_%s" % (i, b) for b in blocks[0][2]] + ["Block35_%d_Conv2d_1x1" % i]
    n += ["Mixed_6a_Branch_0_Conv2d_1a_3x3", "Mixed_6a_Branch_1_Conv2d_0a_1x1", "Mixed_6a_Branch_1_Conv2d_0b_3x3",
          "Mixed_6a_Branch_1_Conv2d_1a_3x3"]
    for i in range(1, 21):
        n += ["Block17_%d_%s" % (i, b) for b in ["Branch_0_Conv2d_1x1", "Branch_1_Conv2d_0a_1x1",
                                                  "Branch_1_Conv2d_0b_1x7", "Branch_1_Conv2d_0c_7x1"]]
        n += ["Block17_%d_Conv2d_1x1" % i]
    n += ["Mixed_7a_Branch_0_Conv2d_0a_1x1", "Mixed_7a_Branch_0_Conv2d_1a_3x3", "Mixed_7a_Branch_1_Conv2d_0a_1x1",
          "Mixed_7a_Branch_1_Conv2d_1a_3x3", "Mixed_7a_Branch_2_Conv2d_0a_1x1", "Mixed_7a_Branch_2_Conv2d_0b_3x3",
          "Mixed_7a_Branch_2_Conv2d_1a_3x3"]
    for i in range(1, 11):
        n += ["Block8_%d_%s" % (i, b) for b in ["Branch_0_Conv2d_1x1", "Branch_1_Conv2d_0a_1x1",
                                                 "Branch_1_Conv2d_0b_1x3", "Branch_1_Conv2d_0c_3x1"]]
        n += ["Block8_%d_Conv2d_1x1" % i]
    n += ["Conv2d_7b_1x1"]
    return n


# ---------------------------------------------------------------------------- main

def k1_autoname(layer, counters):
    """Keras 1 auto names: lower-cased class name + '_' + per-class count from 1."""
    import tf_keras as K
    cls = {K.layers.Conv2D: "convolution2d", K.layers.SeparableConv2D: "separableconvolution2d",
           K.layers.BatchNormalization: "batchnormalization", K.layers.Activation: "activation",
           K.layers.MaxPooling2D: "maxpooling2d", K.layers.Add: "merge", K.layers.InputLayer: "input",
           K.layers.GlobalAveragePooling2D: "globalaveragepooling2d"}
    base = None
    for c, b in cls.items():
        if type(layer) is c:
            base = b
    if base is None:
        raise SystemExit("no Keras 1 name for " + type(layer).__name__)
    counters[base] = counters.get(base, 0) + 1
    return "%s_%d" % (base, counters[base])


def k20_name(name):
    """tf-keras zero-based auto name -> Keras 2.0 one-based (conv2d -> conv2d_1, conv2d_5 -> conv2d_6)."""
    import re
    m = re.fullmatch(r"(conv2d|batch_normalization|activation|max_pooling2d|average_pooling2d)(?:_(\d+))?", name)
    if not m:
        return name
    return "%s_%d" % (m.group(1), int(m.group(2) or 0) + 1)


def generate(name, outdir):
    import tf_keras as K
    import tensorflow as tf
    ctor, size, mode = MODELS[name]
    t0 = time.time()
    K.backend.clear_session()
    rng = np.random.default_rng(SEED + sum(map(ord, name)))
    K.utils.set_random_seed(SEED)
    mod = getattr(K.applications, {"resnet50": "resnet50", "inception_v3": "inception_v3",
                                   "xception": "xception", "inception_resnet_v2": "inception_resnet_v2"}[name])
    with CreationOrder() as created:
        model = getattr(K.applications, ctor)(weights=None, include_top=False, pooling="avg",
                                              input_shape=(size, size, 3))
    created = [l for l in created if l in set(model.layers)]
    images = smooth_images(rng, NIMG, size)
    inputs = mod.preprocess_input(images.astype("float32"))
    calib = mod.preprocess_input(smooth_images(rng, 4, size).astype("float32"))
    randomize(model, rng, calib)
    feats = model.predict(inputs, verbose=0)

    notop = os.path.join(outdir, name + "_notop.h5")
    model.save_weights(notop + ".tmp.h5")
    os.replace(notop + ".tmp.h5", notop)

    extra = {}
    order = model.layers
    if name == "xception":
        # the same network with a 5-class classifier (include_top=True), for top-file loading
        K.backend.clear_session()
        top = getattr(K.applications, ctor)(weights=None, include_top=True, classes=5, input_shape=(size, size, 3))
        for a, b in zip(weighted(model), weighted(top)):
            b.set_weights(a.get_weights())
        head = top.get_layer("predictions")
        head.set_weights([rng.normal(0, 0.05, w.shape).astype("float32") for w in head.get_weights()])
        extra["predictions_top5"] = top.predict(inputs, verbose=0)
        p = os.path.join(outdir, "xception_top5.h5")
        top.save_weights(p + ".tmp.h5")
        os.replace(p + ".tmp.h5", p)
    if name == "resnet50":
        old = resnet50_old((size, size, 3))
        for l in weighted(model):
            old.get_layer(resnet50_new_to_old(l.name)).set_weights(l.get_weights())
        extra["features_keras1"] = old.predict(inputs, verbose=0)
        groups = [(l.name, keras1_datasets(l.name, l, layer_weights(l)) if l.weights else []) for l in old.layers]
        write_keras_file(os.path.join(outdir, "resnet50_keras1_notop.h5"), groups)
        extra["layer_order_keras1"] = [l.name for l in old.layers]
    elif name == "inception_v3":
        groups = [(k20_name(l.name), keras2_datasets(k20_name(l.name), l, layer_weights(l)) if l.weights else [])
                  for l in order]
        write_keras_file(os.path.join(outdir, "inception_v3_keras20_notop.h5"), groups, "2.0.2", "tensorflow")
    elif name == "xception":
        counters, k1 = {}, {}
        for l in created:
            k1[l.name] = k1_autoname(l, counters)
        groups = [(k1[l.name], keras1_datasets(k1[l.name], l, layer_weights(l)) if l.weights else []) for l in order]
        write_keras_file(os.path.join(outdir, "xception_keras1_notop.h5"), groups)
    elif name == "inception_resnet_v2":
        slim = iter(irv2_tfslim_conv_names())
        convs = [l for l in created if type(l) is K.layers.Conv2D]
        rename = {}
        for c in convs:
            rename[c.name] = next(slim)
        assert next(slim, None) is None
        # each conv2d_bn conv is followed by its BN: batch_normalization_k pairs with conv2d_k
        for l in created:
            if type(l) is K.layers.BatchNormalization:
                conv = "conv_7b" if l.name == "conv_7b_bn" else l.name.replace("batch_normalization", "conv2d")
                rename[l.name] = rename[conv] + "_BatchNorm"
        groups = [(rename.get(l.name, l.name),
                   keras2_datasets(rename.get(l.name, l.name), l, layer_weights(l)) if l.weights else [])
                  for l in order]
        write_keras_file(os.path.join(outdir, "inception_resnet_v2_tfslim_notop.h5"), groups, "2.0.8", "tensorflow")

    ref = os.path.join(outdir, name + "_ref.h5")
    with h5py.File(ref + ".tmp", "w") as f:
        f["images"] = images
        f["inputs"] = inputs.astype("float32")
        f["features"] = feats.astype("float32")
        for k, v in extra.items():
            if isinstance(v, np.ndarray):
                f[k] = v.astype("float32")
            else:
                f.attrs[k] = fixed(v)
        f.attrs["model"] = name
        f.attrs["size"] = size
        f.attrs["preprocess"] = mode
        f.attrs["seed"] = SEED
        f.attrs["tensorflow"] = tf.__version__
        f.attrs["tf_keras"] = K.__version__
        f.attrs["params"] = model.count_params()
        f.attrs["trainable_params"] = int(sum(np.prod(v.shape) for v in model.trainable_weights))
        f.attrs["layer_order"] = fixed([l.name for l in order])
        f.attrs["weighted_layers"] = fixed([l.name for l in weighted(model)])
    os.replace(ref + ".tmp", ref)
    print("%s: %d params, %d weighted layers, features %s, %.1fs" % (
        name, model.count_params(), len(weighted(model)), feats.shape, time.time() - t0))


def main():
    if len(sys.argv) < 2:
        sys.exit("usage: gen_keras_models.py OUTDIR [MODEL ...]")
    outdir = sys.argv[1]
    names = sys.argv[2:] or list(MODELS)
    for n in names:
        if n not in MODELS:
            sys.exit("unknown model %s (expected one of %s)" % (n, ", ".join(MODELS)))
    os.makedirs(outdir, exist_ok=True)
    me = os.path.getmtime(__file__)
    for n in names:
        ref = os.path.join(outdir, n + "_ref.h5")
        if os.path.exists(ref) and os.path.getmtime(ref) >= me:
            continue
        generate(n, outdir)


if __name__ == "__main__":
    main()
