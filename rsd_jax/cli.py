"""What every command-line entry point shares: quiet logging and user errors as one line, exit status 2."""
import logging
import sys

from rsd_jax.errors import UserError


def quiet_logging():
    """Our own messages at INFO on stderr; orbax's and absl's per-save chatter only from WARNING up."""
    from absl import logging as absl_logging
    absl_logging.set_verbosity(absl_logging.WARNING)
    ours = logging.getLogger("rsd_jax")
    if not ours.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        ours.addHandler(handler)
    ours.setLevel(logging.INFO)
    ours.propagate = False


def _one_line(e):
    return " ".join(str(e).split()) or type(e).__name__


def parse_flags(argv):
    """absl flag parsing (config files and --config.x overrides included) with errors as UserError."""
    from absl import flags
    try:
        rest = flags.FLAGS(argv)
        for name in ("config",):
            if name in flags.FLAGS:
                getattr(flags.FLAGS, name).keys()   # a config file that failed to load raises only when read
    except (AttributeError, KeyError) as e:
        key = _one_line(e).strip("\"'")
        raise UserError(f"unknown config key '{key}' on the command line") from None
    except Exception as e:  # absl and ml_collections raise several types, all for a bad command line
        message = _one_line(e).split(" Attempted ")[0]
        raise UserError(f"bad command line: {message}") from None
    return rest


def enable_compilation_cache():
    """XLA's persistent compilation cache (unless JAX_COMPILATION_CACHE_DIR already chooses one): a second run of the
    same program, e.g. another seed, starts without compiling."""
    import os

    import jax
    if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
        jax.config.update("jax_compilation_cache_dir", os.path.expanduser("~/.cache/rsd_jax/jax_cache"))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


def run_main(fn, argv=None):
    """Parse flags and run `fn(remaining_argv)`; a UserError becomes one line on stderr and exit status 2."""
    quiet_logging()
    enable_compilation_cache()
    try:
        fn(parse_flags(sys.argv if argv is None else argv))
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
