"""PyTorch peer of tests/bench/gpu.lua: the same measurements on the same GPU, printed as
`RESULT key value` lines (the Lua side parses them).

    python3 tests/bench/gpu_torch.py BATCH STEPS

ResNet50 is torchvision's, channels_last, SGD with momentum 0.9, cross-entropy on random labels;
cudnn.benchmark on and TF32 allowed for convolutions and matrix products (what flowerlua's
fp32/tf32 mode does); bf16 is torch.autocast("cuda", dtype=torch.bfloat16) around the forward and
the loss (float32 parameters, gradients and optimizer state: flowerlua's
model:mixed_precision('bfloat16')), on the same model and optimizer after the fp32 run. Peak memory is
torch.cuda.max_memory_allocated / max_memory_reserved over the timed training steps.
"""
import os
import sys
import time

import torch
import torch.nn.functional as F


def result(key, value):
    print(f"RESULT {key} {value:.6g}", flush=True)


def timed(fn, reps, warmup=2):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / reps


def kernels(batch):
    n = 8192
    a = torch.randn(n, n, device="cuda")
    b = torch.randn(n, n, device="cuda")
    for tf32, key in ((False, "sgemm_fp32_tflops"), (True, "sgemm_tf32_tflops")):
        torch.backends.cuda.matmul.allow_tf32 = tf32
        s = timed(lambda: a @ b, 5)
        result(key, 2 * n**3 / s / 1e12)
    torch.backends.cuda.matmul.allow_tf32 = True
    del a, b
    # a ResNet stage-2 3x3 convolution, NHWC (channels_last)
    x = torch.randn(batch, 64, 56, 56, device="cuda").to(memory_format=torch.channels_last)
    w = torch.randn(64, 64, 3, 3, device="cuda").to(memory_format=torch.channels_last)
    gy = torch.randn(batch, 64, 56, 56, device="cuda").to(memory_format=torch.channels_last)
    result("conv3x3_fwd_ms", 1e3 * timed(lambda: F.conv2d(x, w, padding=1), 10))
    result("conv3x3_bwd_data_ms", 1e3 * timed(lambda: torch.nn.grad.conv2d_input(x.shape, w, gy, padding=1), 10))
    result("conv3x3_bwd_filter_ms", 1e3 * timed(lambda: torch.nn.grad.conv2d_weight(x, w.shape, gy, padding=1), 10))


def profile(step, mode, steps=3):
    """Where a training step's GPU time goes, by kernel family (tests/bench/gpu.lua prints ours)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as prof

    torch.cuda.synchronize()
    with prof(activities=[ProfilerActivity.CUDA]) as p:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    fam = {}
    for e in p.key_averages():
        t = getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0)
        if t > 0:
            fam[e.key] = fam.get(e.key, 0) + t
    total = sum(fam.values())
    print(f"# torch profile {mode}: {total / steps / 1e3:.1f} ms of kernels per step")
    for k, t in sorted(fam.items(), key=lambda kv: -kv[1])[:25]:
        print(f"#   {t / steps / 1e3:8.2f} ms  {100 * t / total:5.1f}%  {k[:90]}")


def model_bench(batch, steps):
    import torchvision

    model = torchvision.models.resnet50(weights=None).cuda().to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x = torch.randn(batch, 3, 224, 224, device="cuda").to(memory_format=torch.channels_last)
    y = torch.randint(0, 1000, (batch,), device="cuda")

    for bf16, mode in ((False, "fp32"), (True, "bf16")):
        def step():
            opt.zero_grad(set_to_none=True)
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
                loss = F.cross_entropy(model(x), y)
            loss.backward()
            opt.step()

        model.train()
        for _ in range(3):
            step()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        s = timed(step, steps, warmup=0)
        result(f"train_{mode}_img_s", batch / s)
        result(f"train_{mode}_peak_alloc_mib", torch.cuda.max_memory_allocated() / 2**20)
        result(f"train_{mode}_peak_reserved_mib", torch.cuda.max_memory_reserved() / 2**20)
        if os.environ.get("FLOWER_BENCH_PROFILE"):
            profile(step, mode)

        model.eval()

        def infer():
            with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
                model(x)

        result(f"infer_{mode}_img_s", batch / timed(infer, steps, warmup=3))


def main():
    batch = int(sys.argv[1]) if len(sys.argv) > 1 else 128
    steps = int(sys.argv[2]) if len(sys.argv) > 2 else 20
    torch.backends.cudnn.benchmark = True
    torch.backends.cudnn.allow_tf32 = True
    torch.backends.cuda.matmul.allow_tf32 = True
    print(f"# torch {torch.__version__}, {torch.cuda.get_device_name()}, cuDNN {torch.backends.cudnn.version()}")
    what = sys.argv[3] if len(sys.argv) > 3 else "all"
    if what in ("all", "kernels"):
        kernels(batch)
        torch.cuda.empty_cache()
    if what in ("all", "model"):
        model_bench(batch, steps)


if __name__ == "__main__":
    main()
