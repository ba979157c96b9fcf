"""Peers for tests/bench/layers.lua: times the same convolutions in PyTorch and TensorFlow.

Usage: .venv/bin/python tests/bench/layers_peers.py torch|torch_nhwc|tf THREADS REPS CASES_JSON
Prints one JSON object {case_name: {"fwd": s, "bwd": s, "bwd_data": s, "bwd_filter": s}} (seconds,
the minimum over REPS runs). PyTorch runs NCHW (its default layout) or, as torch_nhwc, channels_last
(both on Debian's system oneDNN 2.6), with autograd for the backward pass (data and filter
gradients together, through a kept graph); TensorFlow runs NHWC with
Conv2DBackpropInput / Conv2DBackpropFilter in tf.function.
"""
import json
import os
import sys
import time

which, threads, reps = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
cases = json.loads(sys.argv[4])


def best(fn, reps):
    fn()
    t = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        t = min(t, time.perf_counter() - t0)
    return t


def run_torch(channels_last=False):
    import torch
    import torch.nn.functional as F
    torch.set_num_threads(threads)
    out = {}
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    for c in cases:
        n, h, cin, cout, k, s = c["n"], c["h"], c["cin"], c["cout"], c["k"], c["s"]
        x = torch.randn(n, cin, h, h).to(memory_format=fmt).requires_grad_()
        w = torch.randn(cout, cin, k, k).to(memory_format=fmt).requires_grad_()
        pad = k // 2 if c["padding"] == "same" else 0
        with torch.no_grad():
            fwd = best(lambda: F.conv2d(x, w, stride=s, padding=pad), reps)
        y = F.conv2d(x, w, stride=s, padding=pad)
        gy = torch.randn_like(y)
        # the backward alone: both gradients through the kept graph
        b = best(lambda: torch.autograd.grad(y, [x, w], gy, retain_graph=True), reps)
        out[c["name"]] = {"fwd": fwd, "bwd": b}
    return out


def run_tf():
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import tensorflow as tf
    tf.config.threading.set_intra_op_parallelism_threads(threads)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    out = {}
    for c in cases:
        n, h, cin, cout, k, s = c["n"], c["h"], c["cin"], c["cout"], c["k"], c["s"]
        pad = c["padding"].upper()
        x = tf.random.normal((n, h, h, cin))
        w = tf.random.normal((k, k, cin, cout))
        f = tf.function(lambda x, w: tf.nn.conv2d(x, w, s, pad))
        y = f(x, w)
        gy = tf.random.normal(y.shape)
        bi = tf.function(lambda gy, w: tf.raw_ops.Conv2DBackpropInput(
            input_sizes=[n, h, h, cin], filter=w, out_backprop=gy, strides=[1, s, s, 1], padding=pad))
        bf = tf.function(lambda x, gy: tf.raw_ops.Conv2DBackpropFilter(
            input=x, filter_sizes=[k, k, cin, cout], out_backprop=gy, strides=[1, s, s, 1], padding=pad))
        fwd = best(lambda: f(x, w).numpy(), reps)
        bd = best(lambda: bi(gy, w).numpy(), reps)
        bw = best(lambda: bf(x, gy).numpy(), reps)
        out[c["name"]] = {"fwd": fwd, "bwd_data": bd, "bwd_filter": bw, "bwd": bd + bw}
    return out


if which == "torch":
    res = run_torch()
elif which == "torch_nhwc":
    res = run_torch(channels_last=True)
else:
    res = run_tf()
print(json.dumps(res))
