"""Convert a timm / reference PyTorch checkpoint, a safetensors file or a timm hub folder into a Flax model directory.

    python -m convert.from_torch SOURCE --out DIR [--model NAME] [--num_classes N] [--use_ema]
                                 [--override KEY=VALUE ...] [--verify]

SOURCE is a torch.save file (.pth, .pth.tar, .bin), a safetensors file, or a timm hub folder (`config.json` beside
`model.safetensors` or `pytorch_model.bin`, as the Hugging Face Hub serves timm models and timm's save_for_hf
writes them); convert/formats.py tells them apart by their content.

torch.save files: reads raw state_dicts and the wrappers timm and the reference write (`state_dict`,
`state_dict_ema`, `model`; `module.` and `_orig_mod.` prefixes), in the timm 0.6.x or 1.x layout, without executing
code from the file (`torch.load(weights_only=True)`; Python objects other than tensors, such as the reference's
argparse Namespace, load as inert placeholders). safetensors files hold tensors only and are read without torch
(bfloat16 and float16 are widened to float32, as from torch files). A tensor of an integer or bool dtype where the
model has a float, a missing or unexpected key, or a wrong shape is an error listing every problem.

Which model: a hub folder's `config.json` names it (`architecture`, `num_classes`; `model_args`, where present,
gives what the weights cannot show, such as ViT's head count); otherwise, and without --model/--num_classes, the
model is inferred from the keys and shapes. `--model` overrides config.json. `--override` sets architecture options
the checkpoint was built with (e.g. `--override num_heads=4`; inferred where the shapes tell). The output
(`rsd_jax.models.load_model(DIR)`) holds params and batch_stats plus model.json: model name, num_classes, overrides,
source path, format and SHA-256 of the weights file, detected layout, and a hub folder's `pretrained_cfg`.

Library use: `convert_state_dict(state_dict, model_name, num_classes=None) -> variables`.
"""
import ast
import dataclasses
import hashlib
import os
import sys
import time
import zipfile

import numpy as np
from absl import flags

from convert import check_out, cli_main, core, formats
from rsd_jax import models
from rsd_jax.errors import UserError

WRAPPER_PREFIXES = ("module.", "_orig_mod.")   # DistributedDataParallel / DataParallel, torch.compile


class ConvertError(UserError, ValueError):
    """A checkpoint that cannot be read or does not fit; the CLI prints it as one line."""


# ----------------------------------------------------------------------------------------------------------------
# Reading a checkpoint file without executing it

class _Opaque:
    """Placeholder for a pickled Python object that is not a tensor (training arguments, custom classes): it
    records what it was given and runs nothing, so a checkpoint cannot execute code through it."""

    def __init__(self, *args, **kwargs):
        self.args, self.kwargs = args, kwargs

    def __setstate__(self, state):
        self.state = state

    def __repr__(self):
        return f"<{type(self).__name__} placeholder>"


def load_checkpoint(path):
    """The object in a torch.save file, loaded with weights_only=True."""
    import argparse as argparse_module
    try:
        import torch
    except ImportError:
        raise ConvertError(f"{path} is a torch.save file: reading it needs torch (pip install -e '.[convert]'); "
                           "safetensors files and hub folders with model.safetensors do not") from None
    if not os.path.exists(path):
        raise ConvertError(f"{path}: no such file")
    if not os.path.isfile(path):
        raise ConvertError(f"{path}: not a file")
    with open(path, "rb") as f:
        magic = f.read(4)
    if not (zipfile.is_zipfile(path) or magic[:1] == b"\x80"):   # torch.save writes a zip (or, before 1.6, a pickle)
        kind = "a truncated or damaged torch zip archive" if magic == b"PK\x03\x04" else "not a torch checkpoint"
        raise ConvertError(f"{path}: {kind} (torch.save files are zip archives)")
    allowed = [argparse_module.Namespace]   # the reference's training checkpoints store their args
    try:
        with torch.serialization.safe_globals(allowed):
            unknown = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:  # not readable this way: torch.load below says what is wrong
        unknown = []
    # Anything else that is not a tensor becomes an inert placeholder instead of running its code.
    allowed += [(type(name.rsplit(".", 1)[-1], (_Opaque,), {}), name) for name in unknown]
    try:
        with torch.serialization.safe_globals(allowed):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for a damaged file
        lines = [line.strip() for line in str(e).splitlines()]
        refused = next((line for line in lines if "GLOBAL" in line), None)
        if refused:   # e.g. os.system, which torch never unpickles, whatever is allowed
            raise ConvertError(f"{path}: refusing to load it, it would run code ({refused})") from None
        raise ConvertError(f"{path}: not a readable torch checkpoint ({_first_line(e)})") from None


