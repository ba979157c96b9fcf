"""The quickstart recipe in real Keras (tf-keras 2.x on TensorFlow CPU): the same synthetic data
(the Kaggle layout written by scripts/make_flowers.lua), the same split (stratified, seeded; the
image lists come from flowerlua so that both train on exactly the same images), the same small
models (layer for layer as scripts/flower/smallnets.lua builds them), the same schedule (head only,
then all layers, Adam) and the same ensemble (Dropout + Dense on concatenated standardised
features). Writes one JSON object: seconds per epoch for each model and stage (the fastest epoch: the
machine is shared, and the fastest epoch is the least disturbed one), feature-export
throughput, validation accuracies.

usage: recipe_keras.py SPEC.json OUT.json
SPEC.json (written by tests/bench/recipe.lua): {train: [[path, label0], ...], valid: [...],
  classes, size, width, models, stages: [{epochs, train, lr}], batch_size, ensemble_epochs,
  ensemble_lr, ensemble_dropout, threads, seed}
"""
import json
import os
import sys
import time

spec = json.load(open(sys.argv[1]))
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
os.environ['TF_USE_LEGACY_KERAS'] = '1'
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from PIL import Image  # noqa: E402

tf.config.threading.set_intra_op_parallelism_threads(spec.get('threads', 2))
tf.config.threading.set_inter_op_parallelism_threads(1)
import tf_keras as keras  # noqa: E402
from tf_keras import layers as L  # noqa: E402

SIZE = spec['size']
K = spec['classes']
W = spec['width']
BN_MOMENTUM = 0.9


def load(items, train):
    """Decodes and resizes like flowerlua's 'eval' transform: shorter side to SIZE/0.875, centre crop."""
    xs = np.empty((len(items), SIZE, SIZE, 3), np.float32)
    for i, (path, _) in enumerate(items):
        im = Image.open(path).convert('RGB')
        w, h = im.size
        s = SIZE / 0.875 / min(w, h)
        im = im.resize((max(SIZE, round(w * s)), max(SIZE, round(h * s))), Image.BILINEAR, reducing_gap=3.0)
        w, h = im.size
        l, t = (w - SIZE) // 2, (h - SIZE) // 2
        xs[i] = np.asarray(im.crop((l, t, l + SIZE, t + SIZE)), np.float32)
    ys = np.array([lab for _, lab in items], np.int64)
    return xs, ys


def conv_bn(x, f, k, s, name):
    x = L.Conv2D(f, k, strides=s, padding='same', use_bias=False, name=name + '_conv')(x)
    x = L.BatchNormalization(momentum=BN_MOMENTUM, epsilon=1e-3, name=name + '_bn')(x)
    return L.Activation('relu', name=name + '_relu')(x)


def residual(x, f, s, name):
    y = conv_bn(x, f, 3, s, name + '_1')
    y = L.Conv2D(f, 3, padding='same', use_bias=False, name=name + '_2_conv')(y)
    y = L.BatchNormalization(momentum=BN_MOMENTUM, epsilon=1e-3, name=name + '_2_bn')(y)
    sc = x
    if s != 1 or x.shape[-1] != f:
        sc = L.Conv2D(f, 1, strides=s, use_bias=False, name=name + '_0_conv')(x)
        sc = L.BatchNormalization(momentum=BN_MOMENTUM, epsilon=1e-3, name=name + '_0_bn')(sc)
    y = L.Add(name=name + '_add')([sc, y])
    return L.Activation('relu', name=name + '_out')(y)


