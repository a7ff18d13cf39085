"""Generic torch state_dict <-> Flax variables mapping; family tables add only their exceptions.

Flax names mirror timm's with `_N` for `.N` (`layer1_0` is `layer1.0`). Leaves map as:
  params kernel (4-D)  <-> weight, OIHW <-> HWIO        params kernel (2-D) <-> weight, transposed
  params scale         <-> weight                       params bias         <-> bias
  batch_stats mean     <-> running_mean                 batch_stats var     <-> running_var
  any other params leaf (cls_token, pos_embed, gamma, ...) <-> the same name, same shape.
torch's BatchNorm `num_batches_tracked` has no Flax counterpart: dropped on import, written as 0 on export.
"""
import importlib
import re

import jax
import numpy as np
from flax import traverse_util

from rsd_jax import trees

_LEAF_TO_TORCH = {("params", "kernel"): "weight", ("params", "scale"): "weight", ("params", "bias"): "bias",
                  ("batch_stats", "mean"): "running_mean", ("batch_stats", "var"): "running_var"}


class ConversionError(ValueError):
    """A state_dict that does not fit the model; the message lists every problem at once."""


def family_table(family):
    """The key table module of a model family (convert/tables/<family>.py)."""
    return importlib.import_module(f"convert.tables.{family}")


def torch_name(collection, path):
    """Default torch key of a Flax leaf: ('layer1_0', 'conv1', 'kernel') -> 'layer1.0.conv1.weight'."""
    *modules, leaf = path
    leaf = _LEAF_TO_TORCH.get((collection, leaf), leaf)
    return ".".join([re.sub(r"_(\d+)$", r".\1", re.sub(r"_(\d+)(?=_)", r".\1", m)) for m in modules] + [leaf])


def to_flax_array(leaf_name, array):
    if leaf_name == "kernel" and array.ndim == 4:
        return np.transpose(array, (2, 3, 1, 0))
    if leaf_name == "kernel" and array.ndim == 2:
        return array.T
    return array


def to_torch_array(leaf_name, array):
    if leaf_name == "kernel" and array.ndim == 4:
        return np.transpose(array, (3, 2, 0, 1))
    if leaf_name == "kernel" and array.ndim == 2:
        return array.T
    return array


def _flat_template(template):
    """[(collection, path, shape, dtype)] of an abstract or concrete variables tree."""
    flat = traverse_util.flatten_dict(dict(template))
    return [(k[0], k[1:], tuple(v.shape), np.dtype(v.dtype)) for k, v in flat.items()]


def _wanted_dtype(dtype):
    """A floating leaf takes float32 (the checkpoint's floats are cast to it); any other leaf (CRD's bool flag) its
    own dtype."""
    return np.dtype(np.float32) if np.issubdtype(dtype, np.floating) else dtype


def float32_copy(value):
    """A numpy copy; floating point of any width as float32 (the models' dtype), other dtypes kept to be refused."""
    value = np.array(value, copy=True)
    return value.astype(np.float32) if np.issubdtype(value.dtype, np.floating) else value


def state_dict_to_variables(state_dict, template, table=None):
    """Fill `template` (the model's variable tree, abstract is fine) from a timm-1.x-layout numpy state_dict.

    `table.torch_name(collection, path)` may override the default name rule for a family. Every tensor must be
    used exactly once (BatchNorm's num_batches_tracked and the table's `IGNORED` patterns excepted) and every
    leaf filled with the right shape and a floating-point dtype (a non-float leaf, such as CRD's flag: its own
    dtype); otherwise one ConversionError lists all the problems.
    """
    name_of = getattr(table, "torch_name", None) or torch_name
    ignored = [re.compile(p) for p in (*getattr(table, "IGNORED", ()), r"(^|\.)num_batches_tracked$")]
    given = {k: v for k, v in state_dict.items() if not any(p.search(k) for p in ignored)}
    leaves = {name_of(collection, path): (collection, path, shape, dtype)
              for collection, path, shape, dtype in _flat_template(template)}
    # Both sides keyed by torch name, the checkpoint's tensors in the Flax layout (never a view of torch memory).
    flax_values = {k: to_flax_array(leaves[k][1][-1], float32_copy(v)) if k in leaves else v for k, v in given.items()}
    wanted = {k: jax.ShapeDtypeStruct(shape, _wanted_dtype(dtype)) for k, (_, _, shape, dtype) in leaves.items()}
    differences = trees.diff(wanted, flax_values, dtypes=True)   # e.g. an integer or bool tensor for a float leaf
    if differences:
        raise ConversionError(differences.describe("checkpoint", "model"))
    return traverse_util.unflatten_dict({(collection, *path): flax_values[k]
                                         for k, (collection, path, _, _) in leaves.items()})


def variables_to_state_dict(variables, table=None):
    """The inverse: a timm-1.x-layout numpy state_dict (BatchNorm's num_batches_tracked written as 0)."""
    name_of = getattr(table, "torch_name", None) or torch_name
    out = {}
    for key, value in traverse_util.flatten_dict(dict(variables)).items():
        collection, path = key[0], key[1:]
        out[name_of(collection, path)] = to_torch_array(path[-1], np.asarray(value))
        if collection == "batch_stats" and path[-1] == "mean":
            out[name_of(collection, path)[: -len("running_mean")] + "num_batches_tracked"] = np.zeros((), np.int64)
    return out
