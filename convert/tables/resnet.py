"""ResNet (timm resnet18/34/50; torchvision's resnets use the same keys).

Our names are timm's (`layer1_0/conv1` is `layer1.0.conv1`, `downsample_0` is `downsample.0`), so no renames; the
timm 0.6.x and 1.x layouts are identical.
"""
import re

from rsd_jax.models import resnet


def normalize(state_dict):
    return state_dict, "timm-1.x (same as timm-0.6)"


def infer(state_dict):
    if not {"conv1.weight", "fc.weight", "layer1.0.conv1.weight"} <= set(state_dict):
        return None
    blocks = {}
    for key in state_dict:
        if m := re.match(r"layer(\d)\.(\d+)\.", key):
            blocks[int(m[1])] = max(blocks.get(int(m[1]), 0), int(m[2]) + 1)
    if sorted(blocks) != [1, 2, 3, 4]:
        return None
    depths = tuple(blocks[s] for s in (1, 2, 3, 4))
    block = "bottleneck" if "layer1.0.conv3.weight" in state_dict else "basic"
    arch = dict(layers=depths, block=block,
                widths=tuple(int(state_dict[f"layer{s}.0.conv1.weight"].shape[0]) for s in (1, 2, 3, 4)),
                stem_width=int(state_dict["conv1.weight"].shape[0]))
    # The registered name with the same block type (and depths, if one has them); the rest become overrides.
    names = [n for n, spec in resnet.MODELS.items() if spec.kwargs["block"] == block]
    name = max(names, key=lambda n: resnet.MODELS[n].kwargs["layers"] == depths)
    default = dict(widths=tuple(resnet.ResNet.widths), **resnet.MODELS[name].kwargs)
    overrides = {k: arch[k] for k in ("layers", "widths") if tuple(default[k]) != arch[k]}
    if arch["stem_width"] != resnet.ResNet.stem_width:
        overrides["stem_width"] = arch["stem_width"]
    return name, int(state_dict["fc.weight"].shape[0]), overrides


def timm_kwargs(overrides):
    out = {k: v for k, v in overrides.items() if k in ("layers", "drop_rate", "drop_path_rate")}
    if "widths" in overrides:
        out["channels"] = tuple(overrides["widths"])
    if overrides.get("stem_width", 64) != 64:
        raise ValueError(f"stem_width={overrides['stem_width']}: timm's ResNet with the 7x7 stem is always 64 wide")
    if "block" in overrides:   # timm only here: the other kwargs are needed without it (to_torch --format hf)
        from timm.models import resnet as timm_resnet
        out["block"] = {"basic": timm_resnet.BasicBlock, "bottleneck": timm_resnet.Bottleneck}[overrides["block"]]
    # img_size does not change a CNN's weights; timm's ResNet takes no such argument.
    return out
