"""MobileNetV2 key table: timm 0.6.x and 1.x share one layout (docs/reference.md §6.3) and the default name rule covers it
(`blocks_3_1` <-> `blocks.3.1`, BatchNorm running stats <-> batch_stats), so there are no renames."""
import re

from convert.core import ConversionError
from rsd_jax.models import mobilenetv2

_REPEATS = tuple(row[1] for row in mobilenetv2.ARCH)


def normalize(state_dict):
    return dict(state_dict), "timm-1.x"


def _widths(multiplier):
    """(stem, per-stage output channels, head) that timm builds for a channel multiplier."""
    m = mobilenetv2.MobileNetV2(channel_multiplier=multiplier)
    chs = lambda c: mobilenetv2.make_divisible(c * multiplier)   # noqa: E731
    return (chs(m.stem_size), tuple(chs(row[5]) for row in m.arch),
            max(m.num_features, chs(m.num_features)))


def infer(state_dict):
    """(model name, num_classes, overrides) of a timm MobileNetV2 state_dict, or None if it is not one."""
    if not {"conv_stem.weight", "conv_head.weight", "classifier.weight", "blocks.0.0.conv_dw.weight",
            "blocks.1.0.conv_pwl.weight"} <= set(state_dict):
        return None
    if any(".se." in k for k in state_dict):
        return None   # an EfficientNet/MnasNet with squeeze-excite, not a MobileNetV2
    counts = {}
    for k in state_dict:
        if m := re.match(r"blocks\.(\d+)\.(\d+)\.", k):
            counts[int(m[1])] = max(counts.get(int(m[1]), 0), int(m[2]) + 1)
    repeats = tuple(counts[i] for i in sorted(counts))
    if repeats != _REPEATS:
        raise ConversionError(f"an EfficientNet-style checkpoint with {repeats} blocks per stage; only "
                              f"MobileNetV2's {_REPEATS} is supported")
    found = (int(state_dict["conv_stem.weight"].shape[0]),
             tuple(int(state_dict[f"blocks.{i}.{n - 1}.{'conv_pw' if i == 0 else 'conv_pwl'}.weight"].shape[0])
                   for i, n in enumerate(repeats)),
             int(state_dict["conv_head.weight"].shape[0]))
    # The channel multiplier is not stored: find the one (in steps of 0.05) that gives these widths.
    for multiplier in sorted((k / 20 for k in range(1, 81)), key=lambda m: abs(m - 1.0)):
        if _widths(multiplier) == found:
            overrides = {} if multiplier == 1.0 else {"channel_multiplier": multiplier}
            return "mobilenetv2_100", int(state_dict["classifier.weight"].shape[0]), overrides
    raise ConversionError(f"a MobileNetV2 checkpoint (stem {found[0]}, stage widths {found[1]}, head {found[2]}) "
                          "that no channel multiplier reproduces")


def timm_kwargs(overrides):
    """kwargs for `create_timm`; img_size and stage_blocks change no weight."""
    if "arch" in overrides or "stem_size" in overrides or "num_features" in overrides:
        raise ValueError("timm's mobilenetv2_100 has a fixed architecture")
    return {k: v for k, v in overrides.items() if k in ("channel_multiplier", "drop_rate", "drop_path_rate")}


def create_timm(model_name, num_classes, kwargs):
    """timm's MobileNetV2 at kwargs' channel multiplier. The mobilenetv2_100 entry point fixes 1.0, so this calls
    the generator behind all of timm's MobileNetV2 entry points (mobilenetv2_035/050/... pass their multiplier)."""
    from timm.models.efficientnet import _gen_mobilenet_v2
    kwargs = dict(kwargs)
    multiplier = kwargs.pop("channel_multiplier", 1.0)
    return _gen_mobilenet_v2(model_name, multiplier, num_classes=num_classes, **kwargs)
