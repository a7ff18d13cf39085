"""The train state. The teacher is never inside it: its variables are a separate, never-differentiated argument
of the step, so it can be neither updated nor checkpointed with the run."""
from typing import Any

import flax.struct
import jax


@flax.struct.dataclass
class TrainState:
    step: jax.Array          # optimizer steps taken
    params: Any              # {"student": ..., "extra": ...}: everything the optimizer trains
    model_state: Any         # {"student": ..., "extra": ...}: their non-parameter collections ({"batch_stats": ...},
                             # a method's memory banks), updated by the forward pass, not by the optimizer
    opt_state: Any
    rng: jax.Array           # raw key data (uint32); per-step keys are fold_in(rng, step)
    ema: Any = None          # {"params", "model_state"} of the student's exponential moving average, or None (off)
