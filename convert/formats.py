"""Weight formats both ways: torch.save files (.pth, .bin), safetensors files, and timm hub folders.

A hub folder is what timm.models.save_for_hf writes and `timm.create_model("local-dir:DIR", pretrained=True)` reads
(timm/models/_hub.py): `config.json` with `architecture`, `num_classes`, `num_features`, optionally `model_args`
(the create_model kwargs the weights were built with) and `pretrained_cfg` (input size, crop, mean/std, ...), beside
`model.safetensors` and/or `pytorch_model.bin`. Older hub configs are one flat dict (no `pretrained_cfg` key).

Which kind a path is (`open_source`), safetensors reading and writing (safetensors.numpy) and the hub config are
here; nothing here imports torch. torch.save files are read by convert.from_torch.load_checkpoint.
"""
import contextlib
import dataclasses
import json
import os
import shutil
import struct
import tempfile

import numpy as np

from rsd_jax.errors import UserError

HUB_CONFIG = "config.json"
HUB_WEIGHTS = ("model.safetensors", "pytorch_model.bin")   # the order timm's load_state_dict_from_path prefers
SAFETENSORS_NAME = HUB_WEIGHTS[0]


class FormatError(UserError, ValueError):
    """A weight file or folder that cannot be read; the CLIs print it as one line."""


@dataclasses.dataclass(frozen=True)
class Source:
    kind: str                  # "pth" (torch.save), "safetensors" or "hub" (a timm hub folder)
    weights: str               # the file holding the tensors
    hub_config: dict = None    # a hub folder's parsed config.json (`read_hub_config`)

    @property
    def safetensors(self):
        return _is_safetensors(self.weights)


def open_source(path):
    """The `Source` at `path`: a hub folder, a safetensors file (by its header or its name) or else a torch file."""
    if not os.path.lexists(path):
        raise FormatError(f"{path}: no such file or directory")
    if os.path.isdir(path):
        config = read_hub_config(path)
        for name in HUB_WEIGHTS:
            if os.path.isfile(os.path.join(path, name)):
                return Source("hub", os.path.join(path, name), config)
        raise FormatError(f"{path}: a hub folder without weights (neither {' nor '.join(HUB_WEIGHTS)})")
    if not os.path.isfile(path):
        raise FormatError(f"{path}: not a file")
    return Source("safetensors" if _is_safetensors(path) else "pth", path)


def _is_safetensors(path):
    """A safetensors file starts with its JSON header's length (8 bytes, little-endian) and then `{`."""
    if path.endswith(".safetensors"):
        return True
    with open(path, "rb") as f:
        head = f.read(9)
    return len(head) == 9 and head[8:] == b"{" and struct.unpack("<Q", head[:8])[0] < os.path.getsize(path)


# ----------------------------------------------------------------------------------------------------------------
# safetensors

def read_safetensors(path):
    """{key: numpy array} of a safetensors file; bfloat16 (which numpy lacks) is widened to float32."""
    import safetensors
    try:
        with safetensors.safe_open(path, framework="np") as f:
            keys = list(f.keys())
            bf16 = [k for k in keys if f.get_slice(k).get_dtype() == "BF16"]
            out = {k: f.get_tensor(k) for k in keys if k not in bf16}
        if bf16:   # read through jax's bfloat16, the one framework safetensors has for it without torch
            with safetensors.safe_open(path, framework="flax") as f:
                out.update({k: np.asarray(f.get_tensor(k)).astype(np.float32) for k in bf16})
    except Exception as e:  # safetensors raises SafetensorError, OSError or ValueError for a damaged file
        text = str(e).strip().splitlines()
        raise FormatError(f"{path}: not a readable safetensors file ({text[0] if text else type(e).__name__})") \
            from None
    return {k: out[k] for k in keys}