def inception(x, w, name):
    b1 = conv_bn(x, w, 1, 1, name + '_b1')
    b2 = conv_bn(conv_bn(x, w * 3 // 4, 1, 1, name + '_b2a'), w, 3, 1, name + '_b2b')
    b3 = conv_bn(conv_bn(conv_bn(x, w // 2, 1, 1, name + '_b3a'), w // 2, 3, 1, name + '_b3b'), w // 2, 3, 1, name + '_b3c')
    b4 = L.AveragePooling2D(3, strides=1, padding='same', name=name + '_b4_pool')(x)
    b4 = conv_bn(b4, w // 2, 1, 1, name + '_b4')
    return L.Concatenate(axis=-1, name=name + '_concat')([b1, b2, b3, b4])


def build(arch):
    inp = keras.Input((SIZE, SIZE, 3))
    x = L.Rescaling(1 / 127.5, offset=-1, name='preprocess')(inp)
    if arch == 'resnet_tiny':
        x = conv_bn(x, W, 3, 1, 'stem')
        x = L.MaxPooling2D(2, name='stem_pool')(x)
        x = residual(x, W, 1, 'block1')
        x = residual(x, 2 * W, 2, 'block2')
        x = residual(x, 4 * W, 2, 'block3')
    elif arch == 'inception_tiny':
        x = conv_bn(x, W, 3, 1, 'stem')
        x = L.MaxPooling2D(3, strides=2, padding='same', name='stem_pool')(x)
        x = conv_bn(x, 2 * W, 3, 2, 'stem2')
        x = inception(x, 2 * W, 'mixed1')
        x = L.MaxPooling2D(3, strides=2, padding='same', name='reduce_pool')(x)
        x = inception(x, 4 * W, 'mixed2')
    elif arch == 'vgg_tiny':
        for i, f in enumerate([W, 2 * W, 4 * W, 8 * W]):
            x = conv_bn(x, f, 3, 1, 'block%d' % (i + 1))
            x = L.MaxPooling2D(2, name='block%d_pool' % (i + 1))(x)
    else:
        raise SystemExit('unknown model ' + arch)
    x = L.GlobalAveragePooling2D(name='avg_pool')(x)
    y = L.Dense(K, name='predictions')(x)
    return keras.Model(inp, y, name=arch)


def set_stage(model, train):
    for layer in model.layers:
        layer.trainable = train == 'all' or layer.name == 'predictions'


def main():
    tf.keras.utils.set_random_seed(spec.get('seed', 1))
    t0 = time.time()
    xt, yt = load(spec['train'], True)
    xv, yv = load(spec['valid'], False)
    out = {'load_seconds': time.time() - t0, 'models': {}, 'keras': keras.__version__, 'tensorflow': tf.__version__}
    feats_t, feats_v = [], []
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    for arch in spec['models']:
        model = build(arch)
        stages = []
        for st in spec['stages']:
            set_stage(model, st['train'])
            opt = keras.optimizers.Adam(st['lr'], epsilon=1e-7)
            model.compile(optimizer=opt, loss=loss, metrics=['accuracy'])
            secs = []
            for i in range(st['epochs']):
                if st.get('schedule') == 'cosine':   # as the pipeline's LearningRateScheduler(optim.cosine): lr at the stage's i-th epoch
                    keras.backend.set_value(opt.learning_rate, st['lr'] * 0.5 * (1 + np.cos(np.pi * i / max(1, st['epochs']))))
                # random horizontal flips, as the quickstart's training transform (centre crop + flip)
                flip = np.random.rand(len(xt)) < 0.5
                x = np.where(flip[:, None, None, None], xt[:, :, ::-1], xt)
                t = time.time()
                model.fit(x, yt, batch_size=spec['batch_size'], epochs=1, verbose=0, shuffle=True)
                secs.append(time.time() - t)
            stages.append({'train': st['train'], 'epochs': st['epochs'], 'seconds': secs,
                           'seconds_per_epoch': min(secs) if secs else None})
        _, acc = model.evaluate(xv, yv, batch_size=64, verbose=0)
        fmodel = keras.Model(model.input, model.get_layer('avg_pool').output)
        export_s = float('inf')
        for _ in range(2):   # the faster of two passes (the first one builds the graph)
            t = time.time()
            ft = fmodel.predict(xt, batch_size=64, verbose=0)
            fv = fmodel.predict(xv, batch_size=64, verbose=0)
            export_s = min(export_s, time.time() - t)
        feats_t.append(ft)
        feats_v.append(fv)
        out['models'][arch] = {'stages': stages, 'val_acc': float(acc),
                               'export_images_per_s': (len(xt) + len(xv)) / export_s}
    ft, fv = np.concatenate(feats_t, 1), np.concatenate(feats_v, 1)
    mean, std = ft.mean(0), ft.std(0, ddof=1) + 1e-6
    ft, fv = (ft - mean) / std, (fv - mean) / std
    inp = keras.Input((ft.shape[1],))
    ens = keras.Model(inp, L.Dense(K)(L.Dropout(spec['ensemble_dropout'])(inp)))
    ens.compile(optimizer=keras.optimizers.Adam(spec['ensemble_lr']), loss=loss, metrics=['accuracy'])
    t = time.time()
    stop = keras.callbacks.EarlyStopping(monitor='val_loss', patience=8, restore_best_weights=True)
    ens.fit(ft, yt, batch_size=64, epochs=spec['ensemble_epochs'], verbose=0, shuffle=True, validation_data=(fv, yv),
            callbacks=[stop])
    out['ensemble'] = {'seconds': time.time() - t, 'val_acc': float(ens.evaluate(fv, yv, verbose=0)[1])}
    json.dump(out, open(sys.argv[2], 'w'), indent=1)


main()
