"""Sharding is data: one `('data',)` mesh over every device of every process; the batch is split along it and
everything else (student, extra modules, optimizer state, teacher) is replicated."""
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from rsd_jax.errors import UserError


def make_mesh():
    return Mesh(np.asarray(jax.devices()), ("data",))


def batch_sharding(mesh):
    return NamedSharding(mesh, P("data"))


def replicated(mesh):
    return NamedSharding(mesh, P())


def check_batch_size(global_batch, mesh):
    if global_batch % mesh.size:
        raise UserError(f"global batch {global_batch} is not divisible by the {mesh.size} devices")


def to_global(batch, mesh):
    """Global arrays from a global host batch: each process contributes the rows of its own devices."""
    sharding = batch_sharding(mesh)
    n, p = jax.process_count(), jax.process_index()

    def one(x):
        rows = x.shape[0] // n
        return jax.make_array_from_process_local_data(sharding, x[p * rows:(p + 1) * rows], x.shape)

    return jax.tree_util.tree_map(one, batch)
