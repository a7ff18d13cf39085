"""On-device augmentation, inside the jitted step: uint8 NHWC batches in, normalised float32 out.

The reference's CIFAR recipe (timm 0.6.5 `create_transform`, docs/reference.md §4.1), per example and vectorised:
random resized crop on the source image, resized to the student's size with bilinear or bicubic (PIL's
resampling), horizontal flip, optional RandAugment on the uint8 image, normalisation; then, on the batch,
mixup/cutmix with soft targets (`mix`) and random erasing (`random_erase`). Images stay float32 holding
integer values 0..255 until normalisation, rounded where PIL rounds.

Config keys (`data.augment`, defaults = the reference's CNN recipe, see `default_config`):
  translate      legacy zero-filled random shift in source pixels, before everything else (digits demo)
  random_resized_crop   True: timm RandomResizedCropAndInterpolation; False: resize the whole image
  scale, ratio   crop area fraction and log-uniform aspect range
  interpolation  "random" (bilinear or bicubic per example), "bilinear" or "bicubic"
  hflip          flip probability
  rand_augment   timm RandAugment string, e.g. "rand-m9-mstd0.5-inc1"; "" = off
  random_erasing, erasing_mode, erasing_count   random erasing (prob) after normalisation and mixing
  mixup, cutmix, mixup_prob, mixup_switch_prob   mixup/cutmix alphas (0 = off), mode "batch"
  crop_pct, eval_interpolation   eval resize; 0 / "" = the student's declared value (its models.ModelSpec)
"""
import functools
import math
import types

import jax
import jax.numpy as jnp
import ml_collections

from rsd_jax import data, models

HIGHEST = jax.lax.Precision.HIGHEST

# {model: (crop_pct, interpolation)}, a read-only view of the models' declared eval resize.
EVAL_CONFIGS = types.MappingProxyType({name: (s.crop_pct, s.interpolation) for name, s in models.specs().items()})


def default_config():
    """`data.augment` with the reference's CNN-recipe defaults (cifar/cnn.yaml + train.py argparse)."""
    return ml_collections.ConfigDict(dict(
        translate=0,
        random_resized_crop=True, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), interpolation="random",
        hflip=0.5,
        rand_augment="",
        random_erasing=0.0, erasing_mode="pixel", erasing_count=1,
        mixup=0.0, cutmix=0.0, mixup_prob=1.0, mixup_switch_prob=0.5,
        crop_pct=0.0, eval_interpolation="",
    ))


def vit_recipe(config=None):
    """The reference's ViT/MLP recipe (cifar/vit_mlp.yaml) on top of `config` (default: `default_config()`)."""
    config = config or default_config()
    config.update(dict(rand_augment="rand-m9-mstd0.5-inc1", random_erasing=0.25, mixup=0.8, cutmix=1.0))
    return config


# A key missing from an older config means "off", so a config with only `translate` keeps its old meaning.
_MISSING = dict(random_resized_crop=False, hflip=0.0)


def _get(config, key):
    return config.get(key, _MISSING.get(key, default_config()[key]))


def normalize(images, mean, std):
    x = images.astype(jnp.float32) / 255.0
    return (x - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)


def random_translate(images, rng, pad):
    """Shift each image by up to `pad` pixels in each direction, filling with zeros (crop of a padded image)."""
    if pad == 0:
        return images
    n, h, w, c = images.shape
    padded = jnp.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    offsets = jax.random.randint(rng, (n, 2), 0, 2 * pad + 1)
    crop = lambda img, off: jax.lax.dynamic_slice(img, (off[0], off[1], 0), (h, w, c))
    return jax.vmap(crop)(padded, offsets)


# ------------------------------------------------------------------------------------ PIL resampling

def _bilinear(x):
    return jnp.maximum(0.0, 1.0 - jnp.abs(x))


def _bicubic(x, a=-0.5):
    x = jnp.abs(x)
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = (((x - 5) * x + 8) * x - 4) * a
    return jnp.where(x < 1, near, jnp.where(x < 2, far, 0.0))


def resize_weights(start, length, in_size, out_size, cubic):
    """(out_size, in_size) weights of PIL's resize of the box [start, start+length) (a crop, so pixels outside it
    are never read) to out_size pixels: half-pixel centres, support widened when downscaling, weights renormalised
    at the box edges. `start`, `length` and `cubic` may be traced scalars."""
    length = jnp.asarray(length, jnp.float32)
    scale = length / out_size
    filter_scale = jnp.maximum(scale, 1.0)
    centre = (jnp.arange(out_size, dtype=jnp.float32)[:, None] + 0.5) * scale
    k = jnp.arange(in_size, dtype=jnp.float32)[None, :] - jnp.asarray(start, jnp.float32)
    x = (k + 0.5 - centre) / filter_scale
    w = jnp.where(cubic, _bicubic(x), _bilinear(x))
    w = jnp.where((k >= 0) & (k < length), w, 0.0)
    return w / jnp.sum(w, axis=1, keepdims=True)