def _first_line(e):
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _is_tensor(v):
    return hasattr(v, "shape") and hasattr(v, "dtype") and not isinstance(v, (dict, list, tuple))


def _is_state_dict(obj):
    return isinstance(obj, dict) and bool(obj) and all(isinstance(k, str) and _is_tensor(v) for k, v in obj.items())


def extract_state_dict(obj, use_ema=False):
    """(state_dict, where it was found): the wrappers timm's `load_checkpoint` accepts, in its order."""
    if not isinstance(obj, dict):
        raise ConvertError(f"the file holds a {type(obj).__name__}, not a state_dict or a checkpoint dict "
                           "(save `model.state_dict()`, not the model)")
    if use_ema:
        if _is_state_dict(obj):
            raise ConvertError("--use_ema: the file is a plain state_dict, with no 'state_dict_ema'")
        if "state_dict_ema" not in obj:
            raise ConvertError(f"--use_ema: no 'state_dict_ema' in the checkpoint (keys: {_keys(obj)})")
        candidates = ["state_dict_ema"]
    else:
        candidates = [k for k in ("state_dict", "model") if k in obj]
    for key in candidates:
        if _is_state_dict(obj[key]):
            return dict(obj[key]), key
        raise ConvertError(f"checkpoint entry {key!r} is not a state_dict of tensors")
    if _is_state_dict(obj):
        return dict(obj), "raw state_dict"
    raise ConvertError(f"no state_dict found: not a dict of tensors and no 'state_dict'/'model' entry "
                       f"(keys: {_keys(obj)})")


def _keys(obj, limit=12):
    keys = [repr(k) for k in list(obj)[:limit]]
    return ", ".join(keys) + (", ..." if len(obj) > limit else "")


def strip_prefixes(state_dict):
    """Remove `module.` / `_orig_mod.` prefixes shared by every key (possibly nested)."""
    while state_dict:
        prefix = next((p for p in WRAPPER_PREFIXES if all(k.startswith(p) for k in state_dict)), None)
        if prefix is None:
            break
        state_dict = {k[len(prefix):]: v for k, v in state_dict.items()}
    return state_dict


def to_numpy(value):
    """A numpy copy (never a view of the caller's tensor); floating point as float32, the models' dtype."""
    if hasattr(value, "detach"):   # a torch tensor; duck-typed so the library path needs no torch import
        value = value.detach().cpu()
        if value.is_floating_point():
            value = value.float()
        value = value.numpy()
    return core.float32_copy(value)


def file_sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# ----------------------------------------------------------------------------------------------------------------
# Which model: inference over every family's table

def family_tables():
    """{family: table module} for every family in the registry that has a table (others are skipped)."""
    tables = {}
    for family in sorted(models.FAMILIES):
        try:
            tables[family] = core.family_table(family)
        except ModuleNotFoundError as e:
            if e.name != f"convert.tables.{family}":
                raise
    return tables


def infer_model(state_dict):
    """(model_name, num_classes, overrides) recognised from the keys and shapes, or a ConvertError."""
    found = []
    for family, table in family_tables().items():
        result = table.infer(state_dict) if hasattr(table, "infer") else None
        if result is not None:
            name, num_classes, *rest = result
            found.append((name, int(num_classes), dict(rest[0]) if rest else {}))
    if not found:
        raise ConvertError("cannot tell which model this checkpoint is for; pass --model "
                           f"(known: {', '.join(models.list_models())})")
    if len(found) > 1:
        raise ConvertError(f"the checkpoint fits several models ({', '.join(f[0] for f in found)}); pass --model")
    return found[0]


