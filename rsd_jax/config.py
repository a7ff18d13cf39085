"""The base config: every knob with its default (pair and demo configs in configs/ start from here), and the checks
of its settings that no type can express."""
import jax.numpy as jnp
import ml_collections

from rsd_jax import distillers
from rsd_jax.data import augment
from rsd_jax.errors import UserError


def base_config():
    c = ml_collections.ConfigDict()
    c.program = "train"             # "train": one run; "demo": the bundled teacher + three students comparison
    c.seed = 0                      # data order and augmentation (and what model_seed seeds, unless it is set)
    # The student's own randomness: student and method initialisation, dropout and drop-path. None: `seed`.
    c.model_seed = ml_collections.config_dict.placeholder(int)
    # Several students in one run, against one teacher pass per step (rsd_jax/students.py, docs/students.md):
    # `students` model seeds (model_seed, model_seed+1, ...) crossed with the `sweep`, a tuple of override strings
    # such as "distill.rsd.kappa=0.02" (several overrides in one entry joined by ","). Student i = j*students + k
    # has sweep entry j and model seed model_seed+k; each gets its run directory <workdir>/students/<i>/.
    c.students = 1
    c.sweep = ()
    c.students_design = "auto"      # "unroll" (the students one after another in one jit), "vmap", or "auto"

    c.data = ml_collections.ConfigDict(dict(
        name="digits", data_dir="", image_size=32, batch_size=64, eval_batch_size=128,
        test_fraction=0.2, labelled_fraction=1.0, split_seed=0,
        # tfds:<name> (rsd_jax/data/tfds_source.py): feature names and splits; "" = the first of test, validation.
        image_key="image", label_key="label", train_split="train", test_split="",
        # Per-channel normalisation (0..1 scale) for tfds:/folder: datasets; () = computed from the training split.
        mean=(), std=(),
        # imagenet2012 (rsd_jax/data/imagenet.py): host decoding worker processes (0 = in the training process), and
        # the eval side the host resizes to (0 = floor(image_size / (augment.crop_pct or 0.875))).
        workers=8, host_image_size=0,
        # On-device augmentation: the reference's CNN recipe by default (rsd_jax/data/augment.py).
        augment=augment.default_config(),
    ))
    # student.init: "" (random) or a model directory to start from (its classifier is re-initialised when the class
    # count differs), e.g. to fine-tune a teacher from converted ImageNet weights with distill.method=vanilla.
    c.student = ml_collections.ConfigDict(dict(model="resnet18", overrides={}, init=""))
    # teacher.path: a model directory (converter output, or `<workdir>/student` of a finished run), or "random".
    c.teacher = ml_collections.ConfigDict(dict(model="", overrides={}, path=""))
    c.distill = ml_collections.ConfigDict(dict(
        method="rsd",
        gt_loss_weight=1.0,
        label_smoothing=0.1,
        # Examples per statistics group for RSD and BatchNorm; 0 = the whole global batch. The reference on
        # 2 GPUs x 128 images computes them per GPU: group_size=128.
        group_size=0,
        **distillers.default_configs(),
    ))
    c.optim = ml_collections.ConfigDict(dict(
        name="sgd", lr=0.05, momentum=0.9, betas=(0.9, 0.999), eps=1e-8, weight_decay=2e-3,
        schedule="cosine", epochs=300, warmup_epochs=3, warmup_lr=1e-4, min_lr=1e-3,
        decay_epochs=30, decay_rate=0.1, clip_grad=0.0,
    ))
    # EMA of the student (timm ModelEmaV2: parameters and BatchNorm statistics), evaluated and checkpointed with it.
    c.ema = ml_collections.ConfigDict(dict(decay=0.0))     # 0 = off; the reference's ViT/MLP ImageNet: 0.99996
    # Compute dtype of the train step: "bfloat16" computes in bf16 with float32 parameters, optimizer state, norm
    # statistics, losses and RSD statistics (`compute_dtype` below).
    c.compute_dtype = "float32"
    c.eval_every_epochs = 1
    c.checkpoint_every_epochs = 1
    c.checkpoint_every_steps = 0    # >0: also checkpoint every this many steps (resuming mid-epoch is exact)
    c.skip_nonfinite_steps = False  # True: a step with a non-finite loss/gradient leaves the state as it was; False: stop
    c.stop_after_epoch = 0          # >0: leave after this epoch's checkpoint (resumable), e.g. for time-limited jobs
    c.log_every_steps = 10
    c.progress_bar = True
    return c


# Integer settings and their least value (0 where 0 means off).
_COUNTS = {"data.batch_size": 1, "data.eval_batch_size": 1, "data.image_size": 1, "optim.epochs": 1,
           "log_every_steps": 1, "eval_every_epochs": 1, "checkpoint_every_epochs": 1, "checkpoint_every_steps": 0,
           "stop_after_epoch": 0, "distill.group_size": 0, "students": 1}


def check_counts(config):
    for key, least in _COUNTS.items():
        section, _, name = key.rpartition(".")
        holder = config[section] if section else config
        value = holder.get(name, least)
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise UserError(f"{key} must be an integer >= {least}, got {value!r}")


def compute_dtype(config):
    """The train step's compute dtype, `config.compute_dtype` ("float32", the default, or "bfloat16")."""
    name = config.get("compute_dtype", "float32") or "float32"
    if name not in ("float32", "bfloat16"):
        raise UserError(f"unknown compute_dtype {name!r}; known: float32, bfloat16")
    return jnp.dtype(name)
