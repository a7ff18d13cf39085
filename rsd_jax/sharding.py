"""Sharding is data: one `('data',)` mesh over every device of every process; the batch is split along it and
everything else (student, extra modules, optimizer state, teacher) is replicated."""
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from rsd_jax.errors import UserError


def make_mesh():
    return Mesh(np.asarray(jax.devices()), ("data",))


def sync_each_step(mesh):
    """Whether the host must wait for each sharded computation to finish before it dispatches the next: on CPU
    devices it must, since back-to-back sharded steps on (fake) CPU devices deadlock in their all-reduce otherwise
    (docs/machine.md#fake-device-deadlock). On accelerators the host runs ahead, and checks wait only where they must."""
    return mesh.devices.flat[0].platform == "cpu"


def batch_sharding(mesh):
    return NamedSharding(mesh, P("data"))


def replicated(mesh):
    return NamedSharding(mesh, P())


def check_batch_size(global_batch, mesh):
    if global_batch % mesh.size:
        raise UserError(f"global batch {global_batch} is not divisible by the {mesh.size} devices")


def to_global(batch, mesh, local=False):
    """Global arrays from a host batch: the global batch, of which each process contributes the rows of its own
    devices (`data.process_rows`), or, with `local`, just this process's rows."""
    from rsd_jax.data import process_rows
    sharding = batch_sharding(mesh)
    n, p = jax.process_count(), jax.process_index()

    def one(x):
        global_rows = x.shape[0] * n if local else x.shape[0]
        mine = x if local else x[process_rows(global_rows, p, n)]
        return jax.make_array_from_process_local_data(sharding, mine, (global_rows,) + x.shape[1:])

    return jax.tree_util.tree_map(one, batch)
