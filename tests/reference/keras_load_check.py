"""Real Keras (tf-keras) loads a weight file that flowerlua wrote and predicts with it.

  keras_load_check.py MODEL WEIGHTS INPUT OUTPUT [by_name] [-- MODEL WEIGHTS INPUT OUTPUT [by_name] ...]

MODEL is an application name (resnet50, inception_v3, xception, inception_resnet_v2: built with
weights=None, include_top=False, pooling='avg' at INPUT's image size) or the path of a Keras .h5
model file whose architecture is used. WEIGHTS is the file to load with Keras's own
model.load_weights (by order, or by name when the 5th argument is `by_name`). INPUT holds `x`;
OUTPUT receives `y` = model.predict(x) in inference mode. Used by tests/lua/test_keras*.lua to
prove that Keras reads keras.save_weights files. Several jobs run in one process (TensorFlow's
import is the slow part).
"""
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import h5py
import numpy as np

APPS = {"resnet50": "ResNet50", "inception_v3": "InceptionV3", "xception": "Xception",
        "inception_resnet_v2": "InceptionResNetV2"}


def run(K, job):
    if len(job) not in (4, 5):
        sys.exit(__doc__)
    model_arg, weights, inp, out = job[:4]
    by_name = len(job) == 5 and job[4] == "by_name"
    with h5py.File(inp, "r") as f:
        x = f["x"][()]
    if model_arg in APPS:
        model = getattr(K.applications, APPS[model_arg])(weights=None, include_top=False, pooling="avg",
                                                         input_shape=x.shape[1:])
    else:
        model = K.models.load_model(model_arg, compile=False)
    model.load_weights(weights, by_name=by_name)
    y = model.predict(x, verbose=0)
    with h5py.File(out + ".tmp", "w") as f:
        f["y"] = np.asarray(y, dtype="float32")
    os.replace(out + ".tmp", out)


def main():
    args = sys.argv[1:]
    jobs, cur = [], []
    for a in args:
        if a == "--":
            jobs.append(cur)
            cur = []
        else:
            cur.append(a)
    jobs.append(cur)
    import tf_keras as K
    for job in jobs:
        run(K, job)


if __name__ == "__main__":
    main()
