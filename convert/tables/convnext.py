"""ConvNeXt key table: timm 0.6.x and 1.x share one layout (docs/reference.md §6.3) and the default name rule covers it
(LayerNorm2d/LayerNorm weight <-> scale, `gamma` keeps its name), so there are no renames."""
import re

from rsd_jax.models import convnext

# our option -> timm ConvNeXt kwarg, where they differ only in name. img_size changes no weight (a CNN).
_TIMM_NAME = {"depths": "depths", "dims": "dims", "patch_size": "patch_size", "kernel_size": "kernel_sizes",
              "ls_init_value": "ls_init_value", "norm_eps": "norm_eps", "drop_rate": "drop_rate",
              "drop_path_rate": "drop_path_rate"}


def normalize(state_dict):
    return dict(state_dict), "timm-1.x"


def infer(state_dict):
    """(model name, num_classes, overrides) of a timm ConvNeXt state_dict, or None if it is not a ConvNeXt."""
    if not {"stem.0.weight", "head.norm.weight", "head.fc.weight", "stages.0.blocks.0.conv_dw.weight"} \
            <= set(state_dict):
        return None
    blocks = {}
    for key in state_dict:
        if m := re.match(r"stages\.(\d+)\.blocks\.(\d+)\.conv_dw\.weight$", key):
            blocks[int(m[1])] = max(blocks.get(int(m[1]), 0), int(m[2]) + 1)
    stages = sorted(blocks)
    dw = state_dict["stages.0.blocks.0.conv_dw.weight"]
    dims = tuple(int(state_dict[f"stages.{s}.blocks.0.conv_dw.weight"].shape[0]) for s in stages)
    arch = dict(depths=tuple(blocks[s] for s in stages), dims=dims,
                patch_size=int(state_dict["stem.0.weight"].shape[-1]), kernel_size=int(dw.shape[-1]),
                mlp_ratio=int(state_dict["stages.0.blocks.0.mlp.fc1.weight"].shape[0]) / dims[0])
    name = "convnext_tiny"   # the one registered ConvNeXt; other shapes become overrides
    default = {k: getattr(convnext.ConvNeXt, k) for k in arch} | convnext.MODELS[name].kwargs
    overrides = {k: v for k, v in arch.items() if default[k] != v}
    return name, int(state_dict["head.fc.weight"].shape[0]), overrides


def timm_kwargs(overrides):
    """timm.create_model kwargs building our ConvNeXt with `overrides`."""
    if overrides.get("mlp_ratio", 4.0) != 4.0:
        raise ValueError("timm's ConvNeXt has no mlp_ratio option (always 4)")
    return {_TIMM_NAME[k]: v for k, v in overrides.items() if k in _TIMM_NAME}
