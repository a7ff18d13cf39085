"""One way to compare a tree with a template: every missing, unexpected, mis-shaped and (optionally) mis-typed leaf
in one readable error. Restoring a checkpoint, loading a model directory, initialising a student from one, the
converter and the step check all use it.

Trees are nested dicts (or any pytree: a TrainState, FrozenDicts) of arrays, ShapeDtypeStructs or anything with a
shape; leaves are named by their path joined with "/" (`params/layer1_0/conv1/kernel`). A flat dict of names works
as it is (the converter's torch keys).
"""
import dataclasses

import jax
import numpy as np

from rsd_jax.errors import UserError


def path_name(path):
    """A pytree path as "a/b/c" (dict keys, dataclass fields and sequence indices alike)."""
    return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def flat_leaves(tree):
    """{name: leaf} of a pytree."""
    return {path_name(p): x for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _dtype(x):
    dtype = getattr(x, "dtype", None)
    return None if dtype is None else np.dtype(dtype)


@dataclasses.dataclass
class TreeDiff:
    """How `tree` differs from `template`, leaf by leaf; false when they agree."""
    missing: list       # names in the template only
    unexpected: list    # names in the tree only
    shapes: list        # (name, tree's shape, template's shape)
    dtypes: list        # (name, tree's dtype, template's dtype)

    def __len__(self):
        return len(self.missing) + len(self.unexpected) + len(self.shapes) + len(self.dtypes)

    def describe(self, source="checkpoint", target="model", limit=None):
        """One line: 'missing in SOURCE: a, b | unexpected in SOURCE: c | shape mismatch (SOURCE vs TARGET): d (2,)
        vs (3,) | dtype mismatch (...)', each list cut to `limit` names."""
        def listed(items, sep=", "):
            shown = list(items)[:limit] if limit else list(items)
            return sep.join(shown) + (f"{sep}..." if len(shown) < len(items) else "")
        parts = []
        if self.missing:
            parts.append(f"missing in {source}: {listed(self.missing)}")
        if self.unexpected:
            parts.append(f"unexpected in {source}: {listed(self.unexpected)}")
        if self.shapes:
            parts.append(f"shape mismatch ({source} vs {target}): "
                         + listed([f"{k} {got} vs {want}" for k, got, want in self.shapes], "; "))
        if self.dtypes:
            parts.append(f"dtype mismatch ({source} vs {target}): "
                         + listed([f"{k} {got} vs {want}" for k, got, want in self.dtypes], "; "))
        return " | ".join(parts)


def diff(template, tree, dtypes=False):
    """Compare `tree` with `template` by leaf names and shapes (and dtypes where `dtypes` and both sides have one)."""
    want, got = flat_leaves(template), flat_leaves(tree)
    common = sorted(set(want) & set(got))
    shapes = [(k, tuple(np.shape(got[k])), tuple(np.shape(want[k]))) for k in common
              if tuple(np.shape(got[k])) != tuple(np.shape(want[k]))]
    types = []
    if dtypes:
        types = [(k, _dtype(got[k]), _dtype(want[k])) for k in common
                 if None not in (_dtype(got[k]), _dtype(want[k])) and _dtype(got[k]) != _dtype(want[k])]
    return TreeDiff(missing=sorted(set(want) - set(got)), unexpected=sorted(set(got) - set(want)), shapes=shapes,
                    dtypes=types)


def check(template, tree, what, *, source="checkpoint", target="model", dtypes=False, error=UserError):
    """Raise `error("WHAT does not fit: <every difference>")` unless `tree` fits `template`."""
    differences = diff(template, tree, dtypes=dtypes)
    if differences:
        raise error(f"{what} does not fit: {differences.describe(source, target)}")
