"""Swin Transformer keys: timm 1.x names follow the default rule; timm 0.6.x checkpoints (the reference's
teachers, docs/reference.md §6.2-6.3) are renamed to the 1.x layout first."""
import re

from convert.core import ConversionError

# Buffers recomputed by the model (non-persistent in timm 1.x, persistent in 0.6.x).
IGNORED = (r"\.relative_position_index$", r"\.attn_mask$")

_BIAS_TABLE = re.compile(r"^layers\.(\d+)\.blocks\.(\d+)\.attn\.relative_position_bias_table$")


def normalize(state_dict):
    """(state_dict in the timm 1.x layout, "timm-0.6" or "timm-1.x")."""
    # 0.6.x merges patches at the END of a stage, so stage 0 has a downsample; 1.x has none there.
    old = any(k.startswith("layers.0.downsample.") for k in state_dict) or "head.weight" in state_dict
    out = {}
    for k, v in state_dict.items():
        if any(re.search(p, k) for p in IGNORED):
            continue
        if old:
            k = re.sub(r"^layers\.(\d+)\.downsample\.", lambda m: f"layers.{int(m.group(1)) + 1}.downsample.", k)
            k = re.sub(r"^head\.(weight|bias)$", r"head.fc.\1", k)
        out[k] = v
    return out, "timm-0.6" if old else "timm-1.x"


def infer(state_dict):
    """(model name, num_classes) of a Swin state_dict in either layout; None if it is not a Swin."""
    tables = {tuple(map(int, m.groups())): state_dict[k]
              for k in state_dict if (m := _BIAS_TABLE.match(k))}
    if "patch_embed.proj.weight" not in state_dict or not tables:
        return None
    from rsd_jax.models import swin
    proj = state_dict["patch_embed.proj.weight"]
    num_stages = max(i for i, _ in tables) + 1
    depths = tuple(1 + max(j for i, j in tables if i == s) for s in range(num_stages))
    heads = tuple(tables[(s, 0)].shape[1] for s in range(num_stages))
    window = (int(round(tables[(0, 0)].shape[0] ** 0.5)) + 1) // 2     # table rows = (2w-1)^2
    found = dict(patch_size=int(proj.shape[2]), window_size=window, embed_dim=int(proj.shape[0]),
                 depths=depths, num_heads=heads)
    head = state_dict.get("head.fc.weight", state_dict.get("head.weight"))
    num_classes = int(head.shape[0]) if head is not None else 0
    for name, spec in swin.MODELS.items():
        if {k: spec.kwargs[k] for k in found} == found:
            return name, num_classes
    raise ConversionError(f"a Swin checkpoint matching no known model ({found}); known: {', '.join(swin.MODELS)}")


def create_timm(model_name, num_classes, kwargs):
    """timm's SwinTransformer with the architecture of our `model_name` updated by `kwargs` (our option names are
    timm's); built from the class, as the reference's nano/pico students are not registered in timm."""
    from timm.models.swin_transformer import SwinTransformer
    from rsd_jax.models import swin
    return SwinTransformer(num_classes=num_classes, **dict(swin.MODELS[model_name].kwargs, **kwargs))
