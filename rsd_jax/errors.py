"""User errors: the CLIs print their message as one line and exit 2, without a traceback."""


class UserError(Exception):
    """A mistake in the user's input (config, paths, checkpoints), not a bug in rsd_jax."""


class CheckpointError(UserError, ValueError):
    """A checkpoint or model directory that is missing, unreadable or does not fit; the message says which and why."""
