"""The base of every method's module: what initialisation needs to know beyond the models' outputs."""
import flax.linen as nn
import jax.numpy as jnp


class Method(nn.Module):
    """A distillation method's module (see `rsd_jax.distillers`)."""

    def example_batch(self, n):
        """The batch entries `__call__` reads, for `n` examples, to initialise the module with: labels and their
        mask; a method that reads more (CRD: the dataset indices) adds its own."""
        return {"label": jnp.zeros((n,), jnp.int32), "label_mask": jnp.ones((n,))}