def template(model_name, num_classes, overrides):
    """The model's abstract variables; a model the options cannot build is a ConvertError."""
    try:
        return models.init_shapes(models.create_model(model_name, num_classes=num_classes, **overrides))
    except (TypeError, ValueError, ZeroDivisionError, IndexError) as e:
        raise ConvertError(f"cannot build {_describe(model_name, overrides)}: {_first_line(e)}") from None


def _classifier_leaves(model_name, overrides, table):
    """{torch key: axis} of the leaves whose size is the class count (found by building two class counts)."""
    shapes = []
    for n in (1000, 1001):
        flat = core._flat_template(template(model_name, n, overrides))
        name_of = getattr(table, "torch_name", None) or core.torch_name
        shapes.append({name_of(c, p): core.to_torch_array(p[-1], np.broadcast_to(np.float32(0), s)).shape
                       for c, p, s, _ in flat})
    return {k: next(i for i, (a, b) in enumerate(zip(s, shapes[1][k])) if a != b)
            for k, s in shapes[0].items() if s != shapes[1][k]}


def checkpoint_num_classes(state_dict, model_name, overrides, table):
    """The class count of `state_dict` as `model_name` reads it; None where its classifier keys are absent."""
    for key, axis in _classifier_leaves(model_name, overrides, table).items():
        if key in state_dict and len(state_dict[key].shape) > axis:
            return int(state_dict[key].shape[axis]), key
    return None, None


# ----------------------------------------------------------------------------------------------------------------
# Conversion

def convert(state_dict, model_name, num_classes=None, overrides=None):
    """(variables, info): info holds num_classes, layout and overrides. Raises ConvertError listing every problem."""
    overrides = dict(overrides or {})
    try:
        family = models.family_of(model_name)
    except models.UnknownModelError as e:
        raise ConvertError(str(e)) from None
    try:
        table = core.family_table(family)
    except ModuleNotFoundError:
        raise ConvertError(f"no converter table for the {family} family (convert/tables/{family}.py)") from None
    try:
        models.model_kwargs(model_name, **overrides)
    except models.UnknownModelError as e:
        raise ConvertError(str(e)) from None
    state_dict = strip_prefixes({k: to_numpy(v) for k, v in state_dict.items()})
    if hasattr(table, "normalize"):
        state_dict, layout = table.normalize(state_dict)
    else:
        layout = "timm-1.x"
    found, key = checkpoint_num_classes(state_dict, model_name, overrides, table)
    if num_classes is not None and found is not None and found != num_classes:
        raise ConvertError(f"the checkpoint has {found} classes ({key} {tuple(state_dict[key].shape)}), "
                           f"not {num_classes}")
    num_classes = num_classes if num_classes is not None else found
    if num_classes is None:
        raise ConvertError(f"cannot find the classifier of {model_name} in the checkpoint to count its classes; "
                           "pass --num_classes")
    shapes = template(model_name, num_classes, overrides)
    try:
        variables = core.state_dict_to_variables(state_dict, shapes, table)
    except core.ConversionError as e:
        raise ConvertError(f"the checkpoint does not fit {_describe(model_name, overrides)}"
                           f"{_looks_like(state_dict, model_name, overrides)}: {e}") from None
    return variables, dict(num_classes=num_classes, layout=layout, overrides=overrides)


def _describe(name, overrides):
    return name + (f" with {overrides}" if overrides else "")


def _looks_like(state_dict, model_name, overrides):
    try:
        name, _, inferred = infer_model(state_dict)
    except (UserError, ValueError):
        return ""
    if (name, inferred) == (model_name, overrides):
        return ""
    return f" (it looks like {_describe(name, inferred)})"


def convert_state_dict(state_dict, model_name, num_classes=None, overrides=None):
    """Flax variables (params, batch_stats) of `model_name` holding `state_dict` (torch tensors or numpy arrays,
    timm 0.6.x or 1.x layout, wrapper prefixes allowed). `num_classes`, if given, must match the checkpoint."""
    return convert(state_dict, model_name, num_classes, overrides)[0]


# ----------------------------------------------------------------------------------------------------------------
# Command line

