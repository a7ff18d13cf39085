"""The one tree comparison (rsd_jax.trees): every kind of difference named, in one line."""
import jax
import numpy as np
import pytest

from rsd_jax import trees
from rsd_jax.errors import CheckpointError


def test_every_difference_is_named_once():
    template = {"params": {"conv": {"kernel": jax.ShapeDtypeStruct((3, 3, 1, 4), np.float32),
                                    "bias": jax.ShapeDtypeStruct((4,), np.float32)},
                           "fc": {"kernel": jax.ShapeDtypeStruct((4, 2), np.float32)}},
                "batch_stats": {"bn": {"mean": jax.ShapeDtypeStruct((4,), np.float32)}}}
    tree = {"params": {"conv": {"kernel": np.zeros((3, 3, 1, 8), np.float32), "bias": np.zeros(4, np.float16)},
                       "head": {"kernel": np.zeros((4, 2), np.float32)}},
            "batch_stats": {"bn": {"mean": np.zeros(4, np.float32)}}}
    d = trees.diff(template, tree, dtypes=True)
    assert d.missing == ["params/fc/kernel"] and d.unexpected == ["params/head/kernel"]
    assert d.shapes == [("params/conv/kernel", (3, 3, 1, 8), (3, 3, 1, 4))]
    assert d.dtypes == [("params/conv/bias", np.dtype(np.float16), np.dtype(np.float32))]
    assert len(d) == 4 and not trees.diff(template, template)
    assert len(trees.diff(template, tree)) == 3      # dtypes only when asked
    with pytest.raises(CheckpointError) as e:
        trees.check(template, tree, "model dir X", error=CheckpointError, dtypes=True)
    message = str(e.value)
    assert "\n" not in message and message.startswith("model dir X does not fit: ")
    for part in ("missing in checkpoint: params/fc/kernel", "unexpected in checkpoint: params/head/kernel",
                 "shape mismatch (checkpoint vs model): params/conv/kernel (3, 3, 1, 8) vs (3, 3, 1, 4)",
                 "dtype mismatch (checkpoint vs model): params/conv/bias float16 vs float32"):
        assert part in message, message


def test_describe_cuts_long_lists():
    template = {f"w{i}": np.zeros(1) for i in range(5)}
    assert trees.diff(template, {}).describe(limit=2) == "missing in checkpoint: w0, w1, ..."
    trees.check(template, dict(template), "same")     # no error
