"""What every command-line entry point shares: quiet logging and user errors as one line, exit status 2."""
import logging
import os
import re
import sys
import tempfile

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


def one_line(e):
    return " ".join(str(e).split()) or type(e).__name__


def check_writable(path, what):
    """Fail before any work unless `path` (existing or to be created, parents included) lies under a directory this
    process can write in: the nearest existing one of `path` and its parents decides. `what` names the path in the
    error, e.g. "workdir X"."""
    probe = os.path.abspath(path)
    while not os.path.lexists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        raise UserError(f"{what}: {probe} is not a directory")
    try:   # a real write: os.access says yes to root even on /proc
        with tempfile.TemporaryFile(dir=probe):
            pass
    except OSError as e:
        raise UserError(f"{what}: cannot write in {probe} ({e.strerror})") from None


def config_file(spec):
    """The file of a --config FILE.py[:arg]; a UserError if there is no such file."""
    path = spec.partition(":")[0]
    if not os.path.isfile(path):
        raise UserError(f"config file {path} not found")
    return path


def _config_spec(argv):
    """The FILE.py[:arg] given to --config, or None."""
    for i, arg in enumerate(argv):
        if arg.startswith("--config="):
            return arg.split("=", 1)[1]
        if arg == "--config" and i + 1 < len(argv):
            return argv[i + 1]
    return None


def parse_flags(argv):
    """absl flag parsing (config files and --config.x overrides included) with errors as UserError; positional
    arguments are refused (no entry point takes any, and a forgotten `--` would otherwise go unnoticed)."""
    from absl import flags
    spec = _config_spec(argv[1:])
    path = config_file(spec) if spec else None
    try:
        rest = flags.FLAGS(argv)
        for name in ("config",):
            if name in flags.FLAGS:
                getattr(flags.FLAGS, name).keys()   # a config file that failed to load raises only when read
    except (AttributeError, KeyError) as e:
        key = one_line(e).strip("\"'")
        if "get_config" in key:
            raise UserError(f"config file {path} has no get_config()") from None
        raise UserError(f"unknown config key '{key}' on the command line") from None
    except Exception as e:  # absl and ml_collections raise several types, all for a bad command line
        message = one_line(e).split(" Attempted ")[0]
        if "Traceback (most recent call last)" in message:   # the config file's own error, with its traceback
            message = f"{spec}: " + re.split(r"\b\w*(?:Error|Exception): ", message)[-1]
        raise UserError(f"bad command line: {message}") from None
    if len(rest) > 1:
        raise UserError(f"unexpected argument {rest[1]!r} (options are written --name=value)")
    return rest


def enable_compilation_cache():
    """XLA's persistent compilation cache (unless JAX_COMPILATION_CACHE_DIR already chooses one): a second run of the
    same program, e.g. another seed, starts without compiling."""
    import os

    import jax
    if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
        jax.config.update("jax_compilation_cache_dir", os.path.expanduser("~/.cache/rsd_jax/jax_cache"))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


def init_distributed(coordinator=None, num_processes=None, process_id=None, from_environment=False):
    """`jax.distributed.initialize` for a run over several processes: explicit (all three given) or detected from the
    environment (SLURM, JAX_COORDINATOR_ADDRESS/JAX_NUM_PROCESSES/JAX_PROCESS_ID); nothing for one process."""
    import os

    import jax
    if coordinator is None and num_processes is None and process_id is None and "JAX_NUM_PROCESSES" in os.environ:
        try:    # JAX itself reads only JAX_COORDINATOR_ADDRESS; the count and index come from here
            coordinator = os.environ.get("JAX_COORDINATOR_ADDRESS")
            num_processes, process_id = int(os.environ["JAX_NUM_PROCESSES"]), int(os.environ["JAX_PROCESS_ID"])
        except (KeyError, ValueError):
            raise UserError("JAX_NUM_PROCESSES needs JAX_COORDINATOR_ADDRESS and an integer JAX_PROCESS_ID") from None
    explicit = (coordinator, num_processes, process_id)
    if any(x is not None for x in explicit):
        if any(x is None for x in explicit):
            raise UserError("--coordinator, --num_processes and --process_id go together")
        if not 0 <= process_id < num_processes:
            raise UserError(f"--process_id {process_id} is not in 0..{num_processes - 1}")
        jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                                   process_id=process_id)
    elif from_environment or "JAX_COORDINATOR_ADDRESS" in os.environ:
        jax.distributed.initialize()


def _quiet_closed_event_loops(unraisable, default=sys.unraisablehook):
    """orbax's asyncio helpers, after a failed restore of a damaged checkpoint (which we report ourselves), print an
    ignored 'Event loop is closed' traceback; only that one is silenced."""
    if isinstance(unraisable.exc_value, RuntimeError) and "Event loop is closed" in str(unraisable.exc_value):
        return
    default(unraisable)


def run_main(fn, argv=None):
    """Parse flags and run `fn(remaining_argv)`; a UserError becomes one line on stderr and exit status 2."""
    quiet_logging()
    sys.unraisablehook = _quiet_closed_event_loops
    enable_compilation_cache()
    try:
        fn(parse_flags(sys.argv if argv is None else argv))
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
