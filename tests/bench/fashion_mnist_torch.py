"""PyTorch peer of experiments/fashion_mnist.lua: the same network, optimizer, batch, split and
epochs on the same files. Prints one JSON line: test_acc, seconds_per_epoch.
Usage: fashion_mnist_torch.py DATA_DIR EPOCHS THREADS"""
import gzip
import json
import sys
import time

import numpy as np
import torch
from torch import nn


def idx(path):
    with gzip.open(path, "rb") as f:
        raw = f.read()
    ndim = raw[3]
    shape = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def load(d, part):
    x = idx(f"{d}/{part}-images-idx3-ubyte.gz").astype(np.float32) / 255
    y = idx(f"{d}/{part}-labels-idx1-ubyte.gz").astype(np.int64)
    return torch.from_numpy(x).unsqueeze(1), torch.from_numpy(y)


def main():
    d, epochs, threads = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    torch.set_num_threads(threads)
    torch.manual_seed(1)
    X, Y = load(d, "train")
    XT, YT = load(d, "t10k")
    xtr, ytr = X[:50000], Y[:50000]
    model = nn.Sequential(
        nn.Conv2d(1, 32, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(32, 64, 3), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(64 * 5 * 5, 128), nn.ReLU(), nn.Dropout(0.3), nn.Linear(128, 10))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    lossf = nn.CrossEntropyLoss()
    times = []
    for _ in range(epochs):
        model.train()
        t0 = time.perf_counter()
        perm = torch.randperm(len(xtr))
        for i in range(0, len(xtr), 64):
            b = perm[i:i + 64]
            opt.zero_grad()
            loss = lossf(model(xtr[b]), ytr[b])
            loss.backward()
            opt.step()
        times.append(time.perf_counter() - t0)
    model.eval()
    with torch.no_grad():
        acc = sum((model(XT[i:i + 500]).argmax(1) == YT[i:i + 500]).sum().item() for i in range(0, len(XT), 500)) / len(XT)
    print(json.dumps({"test_acc": acc, "seconds_per_epoch": sum(times) / len(times)}))


main()
