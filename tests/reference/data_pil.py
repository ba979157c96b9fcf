"""Image references for tests/lua/test_data_image.lua, made by Pillow, PyTurboJPEG and numpy.

  data_pil.py OUTDIR     writes OUTDIR/manifest.json, JPEG files and raw RGB results (*.rgb)

JPEGs are written by Pillow (not by flowerlua) from a photo-like numpy picture, in every variant the
decoder must handle: baseline 4:2:0 and 4:4:4, progressive, grayscale, CMYK (Adobe, inverted, as
Photoshop and Pillow write it), and EXIF orientations 1..8. For each, the manifest gives Pillow's
decoded RGB (after ImageOps.exif_transpose) and, for the DCT-scaled sizes, PyTurboJPEG's decode
with that scaling factor (libjpeg-turbo's TurboJPEG API, exact DCT, fancy upsampling).

Resampling: Pillow's Image.resize(size, filter, box) of one decoded picture, for each filter,
several sizes (down, odd, up) and fractional boxes. flowerlua resizes the same pixels.

Pipeline: the 'eval' transform (shorter side to size / 0.875, center size x size crop) done by Pillow
on the full decode, at 224 and 96, to bound what DCT scaling changes.
"""
import json
from fractions import Fraction
import os
import sys

import numpy as np
from PIL import Image, ImageOps


def picture(w, h, seed):
    """Smooth colour fields, hard-edged discs and fine texture: what JPEG and resizing find hard."""
    rng = np.random.RandomState(seed)
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    img = np.zeros((h, w, 3))
    for c in range(3):
        fx, fy, ph = rng.uniform(0.5, 3, 3)
        img[..., c] = 128 + 90 * np.sin(fx * x / w * 2 * np.pi + ph) * np.cos(fy * y / h * 2 * np.pi)
    for _ in range(12):
        cx, cy, r = rng.uniform(0, w), rng.uniform(0, h), rng.uniform(10, 80)
        col = rng.uniform(0, 255, 3)
        mask = (x - cx) ** 2 + (y - cy) ** 2 < r * r
        img[mask] = col
    img += rng.normal(0, 6, img.shape)
    img[::7, :, 1] += 30  # a fine stripe pattern
    return np.clip(img + 0.5, 0, 255).astype(np.uint8)


def exif_with_orientation(o):
    # A minimal little-endian TIFF/EXIF block: IFD0 with one entry, Orientation (0x0112, SHORT).
    tiff = b"II*\x00" + (8).to_bytes(4, "little")
    tiff += (1).to_bytes(2, "little")
    tiff += (0x0112).to_bytes(2, "little") + (3).to_bytes(2, "little") + (1).to_bytes(4, "little")
    tiff += o.to_bytes(2, "little") + b"\x00\x00"
    tiff += (0).to_bytes(4, "little")
    return b"Exif\x00\x00" + tiff


def main(out):
    os.makedirs(out, exist_ok=True)
    man = {"decode": [], "scaled": [], "resize": [], "pipeline": []}
    src = picture(613, 459, 1)
    base = Image.fromarray(src, "RGB")

    def save(name, im, **kw):
        path = os.path.join(out, name)
        im.save(path, "JPEG", **kw)
        return name

    def pil_decoded(name):
        im = Image.open(os.path.join(out, name))
        im = ImageOps.exif_transpose(im)
        return np.asarray(im.convert("RGB"))

    def raw(name, arr):
        arr = np.ascontiguousarray(arr, dtype=np.uint8)
        with open(os.path.join(out, name), "wb") as f:
            f.write(arr.tobytes())
        return name

    variants = [
        ("baseline420.jpg", base, dict(quality=90)),
        ("baseline444.jpg", base, dict(quality=92, subsampling=0)),
        ("progressive.jpg", base, dict(quality=85, progressive=True)),
        ("gray.jpg", base.convert("L"), dict(quality=90)),
        ("cmyk.jpg", base.convert("CMYK"), dict(quality=90)),
    ]
    for o in range(1, 9):
        variants.append(("orient%d.jpg" % o, base, dict(quality=90, exif=exif_with_orientation(o))))
    for name, im, kw in variants:
        save(name, im, **kw)
        d = pil_decoded(name)
        man["decode"].append({"file": name, "h": int(d.shape[0]), "w": int(d.shape[1]),
                              "pixels": raw(name + ".rgb", d)})

    # DCT-scaled decodes through TurboJPEG (exact DCT, fancy upsampling: libjpeg's defaults)
    from turbojpeg import TurboJPEG, TJPF_RGB
    tj = TurboJPEG()
    for name in ("baseline420.jpg", "baseline444.jpg", "progressive.jpg", "gray.jpg"):
        data = open(os.path.join(out, name), "rb").read()
        for num in (1, 2, 3, 4, 5, 6, 7):
            fr = Fraction(num, 8)
            d = tj.decode(data, pixel_format=TJPF_RGB, scaling_factor=(fr.numerator, fr.denominator))
            if d.ndim == 2 or d.shape[2] == 1:
                d = np.repeat(d.reshape(d.shape[0], d.shape[1], 1), 3, axis=2)
            man["scaled"].append({"file": name, "eighths": num, "h": int(d.shape[0]), "w": int(d.shape[1]),
                                  "pixels": raw("%s.%d.rgb" % (name, num), d)})

    # resampling of one decoded picture
    dec = pil_decoded("baseline420.jpg")
    man["resize_source"] = {"h": int(dec.shape[0]), "w": int(dec.shape[1]), "pixels": raw("resize_src.rgb", dec)}
    im = Image.fromarray(dec, "RGB")
    filters = {"box": Image.BOX, "bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC, "lanczos": Image.LANCZOS}
    sizes = [(224, 224), (61, 97), (500, 700), (459, 300)]
    boxes = [None, (13.7, 20.2, 400.5, 300.9), (0.0, 0.0, 613.0, 100.5)]
    k = 0
    for fname, f in filters.items():
        for (h, w) in sizes:
            for box in boxes:
                r = np.asarray(im.resize((w, h), f, box=box))
                k += 1
                man["resize"].append({"filter": fname, "h": h, "w": w, "box": list(box) if box else None,
                                      "pixels": raw("resize%d.rgb" % k, r)})

    # the eval pipeline (shorter side size / 0.875, center crop size x size) on the full decode
    for size in (224, 96):
        for name in ("baseline420.jpg", "progressive.jpg", "orient6.jpg"):
            d = pil_decoded(name)
            H, W = d.shape[:2]
            f = size / 0.875 / min(W, H)
            cw, ch = size / f, size / f
            box = ((W - cw) / 2, (H - ch) / 2, (W - cw) / 2 + cw, (H - ch) / 2 + ch)
            r = np.asarray(Image.fromarray(d).resize((size, size), Image.BILINEAR, box=box))
            man["pipeline"].append({"file": name, "h": size, "w": size,
                                    "pixels": raw("pipe_%d_%s.rgb" % (size, name), r)})

    import PIL
    man["versions"] = {"pillow": PIL.__version__, "numpy": np.__version__}
    with open(os.path.join(out, "manifest.json.tmp"), "w") as fh:
        json.dump(man, fh, indent=1)
    os.replace(os.path.join(out, "manifest.json.tmp"), os.path.join(out, "manifest.json"))


if __name__ == "__main__":
    main(sys.argv[1])
