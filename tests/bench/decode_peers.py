"""Peers for tests/bench/decode.lua: decode + resize (shorter side to SHORT) + center crop CROP with
the tools people use instead of flowerlua, on the same files, in one and in several processes.

  decode_peers.py LIST SHORT CROP REPEAT RUNS WORKERS...
  decode_peers.py --loader LIST SIZE BATCH REPEAT RUNS WORKERS...

The second form times PyTorch's DataLoader (torchvision transforms on Pillow images, ToTensor:
float32 CHW batches) for the 'eval' (Resize(SIZE / 0.875), CenterCrop(SIZE)) and 'train'
(RandomResizedCrop(SIZE), RandomHorizontalFlip) transforms, num_workers = WORKERS, one warm-up
epoch then the best of RUNS epochs; prints {"tool", "version", "transform", "workers",
"images_per_s"} per line.

LIST is a file of JPEG paths, one per line; each measurement runs over the list REPEAT times and the
best of RUNS measurements is kept. Prints one JSON object per (tool, workers):
  {"tool": ..., "version": ..., "workers": n, "images_per_s": x}

Every tool decodes at the smallest size its JPEG decoder offers that keeps the shorter side >= SHORT
(so no tool upsamples), then resizes with its antialiased filter and crops:
  pillow:  Image.open, draft('RGB', size) (1/1, 1/2, 1/4, 1/8), convert('RGB'), resize(BILINEAR),
           crop -- what Keras's and torchvision's loaders do
  opencv:  imdecode(IMREAD_COLOR or IMREAD_REDUCED_COLOR_2/4/8), resize(INTER_AREA), BGR->RGB, crop
  turbojpeg: PyTurboJPEG decode(TJPF_RGB, scaling_factor = the smallest M/8 that fits),
           cv2.resize(INTER_AREA), crop
"""
import functools
import json
import multiprocessing as mp
import sys
import time
from fractions import Fraction

SHORT = CROP = 0


def crop_center(a, c):
    h, w = a.shape[:2]
    t, l = (h - c) // 2, (w - c) // 2
    return a[t:t + c, l:l + c]


def run_pillow(path):
    from PIL import Image
    im = Image.open(path)
    w, h = im.size
    s = SHORT / min(w, h)
    im.draft("RGB", (int(w * s + 0.999), int(h * s + 0.999)))
    im = im.convert("RGB")
    w, h = im.size
    s = SHORT / min(w, h)
    im = im.resize((max(CROP, round(w * s)), max(CROP, round(h * s))), Image.BILINEAR)
    w, h = im.size
    l, t = (w - CROP) // 2, (h - CROP) // 2
    return im.crop((l, t, l + CROP, t + CROP)).tobytes()


def resize_crop_cv2(img):
    import cv2
    h, w = img.shape[:2]
    s = SHORT / min(w, h)
    img = cv2.resize(img, (max(CROP, round(w * s)), max(CROP, round(h * s))), interpolation=cv2.INTER_AREA)
    return crop_center(img, CROP)


_dims = {}


def jpeg_size(data):
    """(width, height) from the SOF marker."""
    i = 2
    while i < len(data):
        if data[i] != 0xFF:
            i += 1
            continue
        m = data[i + 1]
        if m in (0xC0, 0xC1, 0xC2):
            return int.from_bytes(data[i + 7:i + 9], "big"), int.from_bytes(data[i + 5:i + 7], "big")
        i += 2 + int.from_bytes(data[i + 2:i + 4], "big")
    raise ValueError("no SOF")


def run_opencv(path):
    import cv2
    import numpy as np
    buf = np.fromfile(path, np.uint8)
    w, h = jpeg_size(buf[:4096].tobytes())
    flag = cv2.IMREAD_COLOR
    for r, f in ((8, cv2.IMREAD_REDUCED_COLOR_8), (4, cv2.IMREAD_REDUCED_COLOR_4), (2, cv2.IMREAD_REDUCED_COLOR_2)):
        if min(w, h) // r >= SHORT:
            flag = f
            break
    img = cv2.imdecode(buf, flag)
    img = resize_crop_cv2(img)
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