def parse_overrides(items):
    """`KEY=VALUE` strings; VALUE is a Python literal (`4`, `(1, 1, 1, 1)`, `0.1`) or else a plain string."""
    out = {}
    for item in items or ():
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConvertError(f"--override {item!r}: expected KEY=VALUE")
        try:
            out[key.strip()] = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            out[key.strip()] = value.strip()
        if isinstance(out[key.strip()], list):
            out[key.strip()] = tuple(out[key.strip()])
    return out


USAGE = ("python -m convert.from_torch SOURCE --out DIR [--model NAME] [--num_classes N] [--use_ema] "
         "[--override KEY=VALUE ...] [--verify]")


def define_flags(FLAGS):
    flags.DEFINE_string("out", None, "output model directory (must not exist)", flag_values=FLAGS)
    flags.DEFINE_string("model", None, f"model name (inferred if omitted): {', '.join(models.list_models())}",
                        flag_values=FLAGS)
    flags.DEFINE_integer("num_classes", None, "class count (inferred if omitted; checked if given)",
                         flag_values=FLAGS)
    flags.DEFINE_bool("use_ema", False, "convert 'state_dict_ema' instead of 'state_dict'", flag_values=FLAGS)
    flags.DEFINE_multi_string("override", [], "KEY=VALUE: architecture option the checkpoint was built with",
                              flag_values=FLAGS)
    flags.DEFINE_bool("verify", False, "compare logits and pre-logits with timm on a random input (needs timm)",
                      flag_values=FLAGS)


def read_source(path, use_ema=False):
    """(state_dict, where in the file it was found, formats.Source) of a torch file, a safetensors file or a timm
    hub folder (`formats.open_source` tells which)."""
    source = formats.open_source(path)
    if source.safetensors:
        if use_ema:
            raise ConvertError("--use_ema: a safetensors file holds one state_dict, with no 'state_dict_ema'")
        state_dict, found_in = formats.read_safetensors(source.weights), "safetensors"
    else:
        state_dict, found_in = extract_state_dict(load_checkpoint(source.weights), use_ema)
    if source.kind == "hub":
        found_in = f"{os.path.basename(source.weights)} ({found_in}) of a hub folder"
    return strip_prefixes(state_dict), found_in, source


def _inferred_or_none(state_dict):
    try:
        name, _, inferred = infer_model(state_dict)
        return name, inferred
    except (ConvertError, core.ConversionError):
        return None, {}


def hub_model(hub, state_dict, explicit):
    """(model name, overrides) of a hub folder: config.json's architecture. With model_args (built with other
    options than the registered model's), the options the weights show come from the keys and shapes, those they
    cannot show from config.json: the family table's GUESSED (ViT's head count) from model_args, a CNN's img_size
    from pretrained_cfg's input_size; `explicit` overrides win."""
    name = hub["architecture"]
    if name not in models.list_models():
        raise ConvertError(f"{formats.HUB_CONFIG} names architecture {name!r}, which rsd_jax does not have "
                           f"(known: {', '.join(models.list_models())}); pass --model to read it as one of those")
    inferred_name, inferred = _inferred_or_none(state_dict)
    if inferred_name is not None and models.family_of(inferred_name) != models.family_of(name):
        raise ConvertError(f"{formats.HUB_CONFIG} names {name} but the weights are a {inferred_name} "
                           f"({models.family_of(inferred_name)} family)")
    overrides, defaults = {}, _options(name)
    if inferred_name == name or (inferred_name is not None and hub["model_args"]):
        # the inferred model's overrides, re-expressed against `name`
        overrides = {k: v for k, v in inferred.items() if defaults.get(k) != v}
    table = core.family_table(models.family_of(name))
    from_args = {k: models.model_kwargs(name, **{k: hub["model_args"][k]})[k]
                 for k in getattr(table, "GUESSED", ()) if k in hub["model_args"]}
    size = input_size(hub["pretrained_cfg"])
    if "img_size" not in overrides and size is not None and size != defaults.get("img_size", size):
        overrides["img_size"] = size   # a CNN's input size shows in no weight; timm's input_size says it
    overrides = {**overrides, **from_args, **explicit}
    for k in getattr(table, "GUESSED", ()):
        if k in inferred and k not in from_args and k not in explicit:
            print(f"note: {k}={inferred[k]!r} is a guess, neither the weights nor {formats.HUB_CONFIG} show it; "
                  f"pass --override {k}=N if the model was built with another value")
    return name, overrides