def save_safetensors(state_dict, path):
    """Write a {key: numpy array} state_dict to `path` (not atomically: callers write a temporary)."""
    import safetensors.numpy
    # "format": "pt" is what safetensors.torch writes and what Hugging Face loaders check.
    safetensors.numpy.save_file({k: np.ascontiguousarray(v) for k, v in state_dict.items()}, path,
                                metadata={"format": "pt"})


@contextlib.contextmanager
def written_atomically(out, folder=False):
    """A temporary sibling of `out` (a file, or with `folder` a directory) to write; renamed to `out` when the block
    ends, removed if it fails or is interrupted."""
    out = os.path.abspath(out)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    prefix, parent = os.path.basename(out) + ".tmp-", os.path.dirname(out)
    if folder:
        tmp = tempfile.mkdtemp(prefix=prefix, dir=parent)
    else:
        fd, tmp = tempfile.mkstemp(prefix=prefix, dir=parent)
        os.close(fd)
    try:
        yield tmp
        os.replace(tmp, out)
    except BaseException:
        if folder:
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            os.unlink(tmp)
        raise


def write_safetensors(state_dict, out):
    with written_atomically(out) as tmp:
        save_safetensors(state_dict, tmp)


# ----------------------------------------------------------------------------------------------------------------
# timm hub folders

def read_hub_config(directory):
    """{architecture, num_classes (None where absent), model_args, pretrained_cfg} of a hub folder's config.json,
    in either of the layouts timm reads (timm/models/_hub.py `_parse_model_cfg`)."""
    path = os.path.join(directory, HUB_CONFIG)
    if not os.path.isfile(path):
        raise FormatError(f"{directory}: a directory but not a timm hub folder (no {HUB_CONFIG})")
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, ValueError) as e:
        raise FormatError(f"{path}: not readable JSON ({e})") from None
    if not isinstance(config, dict) or not isinstance(config.get("architecture"), str):
        raise FormatError(f"{path}: no 'architecture' (timm's hub config names the model there)")
    pretrained_cfg = config.get("pretrained_cfg")
    if pretrained_cfg is None:   # the older flat layout: everything but the architecture is the pretrained cfg
        pretrained_cfg = {k: v for k, v in config.items() if k not in ("architecture", "num_features")}
    num_classes = config.get("num_classes", pretrained_cfg.get("num_classes"))
    if num_classes is not None and (isinstance(num_classes, bool) or not isinstance(num_classes, int)):
        raise FormatError(f"{path}: num_classes {num_classes!r} is not an integer")
    model_args = config.get("model_args") or {}
    if not isinstance(model_args, dict) or not isinstance(pretrained_cfg, dict):
        raise FormatError(f"{path}: 'model_args' and 'pretrained_cfg' must be objects")
    return dict(architecture=config["architecture"], num_classes=num_classes, model_args=model_args,
                pretrained_cfg=pretrained_cfg)


def hub_config(architecture, num_classes, num_features, model_args, pretrained_cfg):
    """The config.json timm's save_for_hf writes for these facts (timm reads `architecture`, `model_args` and
    `pretrained_cfg`; `num_features` is informational)."""
    return {"architecture": architecture, "num_classes": num_classes, "num_features": num_features,
            "model_args": dict(model_args, num_classes=num_classes),
            "pretrained_cfg": dict(pretrained_cfg, num_classes=num_classes)}


def config_text(config):
    """config.json's text; FormatError for what JSON cannot hold (a class in model_args: timm refuses it too)."""
    try:
        return json.dumps(config, indent=2)
    except TypeError as e:
        raise FormatError(f"{HUB_CONFIG} cannot hold these timm arguments ({e}); use --format safetensors") \
            from None


def write_hub_folder(state_dict, config, out):
    """A hub folder at `out` (config.json + model.safetensors), atomically."""
    text = config_text(config)
    with written_atomically(out, folder=True) as tmp:
        save_safetensors(state_dict, os.path.join(tmp, SAFETENSORS_NAME))
        with open(os.path.join(tmp, HUB_CONFIG), "w", encoding="utf-8") as f:
            f.write(text + "\n")
