"""MLP-Mixer / ResMLP key table: timm 0.6.x and 1.x share one layout (docs/reference.md §6.3) and the default name rule
covers it (Affine `alpha`/`beta` and ResMLP `ls1`/`ls2` keep their names), so there are no renames."""
import math
import re

from rsd_jax.models import mixer

_NAME_OF_BLOCK = {"mixer": "mixer_b16_224", "resmlp": "resmlp_12_224"}


def normalize(state_dict):
    return dict(state_dict), "timm-1.x"


def _ratio(hidden, dim):
    """A ratio r with int(r * dim) == hidden, as timm sizes the MLPs."""
    r = hidden / dim
    return r if int(r * dim) == hidden else (hidden + 0.5) / dim


def infer(state_dict):
    """(model name, num_classes, overrides) of a timm Mixer/ResMLP state_dict, or None if it is neither."""
    if not {"stem.proj.weight", "head.weight"} <= set(state_dict):
        return None
    if "blocks.0.mlp_tokens.fc1.weight" in state_dict:
        block, seq_len = "mixer", int(state_dict["blocks.0.mlp_tokens.fc1.weight"].shape[1])
    elif "blocks.0.linear_tokens.weight" in state_dict:
        block, seq_len = "resmlp", int(state_dict["blocks.0.linear_tokens.weight"].shape[0])
    else:
        return None
    embed_dim, _, patch, _ = (int(n) for n in state_dict["stem.proj.weight"].shape)
    arch = dict(img_size=math.isqrt(seq_len) * patch, patch_size=patch, embed_dim=embed_dim,
                depth=1 + max(int(m[1]) for k in state_dict if (m := re.match(r"blocks\.(\d+)\.", k))),
                mlp_ratio_channels=_ratio(int(state_dict["blocks.0.mlp_channels.fc1.weight"].shape[0]), embed_dim))
    if block == "mixer":
        arch["mlp_ratio_tokens"] = _ratio(int(state_dict["blocks.0.mlp_tokens.fc1.weight"].shape[0]), embed_dim)
    name = _NAME_OF_BLOCK[block]
    default = {k: getattr(mixer.MlpMixer, k) for k in arch} | mixer.MODELS[name].kwargs
    overrides = {k: v for k, v in arch.items() if default[k] != v}
    return name, int(state_dict["head.weight"].shape[0]), overrides


def timm_kwargs(overrides):
    """kwargs for `create_timm` building our model with `overrides` (the architecture in our option names);
    stage_blocks and init_values change no weight and are left out."""
    out = {k: v for k, v in overrides.items() if k in ("img_size", "drop_rate", "proj_drop_rate", "drop_path_rate",
                                                       "block", "patch_size", "embed_dim", "depth",
                                                       "mlp_ratio_tokens", "mlp_ratio_channels")}
    if overrides.get("norm_eps", 1e-6) != 1e-6:
        import functools
        import torch
        out["norm_layer"] = functools.partial(torch.nn.LayerNorm, eps=overrides["norm_eps"])
    return out


def create_timm(model_name, num_classes, kwargs):
    """timm's MlpMixer with the architecture of our `model_name` updated by `kwargs`, built from the class with
    each block's layers, as timm's registered mixer_b16_224 / resmlp_12_224 fix depth, width and patch size."""
    from timm.models import mlp_mixer
    arch = dict(mixer.MODELS[model_name].kwargs, **kwargs)
    arch.pop("init_values", None)
    block, tokens, channels = arch.pop("block"), arch.pop("mlp_ratio_tokens", None), arch.pop("mlp_ratio_channels")
    arch["num_blocks"] = arch.pop("depth")
    if block == "resmlp":   # ResBlock with Affine norms (our norm_eps is a Mixer option: ignored as in our ResMLP)
        layers = dict(block_layer=mlp_mixer.ResBlock, norm_layer=mlp_mixer.Affine, mlp_ratio=channels)
    else:                   # MixerBlock and LayerNorm(eps 1e-6) are MlpMixer's defaults
        layers = dict(mlp_ratio=(tokens if tokens is not None else mixer.MlpMixer.mlp_ratio_tokens, channels))
    return mlp_mixer.MlpMixer(num_classes=num_classes, **dict(arch, **layers))
