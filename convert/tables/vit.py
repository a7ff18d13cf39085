"""ViT / DeiT (timm VisionTransformer, global_pool='token', no distillation token).

Our names are timm's (`blocks_3/attn/qkv` is `blocks.3.attn.qkv`; `cls_token` and `pos_embed` keep timm's name and
shape), so no renames; the timm 0.6.x and 1.x layouts are identical.
"""
import math

from rsd_jax.models import vit

# Overrides `infer` can only guess (the CLI says so): the head count is not visible in the weights.
GUESSED = ("num_heads",)

# stage_blocks only selects features; timm has no such argument and it changes no weight.
_SAME_IN_TIMM = ("img_size", "patch_size", "embed_dim", "depth", "num_heads", "mlp_ratio", "qkv_bias", "drop_rate",
                 "pos_drop_rate", "proj_drop_rate", "attn_drop_rate", "drop_path_rate")


def normalize(state_dict):
    return state_dict, "timm-1.x (same as timm-0.6)"


def infer(state_dict):
    """Everything but num_heads is in the shapes; heads are taken from the registered model of the same width,
    else assumed to be embed_dim // 64 (the usual head size)."""
    if not {"cls_token", "pos_embed", "patch_embed.proj.weight", "blocks.0.attn.qkv.weight", "head.weight"} \
            <= set(state_dict) or "dist_token" in state_dict:
        return None
    embed_dim, _, patch, _ = (int(n) for n in state_dict["patch_embed.proj.weight"].shape)
    grid = math.isqrt(int(state_dict["pos_embed"].shape[1]) - 1)
    arch = dict(img_size=grid * patch, patch_size=patch, embed_dim=embed_dim,
                depth=1 + max(int(k.split(".")[1]) for k in state_dict if k.startswith("blocks.")),
                mlp_ratio=int(state_dict["blocks.0.mlp.fc1.weight"].shape[0]) / embed_dim,
                qkv_bias="blocks.0.attn.qkv.bias" in state_dict)
    same_width = [n for n, spec in vit.MODELS.items() if spec.kwargs["embed_dim"] == embed_dim]
    name = same_width[0] if same_width else "vit_base_patch16_224"
    default = {f: getattr(vit.VisionTransformer, f) for f in arch} | vit.MODELS[name].kwargs
    overrides = {k: v for k, v in arch.items() if default[k] != v}
    if not same_width:
        overrides["num_heads"] = max(embed_dim // 64, 1)
    return name, int(state_dict["head.weight"].shape[0]), overrides


def timm_kwargs(overrides):
    return {k: v for k, v in overrides.items() if k in _SAME_IN_TIMM}
