"""Swin Transformer (Liu et al. 2021) with timm 1.x module names and numerics.

Layout as in timm 1.x: tokens run NHWC per stage, the patch merging (`layers_i/downsample`) sits at the START of
stage i >= 1, and the classifier is `head/fc`. Window size and shift are derived per block from the feature
resolution at trace time: a stage whose resolution is <= the window gets a window equal to its resolution and no
shift (timm's rule). The relative-position index and the shifted-window masks are numpy constants, not variables.

Features (docs/reference.md §3): the reference lists every block output (before the next stage's downsample) as tokens,
then the final-norm tokens, then the pooled vector; `stage<s>` is the last block output of stage s, (B, H*W, C).
"""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from rsd_jax.models import ModelSpec, layers

_STUDENT = dict(patch_size=4, window_size=7, depths=(2, 2, 2, 2), num_heads=(2, 4, 8, 16))
_SMOKE = dict(img_size=32, patch_size=2, window_size=4, embed_dim=16, depths=(1, 1, 1, 1), num_heads=(1, 2, 2, 4))
_EVAL = dict(crop_pct=0.9, interpolation="bicubic")   # every Swin's timm cfg, and timm's fallback for nano/pico
MODELS = {
    "swin_tiny_patch4_window7_224": ModelSpec(dict(patch_size=4, window_size=7, embed_dim=96, depths=(2, 2, 6, 2),
                                                   num_heads=(3, 6, 12, 24)),
                                              stages=(1, 3, 9, 11), smoke=_SMOKE, **_EVAL),
    "swin_base_patch4_window7_224": ModelSpec(dict(patch_size=4, window_size=7, embed_dim=128, depths=(2, 2, 18, 2),
                                                   num_heads=(4, 8, 16, 32)),
                                              stages=(1, 3, 21, 23), **_EVAL),
    # The reference's own students (not registered in timm).
    "swin_nano_patch4_window7_224": ModelSpec(dict(_STUDENT, embed_dim=64), stages=(1, 3, 5, 7), **_EVAL),
    "swin_pico_patch4_window7_224": ModelSpec(dict(_STUDENT, embed_dim=48), stages=(1, 3, 5, 7), smoke=_SMOKE,
                                              **_EVAL),
}

_dense = functools.partial(nn.Dense, kernel_init=layers.trunc_normal_02, bias_init=nn.initializers.zeros)
_MASKED = -100.0   # timm's (and the original's) additive mask value, not -inf


