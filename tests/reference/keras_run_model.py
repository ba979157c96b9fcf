"""Loads a whole-model .h5 file written by flowerlua with real Keras and runs it in inference.
Usage: keras_run_model.py {tf_keras|keras3} MODEL.h5 INPUT.npy OUTPUT.npy
Writes the model's output for the input; exits non-zero (with Keras's message) if it cannot load."""
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "scripts"))
import numpy as np  # noqa: E402
from flowerlua_keras import custom_objects  # noqa: E402

flavor, model_path, in_path, out_path = sys.argv[1:5]
if flavor == "tf_keras":
    import tf_keras as keras
else:
    import keras
model = keras.models.load_model(model_path, custom_objects=custom_objects(keras), compile=False)
y = model(np.load(in_path), training=False)
np.save(out_path, np.asarray(y, dtype=np.float32))