def input_size(pretrained_cfg):
    """The side of a timm pretrained_cfg's square `input_size` [3, H, W], else None."""
    size = pretrained_cfg.get("input_size")
    if isinstance(size, (list, tuple)) and len(size) == 3 and size[1] == size[2] and isinstance(size[2], int):
        return size[2]
    return None


def _options(name):
    """{option: value} of the registered model `name` (its module's fields)."""
    module = models.create_model(name)
    return {f.name: getattr(module, f.name) for f in dataclasses.fields(module) if f.name not in ("parent", "name")}


def run(FLAGS, positional):
    (checkpoint,) = positional
    start = time.perf_counter()
    check_out(FLAGS.out)
    out = os.path.abspath(FLAGS.out)
    explicit = parse_overrides(FLAGS.override)
    state_dict, found_in, source = read_source(checkpoint, FLAGS.use_ema)
    hub = source.hub_config if FLAGS.model is None else None   # --model overrides config.json
    num_classes = FLAGS.num_classes if FLAGS.num_classes is not None or hub is None else hub["num_classes"]

    name, overrides = FLAGS.model, dict(explicit)
    if hub is not None:
        name, overrides = hub_model(hub, state_dict, explicit)
        print(f"model from {formats.HUB_CONFIG}: {name}" + (f", {num_classes} classes" if num_classes else "")
              + (f", overrides {overrides}" if overrides else ""))
    elif name is None:
        name, inferred_classes, inferred = infer_model(state_dict)
        overrides = {**inferred, **explicit}
        print(f"inferred model: {name}, {inferred_classes} classes"
              + (f", overrides {inferred}" if inferred else "") + " (from the checkpoint's keys and shapes)")
        guessed = [k for k in getattr(core.family_table(models.family_of(name)), "GUESSED", ()) if k in inferred
                   and k not in explicit]
        for k in guessed:
            print(f"note: {k}={inferred[k]!r} is a guess, the weights do not show it; "
                  f"pass --override {k}=N if the model was built with another value")
    else:
        models_family = _family_or_error(name)
        inferred_name, inferred = _inferred_or_none(state_dict)
        if inferred_name is not None and models.family_of(inferred_name) != models_family:
            raise ConvertError(f"the checkpoint is a {inferred_name} ({models.family_of(inferred_name)} family), "
                               f"not a {name}; pass --model {inferred_name} or leave --model out")
        if inferred_name == name and inferred:
            overrides = {**inferred, **explicit}
            print(f"inferred overrides for {name}: {inferred}")
    variables, info = convert(state_dict, name, num_classes, overrides)
    if num_classes is None and FLAGS.model is not None:
        print(f"inferred num_classes: {info['num_classes']}")
    if FLAGS.verify:
        from convert import verify
        verify.check(name, info["num_classes"], info["overrides"], variables)
    provenance = dict(source_format=source.kind)
    if hub is not None:   # kept for convert.to_torch --format hf (mean/std, crop, ... of the weights)
        provenance["timm_pretrained_cfg"] = hub["pretrained_cfg"]
    models.save_model(out, name, info["num_classes"], variables, overrides=info["overrides"],
                      source=os.path.abspath(checkpoint), source_entry=found_in,
                      source_sha256=file_sha256(source.weights), layout=info["layout"], **provenance)
    print(f"wrote {FLAGS.out}: {_describe(name, info['overrides'])}, {info['num_classes']} classes, "
          f"{len(state_dict)} tensors from {found_in}, layout {info['layout']} "
          f"({time.perf_counter() - start:.1f} s)")


def _family_or_error(name):
    try:
        return models.family_of(name)
    except models.UnknownModelError as e:
        raise ConvertError(str(e)) from None


def main(argv=None):
    return cli_main(run, argv, define=define_flags, args=("SOURCE",), required=("out",), usage=USAGE)


if __name__ == "__main__":
    sys.exit(main())