def window_and_shift(resolution, window_size):
    """(window, shift) per axis for a block at `resolution`: clamped to the resolution, no shift if it fits."""
    window = tuple(min(r, window_size) for r in resolution)
    shift = tuple(0 if r <= window_size else window_size // 2 for r in resolution)
    return window, shift


def relative_position_index(window):
    """(N, N) index into the ((2wh-1)(2ww-1), heads) bias table for every pair of tokens in a window."""
    wh, ww = window
    coords = np.stack(np.meshgrid(np.arange(wh), np.arange(ww), indexing="ij")).reshape(2, -1)
    rel = coords[:, :, None] - coords[:, None, :] + np.array([wh - 1, ww - 1])[:, None, None]
    return rel[0] * (2 * ww - 1) + rel[1]


def partition(x, window):
    """(B, H, W, C) -> (B, num_windows, wh*ww, C), windows in row-major order."""
    b, h, w, c = x.shape
    wh, ww = window
    x = x.reshape(b, h // wh, wh, w // ww, ww, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, (h // wh) * (w // ww), wh * ww, c)


def unpartition(x, window, h, w):
    """Inverse of `partition`."""
    b, _, _, c = x.shape
    wh, ww = window
    x = x.reshape(b, h // wh, w // ww, wh, ww, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, h, w, c)


def shifted_window_mask(padded, window, shift):
    """(num_windows, N, N) additive mask of a shifted block: tokens from different regions of the rolled map
    must not attend to each other. `padded` is the (H, W) after padding to a multiple of the window."""
    region = np.zeros(padded, np.float32)
    bounds = [((0, -w), (-w, -s), (-s, None)) for w, s in zip(window, shift)]
    for i, (h0, h1) in enumerate(bounds[0]):
        for j, (w0, w1) in enumerate(bounds[1]):
            region[h0:h1, w0:w1] = 3 * i + j
    ids = partition(region[None, :, :, None], window)[0, :, :, 0]   # (num_windows, N)
    return np.where(ids[:, None, :] != ids[:, :, None], _MASKED, 0.0).astype(np.float32)


def attention_implementation(dtype):
    """`jax.nn.dot_product_attention`'s implementation for the fused (inference) path: cuDNN's fused kernel on a
    CUDA GPU in bf16/fp16 (the only dtypes it takes), XLA's elsewhere (CPU, TPU, float32). Decided from the
    platform, so that nothing CUDA-specific is traced on a CPU."""
    if jax.default_backend() == "gpu" and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16) and \
            "cuda" in jax.devices()[0].client.platform_version.lower():
        return "cudnn"
    return "xla"


def fused_window_attention(q, k, v, bias, mask):
    """Windowed attention by `jax.nn.dot_product_attention`: q, k, v (B, num_windows, N, heads, head_dim), q
    already scaled; `bias` (heads, N, N), `mask` (num_windows, N, N) or None. Without a mask the windows are
    folded into the batch (a free reshape) and the bias broadcasts over it; with one they are folded into the head
    axis, so bias and mask are one (1, num_windows * heads, N, N) constant-shaped bias. Returns (B, nw, N, C)."""
    b, nw, n, heads, d = q.shape
    implementation = attention_implementation(q.dtype)
    if mask is None:
        fold = lambda t: t.reshape(b * nw, n, heads, d)   # noqa: E731
        full_bias = bias[None]
    else:
        fold = lambda t: t.transpose(0, 2, 1, 3, 4).reshape(b, n, nw * heads, d)   # noqa: E731
        full_bias = (bias[None] + jnp.asarray(mask, bias.dtype)[:, None]).reshape(1, nw * heads, n, n)
    out = None
    if implementation == "cudnn":
        try:   # cuDNN's own limits (version, head size, sequence length) are checked while tracing
            out = jax.nn.dot_product_attention(fold(q), fold(k), fold(v), full_bias.astype(q.dtype), scale=1.0,
                                               implementation="cudnn")
        except (NotImplementedError, ValueError, RuntimeError):
            out = None
    if out is None:
        out = jax.nn.dot_product_attention(fold(q), fold(k), fold(v), full_bias.astype(q.dtype), scale=1.0,
                                           implementation="xla")
    if mask is None:
        return out.reshape(b, nw, n, heads * d)
    return out.reshape(b, n, nw, heads * d).transpose(0, 2, 1, 3)


class WindowAttention(nn.Module):
    """Multi-head self-attention inside each window, with a learned relative-position bias."""
    dim: int
    num_heads: int
    window: tuple
    attn_drop_rate: float = 0.0
    proj_drop_rate: float = 0.0
    fused: bool = True      # in inference (train=False): `fused_window_attention`; training keeps the einsums
                            # (what XLA differentiates best; cuDNN's training kernel wants even window sizes)

    @nn.compact
    def __call__(self, x, mask, train):
        """x: (B, num_windows, N, C); mask: (num_windows, N, N) or None."""
        b, nw, n, c = x.shape
        head_dim = self.dim // self.num_heads
        wh, ww = self.window
        table = self.param("relative_position_bias_table", layers.trunc_normal_02,
                           ((2 * wh - 1) * (2 * ww - 1), self.num_heads))
        bias = table[relative_position_index(self.window).reshape(-1)]          # gathered once per block
        bias = bias.reshape(n, n, self.num_heads).transpose(2, 0, 1)             # (heads, N, N)

        qkv = _dense(3 * self.dim, name="qkv")(x).reshape(b, nw, n, 3, self.num_heads, head_dim)
        q, k, v = qkv[..., 0, :, :], qkv[..., 1, :, :], qkv[..., 2, :, :]
        q = q * head_dim ** -0.5    # timm scales q before the product
        if self.fused and not train:
            return _dense(self.dim, name="proj")(fused_window_attention(q, k, v, bias.astype(q.dtype), mask))
        logits = jnp.einsum("bwqhd,bwkhd->bwhqk", q, k) + bias
        if mask is not None:   # in the compute dtype: a float32 mask would turn the rest of a bf16 model float32
            logits = logits + jnp.asarray(mask, logits.dtype)[:, None]
        attn = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(v.dtype)   # as torch autocast: in float32
        attn = nn.Dropout(self.attn_drop_rate)(attn, deterministic=not train)
        out = jnp.einsum("bwhqk,bwkhd->bwqhd", attn, v).reshape(b, nw, n, self.dim)
        out = _dense(self.dim, name="proj")(out)
        return nn.Dropout(self.proj_drop_rate)(out, deterministic=not train)


class SwinBlock(nn.Module):
    """(Shifted-)window attention block on (B, H, W, C); `shifted` asks for a shift if the resolution allows."""
    num_heads: int
    window_size: int
    shifted: bool
    mlp_ratio: float = 4.0
    drop_path: float = 0.0
    attn_drop_rate: float = 0.0
    proj_drop_rate: float = 0.0
    fused_attention: bool = True

    @nn.compact
    def __call__(self, x, train):
        _, h, w, c = x.shape
        window, shift = window_and_shift((h, w), self.window_size)
        if not self.shifted:
            shift = (0, 0)

        y = layers.LayerNorm(name="norm1")(x)
        if any(shift):
            y = jnp.roll(y, (-shift[0], -shift[1]), axis=(1, 2))
        pad_h, pad_w = -h % window[0], -w % window[1]
        y = jnp.pad(y, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)))
        mask = shifted_window_mask((h + pad_h, w + pad_w), window, shift) if any(shift) else None
        y = WindowAttention(c, self.num_heads, window, self.attn_drop_rate, self.proj_drop_rate,
                            fused=self.fused_attention, name="attn")(
            partition(y, window), mask, train)
        y = unpartition(y, window, h + pad_h, w + pad_w)[:, :h, :w]
        if any(shift):
            y = jnp.roll(y, shift, axis=(1, 2))
        x = x + layers.DropPath(self.drop_path, name="drop_path1")(y, train)

        y = layers.Mlp(int(c * self.mlp_ratio), self.proj_drop_rate, name="mlp")(
            layers.LayerNorm(name="norm2")(x), train)
        return x + layers.DropPath(self.drop_path, name="drop_path2")(y, train)


