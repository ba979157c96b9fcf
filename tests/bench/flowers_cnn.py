"""How hard is the synthetic flowers set? Trains a small CNN with PyTorch (Debian's, CPU) on a set
written by scripts/make_flowers.lua and prints validation accuracy per epoch.

  flowers_cnn.py DATA_DIR [--size 64] [--epochs 15] [--seed 0]

Reads train.json (the Kaggle layout) with Pillow, holds out 20% (stratified, fixed seed), resizes
every photo to SIZE x SIZE, and trains a 4-block CNN (32-64-128-256 channels, batch norm, ReLU,
max pooling, global average pooling, linear) with Adam (lr 1e-3), batch 32, random horizontal flips.
The set is meant to need several epochs before validation accuracy passes 90%.
"""
import argparse
import json
import os
import time

import numpy as np
import torch
import torch.nn as nn
from PIL import Image


def load(root, size):
    ann = json.load(open(os.path.join(root, "train.json")))["annotations"]
    xs, ys = [], []
    for a in ann:
        p = os.path.join(root, "train", "category_%d" % (a["category_id"] + 1), "%d.jpg" % a["image_id"])
        im = Image.open(p).convert("RGB").resize((size, size), Image.BILINEAR)
        xs.append(np.asarray(im))
        ys.append(a["category_id"])
    return np.stack(xs), np.array(ys)


def net(k):
    def block(i, o):
        return [nn.Conv2d(i, o, 3, padding=1, bias=False), nn.BatchNorm2d(o), nn.ReLU(), nn.MaxPool2d(2)]
    return nn.Sequential(*block(3, 32), *block(32, 64), *block(64, 128), *block(128, 256),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(256, k))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("root")
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    torch.manual_seed(a.seed)
    torch.set_num_threads(2)
    x, y = load(a.root, a.size)
    k = int(y.max()) + 1
    rng = np.random.RandomState(a.seed)
    val = np.zeros(len(y), bool)
    for c in range(k):
        idx = np.where(y == c)[0]
        val[rng.permutation(idx)[: len(idx) // 5]] = True
    x = torch.tensor(x).permute(0, 3, 1, 2).float() / 127.5 - 1
    y = torch.tensor(y)
    xt, yt, xv, yv = x[~val], y[~val], x[val], y[val]
    m = net(k)
    opt = torch.optim.Adam(m.parameters(), 1e-3)
    lossf = nn.CrossEntropyLoss()
    print("%d classes, %d train, %d valid, %dx%d" % (k, len(yt), len(yv), a.size, a.size))
    for e in range(1, a.epochs + 1):
        t0 = time.time()
        m.train()
        perm = torch.randperm(len(yt))
        for i in range(0, len(yt), 32):
            b = perm[i:i + 32]
            xb = xt[b]
            flip = torch.rand(len(b)) < 0.5
            xb[flip] = xb[flip].flip(3)
            opt.zero_grad()
            loss = lossf(m(xb), yt[b])
            loss.backward()
            opt.step()
        m.eval()
        with torch.no_grad():
            acc = (m(xv).argmax(1) == yv).float().mean().item()
        print("epoch %2d  loss %.3f  val_acc %.3f  (%.1fs)" % (e, loss.item(), acc, time.time() - t0), flush=True)


if __name__ == "__main__":
    main()
