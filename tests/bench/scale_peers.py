"""Helpers of tests/bench/scale.lua (not a test).

  scale_peers.py tree OUT SRC_DIR TRAIN TEST CLASSES
      the Kaggle layout at the seed's size: train/category_<c+1>/<id>.jpg and test/<id>.jpg as hard
      links to the few JPEGs under SRC_DIR, train.json (annotations, categories), test.json
  scale_peers.py keras ROWS VROWS BATCH BLOCK SEED FILE.h5...
      the Keras peer of the ensemble: Dropout(0.5) + Dense(K, softmax) trained one epoch with
      model.fit on a keras.utils.PyDataset that reads the HDF5 files with h5py in blocks of rows (in
      a shuffled block order, rows shuffled within blocks) and concatenates the files' columns per
      batch, over the first ROWS training rows; statistics from one streaming pass; its accuracy on
      the first VROWS validation rows; then predicts the test split. Prints one JSON line: seconds
      and rows/s per stage, validation accuracy, peak RSS.
"""
import json
import os
import resource
import sys
import time


def tree(out, src, n_train, n_test, classes):
    jpgs = sorted(os.path.join(src, f) for f in os.listdir(src) if f.endswith('.jpg'))
    assert jpgs, 'no JPEG under ' + src
    os.makedirs(os.path.join(out, 'test'), exist_ok=True)
    for c in range(classes):
        os.makedirs(os.path.join(out, 'train', 'category_%d' % (c + 1)), exist_ok=True)
    ann, images = [], []
    for i in range(n_train):
        c = (i * 7919) % classes          # every class, unevenly ordered
        rel = 'train/category_%d/%d.jpg' % (c + 1, i)
        os.link(jpgs[i % len(jpgs)], os.path.join(out, rel))
        ann.append({'id': i, 'image_id': i, 'category_id': c})
        images.append({'id': i, 'file_name': rel})
    with open(os.path.join(out, 'train.json'), 'w') as f:
        json.dump({'images': images, 'annotations': ann,
                   'categories': [{'id': c, 'name': 'c%d' % c} for c in range(classes)]}, f)
    test = []
    for j in range(n_test):
        os.link(jpgs[j % len(jpgs)], os.path.join(out, 'test', '%d.jpg' % j))
        test.append({'id': j, 'file_name': '%d.jpg' % j})
    with open(os.path.join(out, 'test.json'), 'w') as f:
        json.dump({'images': test}, f)


def rss_peak():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def keras_peer(rows, vrows, batch, block, seed, paths):
    os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
    import h5py
    import numpy as np
    import keras
    files = [h5py.File(p, 'r') for p in paths]
    train = [f['train_x'] for f in files]
    labels = files[0]['train_label'][:rows].astype('int64')
    classes = int(files[0].attrs['classes'])
    dims = [d.shape[1] for d in train]
    out = {'rows': rows}

    def read(dsets, first, count):
        return np.concatenate([d[first:first + count] for d in dsets], axis=1)

    t0 = time.time()
    n, mean, m2 = 0, None, None
    for first in range(0, rows, block):
        x = read(train, first, min(block, rows - first)).astype('float64')
        bm, c = x.mean(0), x.shape[0]
        bm2 = ((x - bm) ** 2).sum(0)
        if mean is None:
            mean, m2, n = bm, bm2, c
        else:
            delta = bm - mean
            tot = n + c
            mean = mean + delta * c / tot
            m2 = m2 + bm2 + delta ** 2 * n * c / tot
            n = tot
    std = (np.sqrt(m2 / (n - 1)) + 1e-6).astype('float32')
    mean = mean.astype('float32')
    out['stats_s'] = time.time() - t0

    rng = np.random.RandomState(seed)
    nblocks = (rows + block - 1) // block
    order = []
    for b in rng.permutation(nblocks):
        first = b * block
        count = min(block, rows - first)
        order.append(first + rng.permutation(count))
    order = np.concatenate(order)

    class Blocks(keras.utils.PyDataset):
        def __init__(self):
            super().__init__(workers=1, use_multiprocessing=False)
            self.cache = {}

        def __len__(self):
            return (rows + batch - 1) // batch

        def rows_of(self, idx):
            blocks = idx // block
            parts = []
            for b in np.unique(blocks):
                if b not in self.cache:
                    self.cache = {k: v for k, v in self.cache.items() if abs(k - b) < 1}   # at most two
                    first = int(b) * block
                    self.cache[b] = read(train, first, min(block, rows - first))
                sel = idx[blocks == b] - int(b) * block
                parts.append(self.cache[b][sel])
            return np.concatenate(parts)

        def __getitem__(self, i):
            idx = order[i * batch:(i + 1) * batch]
            x = (self.rows_of(idx) - mean) / std
            return x, labels[idx]

    keras.utils.set_random_seed(seed)
    model = keras.Sequential([keras.Input((sum(dims),)), keras.layers.Dropout(0.5),
                              keras.layers.Dense(classes, activation='softmax')])
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss='sparse_categorical_crossentropy')
    t0 = time.time()
    model.fit(Blocks(), epochs=1, verbose=0, shuffle=False)
    out['epoch_s'] = time.time() - t0
    out['epoch_rows_per_s'] = rows / out['epoch_s']
    valid = [f['valid_x'] for f in files]
    vlabels = files[0]['valid_label'][:vrows]
    right = 0
    for first in range(0, vrows, block):
        x = (read(valid, first, min(block, vrows - first)) - mean) / std
        right += int((model.predict_on_batch(x).argmax(1) == vlabels[first:first + x.shape[0]]).sum())
    out['val_acc'] = right / vrows if vrows else None

    t0 = time.time()
    test = [f['test'] for f in files]
    m = test[0].shape[0]
    preds = []
    for first in range(0, m, 1024):
        x = (read(test, first, min(1024, m - first)) - mean) / std
        preds.append(model.predict_on_batch(x))
    out['predict_s'] = time.time() - t0
    out['predict_rows_per_s'] = m / out['predict_s']
    out['peak_rss'] = rss_peak()
    print(json.dumps(out))


if __name__ == '__main__':
    if sys.argv[1] == 'tree':
        tree(sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6]))
    elif sys.argv[1] == 'keras':
        keras_peer(*(int(a) for a in sys.argv[2:7]), sys.argv[7:])
    else:
        sys.exit('usage: scale_peers.py tree|keras ...')
