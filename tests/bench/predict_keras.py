"""Keras peer of tests/bench/predict.lua: loads the same whole-model .h5 file with tf_keras, decodes
the same JPEGs with Pillow (shorter side to load/0.875, centre crop: flowerlua's 'eval' transform),
makes the same TTA views and times model.predict. Prints JSON: {mode: {"images_per_s", "top1"}}.
Usage: predict_keras.py MODEL.h5 IMAGE_LIST.txt SIZE THREADS BATCH MODES(comma-separated)"""
import json
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "scripts"))
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
import tf_keras as keras  # noqa: E402
from PIL import Image  # noqa: E402
from flowerlua_keras import custom_objects  # noqa: E402

model_path, list_path, size, threads, batch, modes = sys.argv[1:7]
size, threads, batch = int(size), int(threads), int(batch)
tf.config.threading.set_intra_op_parallelism_threads(threads)
tf.config.threading.set_inter_op_parallelism_threads(1)
paths = [l.strip() for l in open(list_path) if l.strip()]
model = keras.models.load_model(model_path, custom_objects=custom_objects(keras), compile=False)


def load(path, side):
    im = Image.open(path).convert("RGB")
    w, h = im.size
    s = side / 0.875 / min(w, h)
    im = im.resize((max(side, round(w * s)), max(side, round(h * s))), Image.BILINEAR)
    w, h = im.size
    l, t = (w - side) // 2, (h - side) // 2
    return np.asarray(im.crop((l, t, l + side, t + side)), dtype=np.float32)


def views(x, mode):
    if mode in ("none", "flip"):
        v = [x]
    else:
        L = x.shape[1]
        c, e = (L - size) // 2, L - size
        v = [x[:, r:r + size, s:s + size] for r, s in ((c, c), (0, 0), (0, e), (e, 0), (e, e))]
    if "flip" in mode:
        v = v + [a[:, :, ::-1] for a in v]
    return v


out = {}
for mode in modes.split(","):
    side = size if mode in ("none", "flip") else round(size / 0.875)
    t0 = time.perf_counter()
    top1 = []
    for i in range(0, len(paths), batch):
        x = np.stack([load(p, side) for p in paths[i:i + batch]])
        p = sum(model.predict(v, batch_size=batch, verbose=0) for v in views(x, mode))
        top1 += list(np.argmax(p, axis=1) + 1)
    out[mode] = {"images_per_s": len(paths) / (time.perf_counter() - t0), "top1": [int(t) for t in top1]}
print(json.dumps(out))