def _round8(x):
    """PIL's fixed-point resampler rounds half up and clips to uint8 after each pass."""
    return jnp.clip(jnp.floor(x + 0.5), 0, 255)


def resample(images, wy, wx):
    """Per-example separable resize: images (B,H,W,C), wy (B,out_h,H), wx (B,out_w,W). Horizontal pass first,
    rounded to uint8 in between, as PIL."""
    images = images.astype(jnp.float32)
    tmp = _round8(jnp.einsum("bxw,bhwc->bhxc", wx, images, precision=HIGHEST))
    return _round8(jnp.einsum("byh,bhxc->byxc", wy, tmp, precision=HIGHEST))


def resized_crop(images, boxes, size, cubic):
    """PIL `img.crop(box).resize(size)` per example: boxes (B,4) int (top, left, height, width), cubic (B,) bool."""
    _, h, w, _ = images.shape
    wy = jax.vmap(lambda b, c: resize_weights(b[0], b[2], h, size[0], c))(boxes, cubic)
    wx = jax.vmap(lambda b, c: resize_weights(b[1], b[3], w, size[1], c))(boxes, cubic)
    return resample(images, wy, wx)


def sample_crop_boxes(rng, n, height, width, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), tries=10):
    """timm's RandomResizedCrop box, vectorised: `tries` draws per example, the first that fits, else the
    central fallback. Returns (n, 4) int32 (top, left, height, width)."""
    k_area, k_ratio, k_top, k_left = jax.random.split(rng, 4)
    area = height * width * jax.random.uniform(k_area, (n, tries), minval=scale[0], maxval=scale[1])
    aspect = jnp.exp(jax.random.uniform(k_ratio, (n, tries), minval=math.log(ratio[0]), maxval=math.log(ratio[1])))
    # jnp.round rounds half to even, like Python's round.
    cw = jnp.round(jnp.sqrt(area * aspect)).astype(jnp.int32)
    ch = jnp.round(jnp.sqrt(area / aspect)).astype(jnp.int32)
    fits = (cw <= width) & (ch <= height)
    first = jnp.argmax(fits, axis=1)
    ok = jnp.any(fits, axis=1)
    cw = jnp.take_along_axis(cw, first[:, None], 1)[:, 0]
    ch = jnp.take_along_axis(ch, first[:, None], 1)[:, 0]
    top = jnp.floor(jax.random.uniform(k_top, (n,)) * (height - ch + 1)).astype(jnp.int32)
    left = jnp.floor(jax.random.uniform(k_left, (n,)) * (width - cw + 1)).astype(jnp.int32)
    fallback = jnp.array(data.central_crop_box(width, height, ratio), jnp.int32)   # static: the shape only
    boxes = jnp.stack([top, left, ch, cw], axis=1)
    return jnp.where(ok[:, None], boxes, fallback)


def _interp_choice(rng, n, interpolation):
    if interpolation == "random":
        return jax.random.bernoulli(rng, 0.5, (n,))
    if interpolation not in ("bilinear", "bicubic"):
        raise ValueError(f"interpolation {interpolation!r}: use 'random', 'bilinear' or 'bicubic'")
    return jnp.full((n,), interpolation == "bicubic")


# ------------------------------------------------------------------------------------ RandAugment ops
# Each op takes one float image (H,W,C) with integer values and its arguments (traced scalars) and matches
# timm's PIL op. They share three primitives: a per-channel lookup table, a blend with a degenerate image,
# and an affine resampler; RandAugment selects each primitive's arguments per example and runs each once.

def _apply_lut(img, lut):
    """lut (C, 256) -> img[..., c] mapped through lut[c]."""
    idx = img.astype(jnp.int32)
    return jnp.stack([lut[c][idx[..., c]] for c in range(img.shape[-1])], axis=-1)


def _histogram(img):
    c = img.shape[-1]
    idx = (img.astype(jnp.int32) + 256 * jnp.arange(c)).reshape(-1)  # one scatter for all channels
    return jnp.zeros(256 * c, jnp.int32).at[idx].add(1).reshape(c, 256)


def _lut_identity(img):
    return jnp.broadcast_to(jnp.arange(256, dtype=jnp.float32), (img.shape[-1], 256))


