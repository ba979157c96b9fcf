"""Peers for tests/bench/models.lua: the same model step in Keras (tf-keras on TensorFlow) or
PyTorch (torchvision), in its own process so that its peak resident memory is its own.

  models_peer.py keras|torch MODEL forward|train BATCH REPS THREADS

MODEL: resnet50, inception_v3, xception, inception_resnet_v2 (torch: resnet50 and inception_v3,
torchvision's, without auxiliary logits). Native input size, 1000 classes, random inputs.
forward: inference (Keras: a tf.function around model(x, training=False); torch: eval + no_grad).
train: one SGD(momentum 0.9) step on softmax cross-entropy with random labels (Keras:
train_on_batch; torch: zero_grad/forward/backward/step). One untimed warm-up, then REPS timed runs.
Prints `peak_mb best_seconds mean_seconds`.
"""
import os
import resource
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

which, name, mode = sys.argv[1], sys.argv[2], sys.argv[3]
batch, reps, threads = int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6])
size = 224 if name == "resnet50" else 299


def timed(fn):
    fn()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return min(ts), sum(ts) / len(ts)


def keras_step():
    import numpy as np
    import tensorflow as tf
    tf.config.threading.set_intra_op_parallelism_threads(threads)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    import tf_keras as K
    ctor = {"resnet50": "ResNet50", "inception_v3": "InceptionV3", "xception": "Xception",
            "inception_resnet_v2": "InceptionResNetV2"}[name]
    model = getattr(K.applications, ctor)(weights=None)
    x = np.random.default_rng(0).standard_normal((batch, size, size, 3)).astype("float32")
    y = np.random.default_rng(1).integers(0, 1000, batch)
    if mode == "forward":
        f = tf.function(lambda t: model(t, training=False))
        xt = tf.constant(x)
        return timed(lambda: f(xt).numpy())
    model.compile(optimizer=K.optimizers.SGD(0.01, momentum=0.9), loss="sparse_categorical_crossentropy")
    return timed(lambda: model.train_on_batch(x, y))


def torch_step():
    import torch
    import torchvision
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    if name == "resnet50":
        model = torchvision.models.resnet50()
    elif name == "inception_v3":
        model = torchvision.models.inception_v3(aux_logits=False, init_weights=False)
    else:
        sys.exit("torch peer: no torchvision %s" % name)
    x = torch.randn(batch, 3, size, size)
    if mode == "forward":
        model.eval()

        def fwd():
            with torch.no_grad():
                model(x)
        return timed(fwd)
    model.train()
    y = torch.randint(0, 1000, (batch,))
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    loss = torch.nn.CrossEntropyLoss()

    def step():
        opt.zero_grad()
        loss(model(x), y).backward()
        opt.step()
    return timed(step)


best, mean = keras_step() if which == "keras" else torch_step()
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print("%.1f %.4f %.4f" % (peak, best, mean))