class PatchMerging(nn.Module):
    """2x2 neighbourhood -> one token: concat in timm's order (h0w0, h1w0, h0w1, h1w1), LayerNorm, Linear."""
    out_dim: int

    @nn.compact
    def __call__(self, x):
        b, h, w, c = x.shape
        x = jnp.pad(x, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)))   # odd sizes: zero row/column at the end
        h, w = h + h % 2, w + w % 2
        x = x.reshape(b, h // 2, 2, w // 2, 2, c).transpose(0, 1, 3, 4, 2, 5).reshape(b, h // 2, w // 2, 4 * c)
        x = layers.LayerNorm(name="norm")(x)
        return nn.Dense(self.out_dim, use_bias=False, kernel_init=layers.trunc_normal_02, name="reduction")(x)


class SwinStage(nn.Module):
    """`layers_i`: optional patch merging, then `depth` blocks alternating plain and shifted windows."""
    out_dim: int
    depth: int
    num_heads: int
    window_size: int
    downsample: bool
    drop_paths: tuple
    mlp_ratio: float = 4.0
    attn_drop_rate: float = 0.0
    proj_drop_rate: float = 0.0
    fused_attention: bool = True

    @nn.compact
    def __call__(self, x, train):
        if self.downsample:
            x = PatchMerging(self.out_dim, name="downsample")(x)
        for j in range(self.depth):
            x = SwinBlock(self.num_heads, self.window_size, shifted=j % 2 == 1, mlp_ratio=self.mlp_ratio,
                          drop_path=self.drop_paths[j], attn_drop_rate=self.attn_drop_rate,
                          proj_drop_rate=self.proj_drop_rate, fused_attention=self.fused_attention,
                          name=f"blocks_{j}")(x, train)
        return x


class PatchEmbed(nn.Module):
    patch_size: int
    embed_dim: int

    @nn.compact
    def __call__(self, x):
        p = self.patch_size
        # torch's default Conv2d init (timm leaves the patch conv alone): uniform with var 1/(3 fan_in).
        x = nn.Conv(self.embed_dim, (p, p), strides=(p, p), padding="VALID",
                    kernel_init=nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform"), name="proj")(x)
        return layers.LayerNorm(name="norm")(x)


class ClassifierHead(nn.Module):
    num_classes: int
    drop_rate: float = 0.0

    @nn.compact
    def __call__(self, x, train):
        x = nn.Dropout(self.drop_rate)(x, deterministic=not train)
        return x, _dense(self.num_classes, name="fc")(x)


class SwinTransformer(nn.Module):
    img_size: int = 224
    patch_size: int = 4
    window_size: int = 7
    embed_dim: int = 96
    depths: tuple = (2, 2, 6, 2)
    num_heads: tuple = (3, 6, 12, 24)
    mlp_ratio: float = 4.0
    num_classes: int = 1000
    drop_rate: float = 0.0          # before the classifier
    proj_drop_rate: float = 0.0     # after attn.proj and in the MLP
    attn_drop_rate: float = 0.0
    drop_path_rate: float = 0.1     # timm's default for every Swin
    fused_attention: bool = True    # inference attention by jax.nn.dot_product_attention (WindowAttention.fused)

    def reference_stage_indices(self):
        """Index of each stage's last block in the reference's flat list of block outputs."""
        return tuple(int(i) - 1 for i in np.cumsum(self.depths))

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = PatchEmbed(self.patch_size, self.embed_dim, name="patch_embed")(x)
        rates = layers.drop_path_rates(self.drop_path_rate, self.depths)
        features = {}
        for i, depth in enumerate(self.depths):
            x = SwinStage(self.embed_dim * 2 ** i, depth, self.num_heads[i], self.window_size, downsample=i > 0,
                          drop_paths=tuple(rates[i]), mlp_ratio=self.mlp_ratio, attn_drop_rate=self.attn_drop_rate,
                          proj_drop_rate=self.proj_drop_rate, fused_attention=self.fused_attention,
                          name=f"layers_{i}")(x, train)
            features[f"stage{i + 1}"] = x.reshape(x.shape[0], -1, x.shape[-1])
        x = layers.LayerNorm(name="norm")(x)
        features["final_tokens"] = x.reshape(x.shape[0], -1, x.shape[-1])
        pooled = x.mean(axis=(1, 2))
        if self.num_classes > 0:
            pooled, logits = ClassifierHead(self.num_classes, self.drop_rate, name="head")(pooled, train)
        else:
            logits = pooled   # headless, as timm's num_classes=0
        features["pre_logits"] = pooled
        return logits, features


def build(**kwargs):
    return SwinTransformer(**kwargs)
