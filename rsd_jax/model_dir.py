"""Model directories: one model's variables (params, batch_stats) as an orbax checkpoint in `variables/`, plus
`model.json` naming the architecture (`model`, `num_classes`, `overrides`) and where it came from. Written by the
converter and by training (a trained teacher, an exported student); read by `models.load_model`, `student.init`,
`teacher.path`, evaluate and the export. A write goes to a temporary sibling that is renamed into place, so a crash
never leaves a half-written directory. (A run's train state is `rsd_jax.checkpoint`'s.)
"""
import json
import os
import shutil
import tempfile

import jax
import numpy as np
import orbax.checkpoint as ocp

from rsd_jax import trees
from rsd_jax.errors import CheckpointError

MODEL_JSON = "model.json"


def save_model(directory, variables, metadata):
    """Write `variables` and `metadata` (must hold `model` and `num_classes`) to `directory`, atomically."""
    directory = os.path.abspath(directory)
    if os.path.exists(directory):
        raise CheckpointError(f"{directory} already exists; choose another output directory or remove it")
    parent = os.path.dirname(directory)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=os.path.basename(directory) + ".tmp-", dir=parent)
    try:
        host = jax.tree_util.tree_map(np.asarray, jax.device_get(dict(variables)))
        # Written by one process (process 0 of a multi-process run): no barriers with the others.
        only_me = ocp.options.MultiprocessingOptions(primary_host=jax.process_index(),
                                                     active_processes={jax.process_index()})
        with ocp.StandardCheckpointer(multiprocessing_options=only_me) as ckpt:
            ckpt.save(os.path.join(tmp, "variables"), host)
        with open(os.path.join(tmp, MODEL_JSON), "w") as f:
            json.dump(metadata, f, indent=2, sort_keys=True)
        os.rename(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def read_model_metadata(directory):
    path = os.path.join(directory, MODEL_JSON)
    if not os.path.isfile(path):
        raise CheckpointError(f"{directory} is not a model directory (no {MODEL_JSON}); "
                              "write one with `python -m convert.from_torch` or by training")
    try:
        with open(path) as f:
            meta = json.load(f)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path} is unreadable: {e}") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("model"), str) or not isinstance(
            meta.get("num_classes"), int):
        raise CheckpointError(f"{path} must hold a 'model' name and an integer 'num_classes'")
    return meta


def load_model_variables(directory, template):
    """Restore the variables of a model directory as numpy arrays, checked leaf by leaf against `template`."""
    path = os.path.join(os.path.abspath(directory), "variables")
    if not os.path.isdir(path):
        raise CheckpointError(f"{directory} has no variables/ directory")
    try:
        with ocp.StandardCheckpointer() as ckpt:
            tree = ckpt.restore(path)
    except Exception as e:  # orbax raises many types for a damaged directory
        raise CheckpointError(f"cannot read {path}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") \
            from None
    trees.check(template, tree, directory, error=CheckpointError)
    return jax.tree_util.tree_map(np.asarray, tree)
