"""Keras layers for models saved by flowerlua (flower.keras.save_model / model:save).

flowerlua writes standard Keras .h5 model files. Two of its layers have no built-in Keras class,
so they are saved as registered custom layers, defined here:
  FlowerPreprocess  Keras Applications' preprocess_input(mode) as a layer (caffe, tf, torch)
  CustomScaleLayer  InceptionResNetV2's scaled residual: inputs[0] + scale * inputs[1]

    import keras                      # Keras 3, or: import tf_keras as keras
    from flowerlua_keras import custom_objects
    model = keras.models.load_model("model.h5", custom_objects=custom_objects(keras))
"""


def custom_objects(keras):
    """The custom layer classes for this Keras module (Keras 3 or tf_keras), by class name."""
    ops = getattr(keras, "ops", None)
    if ops is None:  # tf.keras 2.x
        import tensorflow as tf
        concat, const = tf.concat, tf.constant
    else:
        concat, const = ops.concatenate, ops.convert_to_tensor

    class FlowerPreprocess(keras.layers.Layer):
        def __init__(self, mode="caffe", **kwargs):
            super().__init__(**kwargs)
            if mode not in ("caffe", "tf", "torch"):
                raise ValueError(f"FlowerPreprocess: mode must be caffe, tf or torch, got {mode!r}")
            self.mode = mode

        def call(self, x):
            x = keras.backend.cast(x, "float32") if ops is None else ops.cast(x, "float32")
            if self.mode == "tf":
                return x / 127.5 - 1.0
            if self.mode == "torch":
                x = x / 255.0
                return (x - const([0.485, 0.456, 0.406])) / const([0.229, 0.224, 0.225])
            bgr = concat([x[..., 2:3], x[..., 1:2], x[..., 0:1]], -1)
            return bgr - const([103.939, 116.779, 123.68])

        def get_config(self):
            return {**super().get_config(), "mode": self.mode}

    class CustomScaleLayer(keras.layers.Layer):
        def __init__(self, scale, **kwargs):
            super().__init__(**kwargs)
            self.scale = scale

        def call(self, inputs):
            return inputs[0] + inputs[1] * self.scale

        def get_config(self):
            return {**super().get_config(), "scale": self.scale}

    return {"FlowerPreprocess": FlowerPreprocess, "CustomScaleLayer": CustomScaleLayer}