_tj = None


def run_turbojpeg(path):
    global _tj
    from turbojpeg import TurboJPEG, TJPF_RGB
    if _tj is None:
        _tj = TurboJPEG()
    data = open(path, "rb").read()
    w, h = jpeg_size(data[:4096])
    best = Fraction(1)
    for n, d in _tj.scaling_factors:
        f = Fraction(n, d)
        if f <= 1 and min(w, h) * f >= SHORT and f < best:
            best = f
    img = _tj.decode(data, pixel_format=TJPF_RGB, scaling_factor=(best.numerator, best.denominator))
    return resize_crop_cv2(img)


def init_worker(short, crop):
    global SHORT, CROP
    SHORT, CROP = short, crop
    import cv2
    cv2.setNumThreads(1)


def pooled(fn, p):
    fn(p)  # the result stays in the worker: the work is timed, not pickling it back


def measure(fn, paths, workers, runs):
    best = 0.0
    for _ in range(runs):
        if workers == 1:
            t = time.perf_counter()
            for p in paths:
                fn(p)
            dt = time.perf_counter() - t
        else:
            with mp.Pool(workers, initializer=init_worker, initargs=(SHORT, CROP)) as pool:
                work = functools.partial(pooled, fn)
                pool.map(work, paths[:workers * 4])  # start the processes, load the modules
                t = time.perf_counter()
                for _ in pool.imap_unordered(work, paths, chunksize=16):
                    pass
                dt = time.perf_counter() - t
        best = max(best, len(paths) / dt)
    return best


class Files:
    def __init__(self, paths, tf):
        self.paths, self.tf = paths, tf

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        from PIL import Image
        with open(self.paths[i], "rb") as f:
            im = Image.open(f).convert("RGB")
        return self.tf(im)


def loader_main(argv):
    import torch
    import torchvision
    from torchvision import transforms as T
    lst, size, batch, repeat, runs = argv[0], int(argv[1]), int(argv[2]), int(argv[3]), int(argv[4])
    workers = [int(w) for w in argv[5:]] or [1]
    torch.set_num_threads(1)
    paths = [l.strip() for l in open(lst) if l.strip()] * repeat
    tfs = {"eval": T.Compose([T.Resize(int(size / 0.875)), T.CenterCrop(size), T.ToTensor()]),
           "train": T.Compose([T.RandomResizedCrop(size), T.RandomHorizontalFlip(), T.ToTensor()])}
    for name, tf in tfs.items():
        for w in workers:
            dl = torch.utils.data.DataLoader(Files(paths, tf), batch_size=batch, shuffle=True, num_workers=w,
                                             persistent_workers=True)
            for _ in dl:  # warm-up epoch
                pass
            best = 0.0
            for _ in range(runs):
                t = time.perf_counter()
                n = sum(len(b) for b in dl)
                best = max(best, n / (time.perf_counter() - t))
            del dl
            print(json.dumps({"tool": "torch", "version": "PyTorch %s DataLoader + torchvision %s" % (
                torch.__version__, torchvision.__version__), "transform": name, "workers": w,
                "images_per_s": best}), flush=True)


def main():
    if sys.argv[1] == "--loader":
        return loader_main(sys.argv[2:])
    lst, short, crop, repeat, runs = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
    workers = [int(w) for w in sys.argv[6:]] or [1]
    init_worker(short, crop)
    paths = [l.strip() for l in open(lst) if l.strip()] * repeat
    import cv2
    import PIL
    import turbojpeg
    tools = [("pillow", "Pillow " + PIL.__version__, run_pillow),
             ("opencv", "OpenCV " + cv2.__version__, run_opencv),
             ("turbojpeg", "PyTurboJPEG " + getattr(turbojpeg, "__version__", "?") + " + cv2.resize", run_turbojpeg)]
    for w in workers:
        for tool, version, fn in tools:
            fn(paths[0])  # warm up (imports, library loading)
            ips = measure(fn, paths, w, runs)
            print(json.dumps({"tool": tool, "version": version, "workers": w, "images_per_s": ips}), flush=True)


if __name__ == "__main__":
    main()
