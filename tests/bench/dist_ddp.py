"""The PyTorch peer of tests/bench/dist.lua: DistributedDataParallel (gloo, CPU), one thread per rank.

usage: dist_ddp.py MODEL RANKS STEPS   (MODEL: small_cnn | resnet50)
Prints `RESULT step_s exposed_allreduce_s grad_bytes 0 0` from rank 0: the slowest rank's mean DDP
step, and that minus the same step under ddp.no_sync() (no gradient reduction).
"""
import datetime
import os
import socket
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn


def build(name):
    torch.manual_seed(0)
    if name == 'resnet50':
        import torchvision
        return torchvision.models.resnet50(), 224, 1000
    # the same small CNN as tests/bench/dist.lua (Keras 'same' padding = 1 for 3x3)
    return nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(64, 128, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(128, 10)), 64, 10


def worker(rank, world, name, steps, port):
    torch.set_num_threads(1)
    os.environ['MASTER_ADDR'] = '127.0.0.1'
    os.environ['MASTER_PORT'] = str(port)
    dist.init_process_group('gloo', rank=rank, world_size=world, timeout=datetime.timedelta(seconds=300))
    model, size, classes = build(name)
    ddp = nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.001, momentum=0.9)
    loss_fn = nn.CrossEntropyLoss()
    g = torch.Generator().manual_seed(1 + rank)
    x = torch.rand(8, 3, size, size, generator=g) * 255
    y = torch.randint(0, classes, (8,), generator=g)

    def step():
        opt.zero_grad()
        loss_fn(ddp(x), y).backward()
        opt.step()

    def timed(sync):
        step() if sync else nosync_step()
        dist.barrier()
        t0 = time.perf_counter()
        for _ in range(steps):
            step() if sync else nosync_step()
        return (time.perf_counter() - t0) / steps

    def nosync_step():
        with ddp.no_sync():
            step()

    t_sync = timed(True)
    t_local = timed(False)
    worst = torch.tensor([t_sync, t_sync - t_local], dtype=torch.float64)
    dist.all_reduce(worst, op=dist.ReduceOp.MAX)
    grad_bytes = sum(p.numel() * 4 for p in model.parameters() if p.requires_grad)
    if rank == 0:
        print('RESULT %.5f %.5f %d 0 0' % (worst[0].item(), max(0.0, worst[1].item()) if world > 1 else 0.0, grad_bytes),
              flush=True)
    # Leave without running destructors: torch 1.13's ~Reducer / ~ProcessGroupGloo at interpreter exit
    # joins a gloo thread that waits for the GIL the main thread holds, so about one run in two hung
    # forever after printing (seen here: 2 of 3 runs of `small_cnn 2 3`). The barrier makes sure both
    # ranks are past their last collective first.
    dist.barrier()
    sys.stdout.flush()
    os._exit(0)


if __name__ == '__main__':
    name, world, steps = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    with socket.socket() as s:          # a free port for the rendezvous
        s.bind(('127.0.0.1', 0))
        port = s.getsockname()[1]
    mp.spawn(worker, args=(world, name, steps, port), nprocs=world, join=True)