def _lut_autocontrast(img):
    levels = jnp.arange(256)
    lo = jnp.min(img.reshape(-1, img.shape[-1]), axis=0)[:, None]  # the lowest and highest levels present
    hi = jnp.max(img.reshape(-1, img.shape[-1]), axis=0)[:, None]
    scale = 255.0 / jnp.maximum(hi - lo, 1.0)
    lut = jnp.clip(jnp.trunc(levels * scale - lo * scale), 0, 255)
    return jnp.where(hi > lo, lut, _lut_identity(img))


def _lut_equalize(img):
    hist = _histogram(img)
    last = jnp.take_along_axis(hist, jnp.max(jnp.where(hist > 0, jnp.arange(256), 0), 1, keepdims=True), 1)
    step = (jnp.sum(hist, 1, keepdims=True) - last) // 255
    cum = jnp.cumsum(hist, axis=1) - hist  # pixels below each level
    lut = jnp.minimum((step // 2 + cum) // jnp.maximum(step, 1), 255).astype(jnp.float32)
    return jnp.where(step > 0, lut, _lut_identity(img))  # one level only: step is 0 too


def _lut_posterize(img, bits):
    shift = (8 - jnp.asarray(bits)).astype(jnp.int32)
    lut = (jnp.arange(256) >> shift) << shift
    return jnp.broadcast_to(jnp.where(bits >= 8, jnp.arange(256), lut).astype(jnp.float32), (img.shape[-1], 256))


def _lut_solarize(img, thresh):
    x = jnp.arange(256, dtype=jnp.float32)
    return jnp.broadcast_to(jnp.where(x < thresh, x, 255 - x), (img.shape[-1], 256))


def _lut_solarize_add(img, add, thresh=128):
    x = jnp.arange(256, dtype=jnp.float32)
    return jnp.broadcast_to(jnp.where(x < thresh, jnp.minimum(255, x + add), x), (img.shape[-1], 256))


def _lut_invert(img):
    return jnp.broadcast_to(255 - jnp.arange(256, dtype=jnp.float32), (img.shape[-1], 256))


def _gray(img):
    """PIL's RGB -> L (ITU-R 601-2 in 16-bit fixed point)."""
    i = img.astype(jnp.int32)
    return ((i[..., 0] * 19595 + i[..., 1] * 38470 + i[..., 2] * 7471 + 0x8000) >> 16).astype(jnp.float32)


def _degenerate_color(img):
    return jnp.broadcast_to(_gray(img)[..., None], img.shape)


def _degenerate_contrast(img):
    return jnp.full_like(img, jnp.floor(jnp.mean(_gray(img)) + 0.5))


def _degenerate_sharpness(img):
    """PIL's ImageFilter.SMOOTH (3x3, centre 5, /13), rounded; the one-pixel border keeps the original."""
    k = jnp.array([[1, 1, 1], [1, 5, 1], [1, 1, 1]], jnp.float32) / 13.0
    padded = jnp.pad(img, ((1, 1), (1, 1), (0, 0)))
    h, w = img.shape[:2]
    smooth = sum(k[dy, dx] * padded[dy:dy + h, dx:dx + w] for dy in range(3) for dx in range(3))
    smooth = jnp.clip(jnp.floor(smooth + 0.5), 0, 255)
    inner = jnp.zeros((h, w, 1), bool).at[1:-1, 1:-1].set(True)
    return jnp.where(inner, smooth, img)


def _blend(degenerate, img, factor):
    """PIL Image.blend(degenerate, img, factor): float32 arithmetic, truncated to uint8."""
    factor = jnp.asarray(factor, jnp.float32)
    return jnp.clip(jnp.trunc(degenerate + factor * (img - degenerate)), 0, 255)


def affine(img, matrix, fill, cubic):
    """PIL `img.transform(size, AFFINE, matrix, resample, fillcolor)`: output pixel centre (x+.5, y+.5) reads the
    input at (a x + b y + c, d x + e y + f); outside the image -> fill; neighbours clamped at the edges."""
    h, w, _ = img.shape
    a, b, c, d, e, f = [matrix[i] for i in range(6)]
    y, x = jnp.meshgrid(jnp.arange(h, dtype=jnp.float32) + 0.5, jnp.arange(w, dtype=jnp.float32) + 0.5,
                        indexing="ij")
    xin = a * x + b * y + c
    yin = d * x + e * y + f
    inside = (xin >= 0) & (xin < w) & (yin >= 0) & (yin < h)
    xs, ys = xin - 0.5, yin - 0.5
    x0, y0 = jnp.floor(xs), jnp.floor(ys)
    dx, dy = xs - x0, ys - y0
    taps = jnp.arange(-1, 3, dtype=jnp.float32)  # 4 taps; bilinear uses the middle two
    # PIL's transform bicubic is the a=-1 cubic (its resize uses a=-0.5).
    wx = jnp.where(cubic, _bicubic(dx[..., None] - taps, -1.0), _bilinear(dx[..., None] - taps))
    wy = jnp.where(cubic, _bicubic(dy[..., None] - taps, -1.0), _bilinear(dy[..., None] - taps))
    xi = jnp.clip(x0[..., None] + taps, 0, w - 1).astype(jnp.int32)
    yi = jnp.clip(y0[..., None] + taps, 0, h - 1).astype(jnp.int32)
    flat = img.reshape(h * w, -1)
    idx = yi[..., :, None] * w + xi[..., None, :]  # (h, w, 4, 4)
    vals = flat[idx]  # (h, w, 4, 4, C)
    out = jnp.einsum("hwi,hwj,hwijc->hwc", wy, wx, vals, precision=HIGHEST)
    out = jnp.clip(jnp.trunc(out), 0, 255)
    return jnp.where(inside[..., None], out, jnp.asarray(fill, jnp.float32))


def rotate_matrix(degrees, h, w):
    """PIL Image.rotate's inverse affine about the centre (w/2, h/2)."""
    t = -jnp.deg2rad(degrees)
    cx, cy = w / 2.0, h / 2.0
    a, b, d, e = jnp.cos(t), jnp.sin(t), -jnp.sin(t), jnp.cos(t)
    return jnp.stack([a, b, cx - a * cx - b * cy, d, e, cy - d * cx - e * cy])


def _affine_matrix(kind, arg, h, w):
    one, zero = jnp.ones_like(arg), jnp.zeros_like(arg)
    if kind == "rotate":
        return rotate_matrix(arg, h, w)
    if kind == "shear_x":
        return jnp.stack([one, arg, zero, zero, one, zero])
    if kind == "shear_y":
        return jnp.stack([one, zero, zero, arg, one, zero])
    if kind == "translate_x":  # arg in pixels
        return jnp.stack([one, zero, arg, zero, one, zero])
    if kind == "translate_y":
        return jnp.stack([one, zero, zero, zero, one, arg])
    raise ValueError(kind)


# name -> (primitive, how the magnitude level (0..10) becomes the argument: (level, sign, hparams) -> arg)
# `sign` is +-1, timm's `_randomly_negate`.
_OPS = {
    "AutoContrast": ("lut", None),
    "Equalize": ("lut", None),
    "Invert": ("lut", None),
    "Rotate": ("affine", lambda m, s, hp: s * m / 10 * 30.0),
    "Posterize": ("lut", lambda m, s, hp: jnp.trunc(m / 10 * 4)),
    "PosterizeIncreasing": ("lut", lambda m, s, hp: 4 - jnp.trunc(m / 10 * 4)),
    "PosterizeOriginal": ("lut", lambda m, s, hp: jnp.trunc(m / 10 * 4) + 4),
    "Solarize": ("lut", lambda m, s, hp: jnp.minimum(256, jnp.trunc(m / 10 * 256))),
    "SolarizeIncreasing": ("lut", lambda m, s, hp: 256 - jnp.minimum(256, jnp.trunc(m / 10 * 256))),
    "SolarizeAdd": ("lut", lambda m, s, hp: jnp.minimum(128, jnp.trunc(m / 10 * 110))),
    "Color": ("blend", lambda m, s, hp: m / 10 * 1.8 + 0.1),
    "ColorIncreasing": ("blend", lambda m, s, hp: jnp.maximum(0.1, 1.0 + s * m / 10 * 0.9)),
    "Contrast": ("blend", lambda m, s, hp: m / 10 * 1.8 + 0.1),
    "ContrastIncreasing": ("blend", lambda m, s, hp: jnp.maximum(0.1, 1.0 + s * m / 10 * 0.9)),
    "Brightness": ("blend", lambda m, s, hp: m / 10 * 1.8 + 0.1),
    "BrightnessIncreasing": ("blend", lambda m, s, hp: jnp.maximum(0.1, 1.0 + s * m / 10 * 0.9)),
    "Sharpness": ("blend", lambda m, s, hp: m / 10 * 1.8 + 0.1),
    "SharpnessIncreasing": ("blend", lambda m, s, hp: jnp.maximum(0.1, 1.0 + s * m / 10 * 0.9)),
    "ShearX": ("affine", lambda m, s, hp: s * m / 10 * 0.3),
    "ShearY": ("affine", lambda m, s, hp: s * m / 10 * 0.3),
    "TranslateX": ("affine", lambda m, s, hp: s * m / 10 * hp["translate_const"]),
    "TranslateY": ("affine", lambda m, s, hp: s * m / 10 * hp["translate_const"]),
    "TranslateXRel": ("affine", lambda m, s, hp: s * m / 10 * hp["translate_pct"] * hp["width"]),
    "TranslateYRel": ("affine", lambda m, s, hp: s * m / 10 * hp["translate_pct"] * hp["height"]),
}
RAND_TRANSFORMS = ["AutoContrast", "Equalize", "Invert", "Rotate", "Posterize", "Solarize", "SolarizeAdd", "Color",
                   "Contrast", "Brightness", "Sharpness", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel"]
RAND_INCREASING_TRANSFORMS = ["AutoContrast", "Equalize", "Invert", "Rotate", "PosterizeIncreasing",
                              "SolarizeIncreasing", "SolarizeAdd", "ColorIncreasing", "ContrastIncreasing",
                              "BrightnessIncreasing", "SharpnessIncreasing", "ShearX", "ShearY", "TranslateXRel",
                              "TranslateYRel"]
_AFFINE_KIND = {"Rotate": "rotate", "ShearX": "shear_x", "ShearY": "shear_y", "TranslateX": "translate_x",
                "TranslateY": "translate_y", "TranslateXRel": "translate_x", "TranslateYRel": "translate_y"}


def _lut_for(name, img, arg):
    base = name.replace("Increasing", "").replace("Original", "")
    if base == "AutoContrast":
        return _lut_autocontrast(img)
    if base == "Equalize":
        return _lut_equalize(img)
    if base == "Invert":
        return _lut_invert(img)
    if base == "Posterize":
        return _lut_posterize(img, arg)
    if base == "Solarize":
        return _lut_solarize(img, arg)
    if base == "SolarizeAdd":
        return _lut_solarize_add(img, arg)
    raise ValueError(name)


def _degenerate_for(name, img):
    base = name.replace("Increasing", "")
    return {"Color": _degenerate_color, "Contrast": _degenerate_contrast, "Sharpness": _degenerate_sharpness,
            "Brightness": jnp.zeros_like}[base](img)


def apply_op(name, img, arg, fill=(128, 128, 128), cubic=False):
    """One op with its argument already computed (the value timm's level function returns)."""
    prim = _OPS[name][0]
    arg = jnp.asarray(arg, jnp.float32)
    if prim == "lut":
        return _apply_lut(img, _lut_for(name, img, arg))
    if prim == "blend":
        return _blend(_degenerate_for(name, img), img, arg)
    h, w, _ = img.shape
    return affine(img, _affine_matrix(_AFFINE_KIND[name], jnp.asarray(arg, jnp.float32), h, w), fill, cubic)


def parse_rand_augment(spec):
    """timm's 'rand-m9-n2-mstd0.5-p0.5-inc1-mmax10' -> dict(magnitude, num_layers, std, prob, increasing, max)."""
    parts = spec.split("-")
    if parts[0] != "rand":
        raise ValueError(f"rand_augment {spec!r}: only timm's 'rand-...' strings are supported")
    out = dict(magnitude=10.0, num_layers=2, std=0.0, prob=0.5, increasing=False, max=10.0)
    for p in parts[1:]:
        for key, name, cast in (("mstd", "std", float), ("mmax", "max", float), ("inc", "increasing",
                                lambda v: bool(int(v))), ("m", "magnitude", float), ("n", "num_layers", int),
                                ("p", "prob", float)):
            if p.startswith(key) and p[len(key):][:1].isdigit():
                out[name] = cast(p[len(key):])
                break
        else:
            raise ValueError(f"rand_augment {spec!r}: unknown section {p!r}")
    if out["std"] > 100:
        raise ValueError("rand_augment: uniform magnitude sampling (mstd > 100) is not implemented")
    return out


def rand_augment(images, rng, spec, fill, translate_pct=0.45, translate_const=100):
    """timm RandAugment on a batch (B,H,W,C) of integer-valued floats, independently per example: `num_layers`
    ops drawn with replacement, each applied with probability `prob` at magnitude N(m, std) clipped to [0, max],
    random sign, resample bilinear or bicubic at random, fill colour `fill` (0..255 per channel)."""
    p = parse_rand_augment(spec)
    names = RAND_INCREASING_TRANSFORMS if p["increasing"] else RAND_TRANSFORMS
    n, h, w, _ = images.shape
    hp = dict(translate_pct=translate_pct, translate_const=translate_const, width=w, height=h)
    fill = jnp.asarray(fill, jnp.float32)

    def one_layer(img, key):
        k_op, k_apply, k_mag, k_sign, k_interp = jax.random.split(key, 5)
        op = jax.random.randint(k_op, (), 0, len(names))
        apply = jax.random.uniform(k_apply) < p["prob"]
        m = jnp.clip(p["magnitude"] + p["std"] * jax.random.normal(k_mag), 0.0, p["max"])
        sign = jnp.where(jax.random.uniform(k_sign) > 0.5, -1.0, 1.0)
        cubic = jax.random.bernoulli(k_interp)
        # Each primitive runs once with the arguments of the op drawn (vmap would run every switch branch).
        luts, blend_f, mats = [], [], []
        kinds = []
        for name in names:
            prim, level_fn = _OPS[name]
            arg = level_fn(m, sign, hp) if level_fn else jnp.float32(0)
            kinds.append(prim)
            luts.append(_lut_for(name, img, arg) if prim == "lut" else _lut_identity(img))
            blend_f.append(arg if prim == "blend" else jnp.float32(1))
            mats.append(_affine_matrix(_AFFINE_KIND[name], jnp.asarray(arg, jnp.float32), h, w)
                        if prim == "affine" else jnp.array([1., 0, 0, 0, 1, 0]))
        kind_id = jnp.array([("lut", "blend", "affine").index(k) for k in kinds])[op]
        lut = jnp.stack(luts)[op]
        blend_names = [nm for nm in names if _OPS[nm][0] == "blend"]
        degen_id = jnp.array([blend_names.index(nm) if nm in blend_names else 0 for nm in names])[op]
        degen = jax.lax.switch(degen_id, [functools.partial(_degenerate_for, nm) for nm in blend_names], img)
        out = jax.lax.switch(kind_id, [
            lambda: _apply_lut(img, lut),
            lambda: _blend(degen, img, jnp.stack(blend_f)[op]),
            lambda: affine(img, jnp.stack(mats)[op], fill, cubic),
        ])
        return jnp.where(apply, out, img)

    def one_image(img, key):
        for k in jax.random.split(key, p["num_layers"]):
            img = one_layer(img, k)
        return img

    return jax.vmap(one_image)(images, jax.random.split(rng, n))


# ------------------------------------------------------------------------------------ batch-level ops

def random_erase(images, rng, prob=0.25, mode="pixel", count=1, area=(0.02, 1 / 3), aspect=(0.3, 1 / 0.3),
                 tries=10):
    """timm RandomErasing on normalised images (B,H,W,C), per example: with probability `prob`, `count` boxes
    of area fraction U(area)/count and log-uniform aspect, the first of `tries` that fits strictly, filled with
    per-pixel N(0,1) ('pixel'), one N(0,1) colour per box ('rand') or zeros ('const')."""
    if prob <= 0:
        return images
    n, h, w, c = images.shape
    k_apply, k_boxes = jax.random.split(rng)
    apply = jax.random.uniform(k_apply, (n,)) <= prob
    for k in jax.random.split(k_boxes, count):
        k_area, k_ratio, k_top, k_left, k_fill = jax.random.split(k, 5)
        target = h * w * jax.random.uniform(k_area, (n, tries), minval=area[0], maxval=area[1]) / count
        ar = jnp.exp(jax.random.uniform(k_ratio, (n, tries), minval=math.log(aspect[0]),
                                        maxval=math.log(aspect[1])))
        bh = jnp.round(jnp.sqrt(target * ar)).astype(jnp.int32)
        bw = jnp.round(jnp.sqrt(target / ar)).astype(jnp.int32)
        fits = (bw < w) & (bh < h)
        first = jnp.argmax(fits, axis=1)[:, None]
        bh = jnp.take_along_axis(bh, first, 1)
        bw = jnp.take_along_axis(bw, first, 1)
        top = jnp.floor(jax.random.uniform(k_top, (n, 1)) * (h - bh + 1)).astype(jnp.int32)
        left = jnp.floor(jax.random.uniform(k_left, (n, 1)) * (w - bw + 1)).astype(jnp.int32)
        rows = jnp.arange(h)[None, :]
        cols = jnp.arange(w)[None, :]
        in_r = (rows >= top) & (rows < top + bh)
        in_c = (cols >= left) & (cols < left + bw)
        box = in_r[:, :, None] & in_c[:, None, :] & (apply & jnp.any(fits, axis=1))[:, None, None]
        if mode == "pixel":
            noise = jax.random.normal(k_fill, images.shape, images.dtype)
        elif mode == "rand":
            noise = jnp.broadcast_to(jax.random.normal(k_fill, (n, 1, 1, c), images.dtype), images.shape)
        elif mode == "const":
            noise = jnp.zeros_like(images)
        else:
            raise ValueError(f"remode {mode!r}: use 'pixel', 'rand' or 'const'")
        images = jnp.where(box[..., None], noise, images)
    return images


def smooth_one_hot(labels, num_classes, smoothing):
    off = smoothing / num_classes
    return jax.nn.one_hot(labels, num_classes) * (1.0 - smoothing) + off


def mix(images, labels, rng, num_classes, mixup_alpha=0.8, cutmix_alpha=1.0, prob=1.0, switch_prob=0.5,
        smoothing=0.1, group_size=0, pin=None):
    """timm Mixup in mode 'batch' on (B,H,W,C) float images and int labels -> (images, soft targets (B, C)).
    Within each group of `group_size` consecutive examples (0 = the whole batch; the reference mixes each
    GPU's batch of 128) one lambda: with probability `prob`, cutmix (with probability `switch_prob` when both
    are on) or mixup; the partner is the group reversed; the cutmix lambda is corrected to the clipped box.
    `pin`, if given, is applied to the groups' drawn scalars: a sharding constraint that keeps the beta sampler's
    rejection loop on every device, instead of split across devices with a collective in each iteration."""
    b, h, w, _ = images.shape
    g = group_size or b
    if b % g:
        raise ValueError(f"batch {b} is not a multiple of the mixing group size {g}")

    def draw(key):
        k_apply, k_switch, k_lam, k_box = jax.random.split(key, 4)
        do_mix = jax.random.uniform(k_apply) < prob
        if mixup_alpha > 0 and cutmix_alpha > 0:
            use_cutmix = jax.random.uniform(k_switch) < switch_prob
        else:
            use_cutmix = jnp.asarray(cutmix_alpha > 0)
        alpha = jnp.where(use_cutmix, max(cutmix_alpha, 1e-6), max(mixup_alpha, 1e-6))
        lam = jnp.where(do_mix, jax.random.beta(k_lam, alpha, alpha), 1.0)
        cy = jax.random.randint(k_box, (), 0, h)
        cx = jax.random.randint(jax.random.fold_in(k_box, 1), (), 0, w)
        return do_mix, use_cutmix, lam, cy, cx

    def one_group(x, y, draws):
        do_mix, use_cutmix, lam, cy, cx = draws
        # Cutmix box from lambda, clipped; lambda corrected to the area actually pasted.
        r = jnp.sqrt(1.0 - lam)
        cut_h, cut_w = jnp.floor(h * r).astype(jnp.int32), jnp.floor(w * r).astype(jnp.int32)
        yl, yh = jnp.clip(cy - cut_h // 2, 0, h), jnp.clip(cy + cut_h // 2, 0, h)
        xl, xh = jnp.clip(cx - cut_w // 2, 0, w), jnp.clip(cx + cut_w // 2, 0, w)
        box = ((jnp.arange(h) >= yl) & (jnp.arange(h) < yh))[:, None] & \
              ((jnp.arange(w) >= xl) & (jnp.arange(w) < xh))[None, :]
        cut_lam = 1.0 - ((yh - yl) * (xh - xl)).astype(jnp.float32) / (h * w)
        partner = x[::-1]
        cut = jnp.where(box[None, :, :, None], partner, x)
        blend = lam * x + (1.0 - lam) * partner
        mixed = jnp.where(use_cutmix, cut, blend)
        lam = jnp.where(use_cutmix & do_mix, cut_lam, lam)
        x = jnp.where(do_mix, mixed, x)
        t = smooth_one_hot(y, num_classes, smoothing)
        return x, lam * t + (1.0 - lam) * t[::-1]

    draws = jax.vmap(draw)(jax.random.split(rng, b // g))
    if pin is not None:
        draws = pin(draws)
    xs = images.reshape((b // g, g) + images.shape[1:])
    ys = labels.reshape(b // g, g)
    x, t = jax.vmap(one_group)(xs, ys, draws)
    return x.reshape(images.shape), t.reshape(b, num_classes)


# ------------------------------------------------------------------------------------ the transforms

# What "off" means for each key a source can apply on the host instead (`data.Dataset.host_augment`).
_HOST_OFF = dict(random_resized_crop=False, hflip=0.0, interpolation="bilinear")


def on_device(config, host_augment=()):
    """`config` without the parts the data source already applied on the host (e.g. the streamed ImageNet's crop
    and flip), so that they are not applied twice."""
    if not host_augment:
        return config
    config = ml_collections.ConfigDict(config.to_dict())
    config.update({key: _HOST_OFF[key] for key in host_augment})
    return config


def _size(size):
    return None if size is None else (size, size) if isinstance(size, int) else tuple(size)


def mixing(config):
    return _get(config, "mixup") > 0 or _get(config, "cutmix") > 0


def _image_transform(config, mean, std, size):
    """Per-example part: translate, crop + resize, flip, RandAugment, normalise."""
    def transform(images, rng):
        k_translate, k_crop, k_interp, k_flip, k_ra = jax.random.split(rng, 5)
        n, h, w, _ = images.shape
        out = size or (h, w)
        images = random_translate(images, k_translate, _get(config, "translate")).astype(jnp.float32)
        if _get(config, "random_resized_crop"):
            boxes = sample_crop_boxes(k_crop, n, h, w, tuple(_get(config, "scale")), tuple(_get(config, "ratio")))
            images = resized_crop(images, boxes, out, _interp_choice(k_interp, n, _get(config, "interpolation")))
        elif out != (h, w):
            boxes = jnp.broadcast_to(jnp.array([0, 0, h, w], jnp.int32), (n, 4))
            images = resized_crop(images, boxes, out, _interp_choice(k_interp, n, _get(config, "interpolation")))
        flip = jax.random.uniform(k_flip, (n,)) < _get(config, "hflip")
        images = jnp.where(flip[:, None, None, None], images[:, :, ::-1], images)
        if _get(config, "rand_augment"):
            fill = tuple(min(255, round(255 * m)) for m in mean)
            images = rand_augment(images, k_ra, _get(config, "rand_augment"), fill,
                                  translate_const=int(min(out) * 0.45))
        return normalize(images, mean, std)
    return transform


def _erase(config, images, rng):
    return random_erase(images, rng, _get(config, "random_erasing"), _get(config, "erasing_mode"),
                        _get(config, "erasing_count"))


def train_transform(config, mean, std, size=None):
    """fn(images uint8 (B,H,W,C), rng) -> normalised float32 (B,*size,C); size None = the input size. Without
    mixing only: with mixup/cutmix on, use `train_batch_transform` (erasing must follow the mixing)."""
    if mixing(config):
        raise ValueError("data.augment mixup/cutmix are on: use augment.train_batch_transform, which also "
                         "returns the soft targets")
    images_fn = _image_transform(config, mean, std, _size(size))

    def transform(images, rng):
        k_img, k_erase = jax.random.split(rng)
        return _erase(config, images_fn(images, k_img), k_erase)
    return transform


def train_batch_transform(config, mean, std, num_classes, smoothing=0.1, size=None, group_size=0, pin=None):
    """fn(images uint8, labels int (B,), rng) -> (normalised images, soft targets (B, num_classes)): the image
    transform, then mixup/cutmix (label smoothing inside the targets, as timm), then random erasing. With mixing
    off the targets are the smoothed one-hot labels. `pin`: see `mix`."""
    images_fn = _image_transform(config, mean, std, _size(size))

    def transform(images, labels, rng):
        k_img, k_mix, k_erase = jax.random.split(rng, 3)
        images = images_fn(images, k_img)
        if mixing(config):
            images, targets = mix(images, labels, k_mix, num_classes, _get(config, "mixup"), _get(config, "cutmix"),
                                  _get(config, "mixup_prob"), _get(config, "mixup_switch_prob"), smoothing,
                                  group_size, pin)
        else:
            targets = smooth_one_hot(labels, num_classes, smoothing)
        return _erase(config, images, k_erase), targets
    return transform


def eval_config(config, model=None):
    """(crop_pct, interpolation) for eval: the config's values, else the reference's for `model` (an unknown
    model is an error)."""
    spec = models.model_spec(model) if model else None
    table_pct, table_interp = (spec.crop_pct, spec.interpolation) if spec else (1.0, "bilinear")
    return (_get(config, "crop_pct") or table_pct, _get(config, "eval_interpolation") or table_interp)


def eval_transform(config, mean, std, size=None, model=None):
    """fn(images uint8) -> normalised float32: resize the shorter side to floor(size / crop_pct), centre-crop
    `size` (torchvision Resize + CenterCrop on PIL images), normalise. size None = the input size; model None and
    no crop_pct in the config = crop_pct 1 (a no-op at the same size)."""
    crop_pct, interp = eval_config(config, model)
    size = _size(size)
    if interp not in ("bilinear", "bicubic"):
        raise ValueError(f"eval interpolation {interp!r}: use 'bilinear' or 'bicubic'")

    def transform(images):
        n, h, w, _ = images.shape
        out = size or (h, w)
        scale = math.floor(out[0] / crop_pct)
        if (h, w) == tuple(out) and scale == out[0]:
            return normalize(images, mean, std)
        # torchvision Resize(int): the shorter side -> scale, the other keeps the aspect (truncated).
        rh, rw = (scale, int(scale * w / h)) if h <= w else (int(scale * h / w), scale)
        top, left = int(round((rh - out[0]) / 2.0)), int(round((rw - out[1]) / 2.0))
        cubic = interp == "bicubic"
        wy = resize_weights(0, h, h, rh, cubic)[top:top + out[0]]
        wx = resize_weights(0, w, w, rw, cubic)[left:left + out[1]]
        images = resample(images, jnp.broadcast_to(wy, (n,) + wy.shape), jnp.broadcast_to(wx, (n,) + wx.shape))
        return normalize(images, mean, std)
    return transform
