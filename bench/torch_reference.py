"""The reference's distillation step re-stated in PyTorch + timm, from docs/reference.md (§1.1-1.4, §2, §4.3-4.5).

A plain eager implementation: the fidelity check (bench/step_check.py, `python -m rsd_jax.step_check`) compares
rsd_jax's jitted step against it, and the speed benchmark uses it as the PyTorch baseline.

    ref = build(config, num_classes, steps_per_epoch)      # ref.student, ref.teacher, ref.extra, ref.optimizer
    losses = ref.step({"image": images, "target": targets})   # one optimizer step

* The teacher runs in eval mode under no_grad on the student's (already augmented and normalised) batch.
* The student and the method's modules run in train mode. The global batch is cut into `distill.group_size` groups (the
  reference's DDP ranks): each group's BatchNorm and RSD statistics come from its own examples, the loss is the mean
  of the per-group losses (DDP averages the ranks' gradients), and BatchNorm running statistics are averaged over
  groups after the step (the reference's distribute_bn; it runs per epoch there, the JAX side every step).
* L = gt_loss_weight * CE(label smoothing) + the method's terms (bench/torch_distillers.py: RSD, KD, DKD, DIST,
  OFA, FitNet, CRD, RKD, CC). Soft (B, C) targets (mixup/cutmix) use soft-target CE. The method sees its group's
  student and teacher outputs: logits, pre-logits and the four stage outputs of docs/reference.md §3 (forward hooks on the
  timm modules; maps NCHW, tokens (B, L, C)).
* Optimizer: SGD with Nesterov momentum (timm's `sgd`) or AdamW; weight decay iff ndim > 1 over student and
  extra parameters (the optimizer is built on the distiller, which has no no_weight_decay()); gradient-norm
  clipping when configured; the LR constant within an epoch (timm's per-epoch cosine with linear warmup).
* Deliberate differences kept from rsd_jax (docs/reference.md §7) are listed in `ref.notes`.
* `dtype=torch.float64` runs the same step in double precision: the fidelity check's measure of fp32 rounding.
"""
import dataclasses
import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from bench import torch_distillers
from convert import verify
from rsd_jax import models


def epoch_lr(optim, epoch):
    """timm's CosineLRScheduler / StepLRScheduler value for `epoch` (docs/reference.md §4.4), written from the formula."""
    if epoch < optim.warmup_epochs:
        return optim.warmup_lr + epoch * (optim.lr - optim.warmup_lr) / optim.warmup_epochs
    if optim.schedule == "cosine":
        return optim.min_lr + 0.5 * (optim.lr - optim.min_lr) * (1 + math.cos(math.pi * epoch / optim.epochs))
    if optim.schedule == "step":
        return optim.lr * optim.decay_rate ** (epoch // optim.decay_epochs)
    if optim.schedule == "constant":
        return optim.lr
    raise ValueError(f"unknown schedule {optim.schedule!r}")


def create_timm(model_name, num_classes, overrides, seed):
    torch.manual_seed(seed)
    return verify.create_timm(model_name, num_classes, dict(overrides))


def features(model, x):
    """(logits, pre-logits) of a timm model: the classifier's input and its output."""
    trunk = model.forward_features(x)
    pre = model.forward_head(trunk, pre_logits=True)
    return model.get_classifier()(pre), pre


def stage_modules(model, indices):
    """The timm modules whose outputs are the reference's stage features (docs/reference.md §3); `indices` index its list."""
    if hasattr(model, "layer1"):                                   # ResNet: layer1..4
        return [getattr(model, f"layer{i + 1}") for i in indices]
    if hasattr(model, "stages"):                                   # ConvNeXt: stages 0..3
        return [model.stages[i] for i in indices]
    if hasattr(model, "layers"):                                   # Swin: every block, flat
        return [[b for layer in model.layers for b in layer.blocks][i] for i in indices]
    if hasattr(model, "conv_head"):                                # MobileNetV2: every block, then the head map
        return [([b for stage in model.blocks for b in stage] + [model.bn2])[i] for i in indices]
    return [model.blocks[i] for i in indices]                      # ViT, Mixer, ResMLP: blocks


class Tapped:
    """model(x) -> (logits, {"pre_logits", "stage1".."stage4"}) through forward hooks on the stage modules."""

    def __init__(self, model, model_name, num_classes, overrides):
        self.model, self.outputs = model, {}
        indices = models.create_model(model_name, num_classes, **dict(overrides)).reference_stage_indices()
        for s, module in enumerate(stage_modules(model, indices), start=1):
            module.register_forward_hook(lambda m, i, o, s=s: self.outputs.__setitem__(f"stage{s}", o))
        self.tokens_hwc = hasattr(model, "layers")       # timm 1.x Swin blocks return (B, H, W, C)

    def __call__(self, x):
        logits, pre = features(self.model, x)
        feats = {k: v.flatten(1, 2) if self.tokens_hwc else v for k, v in self.outputs.items()}
        return logits, dict(feats, pre_logits=pre)


def cross_entropy(logits, target, smoothing):
    if target.ndim == 2:    # mixup/cutmix: soft targets that already carry the smoothing (timm SoftTargetCrossEntropy)
        return torch.sum(-target * F.log_softmax(logits, -1), -1).mean()
    logp = F.log_softmax(logits, -1)     # timm LabelSmoothingCrossEntropy
    nll = -logp.gather(1, target[:, None])[:, 0]
    return ((1 - smoothing) * nll - smoothing * logp.mean(-1)).mean()


def batchnorm_buffers(module):
    """[(owning module, buffer name)] of every BatchNorm running statistic."""
    return [(sub, name) for sub in (module.modules() if module is not None else ())
            for name in ("running_mean", "running_var") if getattr(sub, name, None) is not None]


def per_group(module, run_groups):
    """Run `run_groups(start_of_group)` with `module`'s BatchNorm statistics reset to their start for each group
    (each DDP rank starts from the same statistics), then set them to the mean of the groups' results (the
    reference's distribute_bn; it runs per epoch there, the JAX side every step)."""
    buffers = batchnorm_buffers(module)
    start = [getattr(m, name).detach().clone() for m, name in buffers]
    ends = []

    def reset():
        for (m, name), s in zip(buffers, start):    # a new tensor: the last group's graph still holds its own
            setattr(m, name, s.clone())

    def record():
        ends.append([getattr(m, name) for m, name in buffers])

    out = run_groups(reset, record)
    with torch.no_grad():
        for i, (m, name) in enumerate(buffers):
            setattr(m, name, torch.stack([e[i] for e in ends]).mean(0))
    return out


@dataclasses.dataclass
class Reference:
    config: Any
    student: nn.Module
    teacher: nn.Module
    extra: Any                  # the method's nn.Module (torch_distillers), None for vanilla
    optimizer: torch.optim.Optimizer
    steps_per_epoch: int
    tap_student: Any
    tap_teacher: Any
    step_count: int = 0
    dtype: torch.dtype = torch.float32   # float64: the same step without rounding worth mentioning (the noise floor)
    notes: tuple = ()
    grads: dict = dataclasses.field(default_factory=dict)   # the last step's gradients (before clipping), by name

    def lr(self):
        return epoch_lr(self.config.optim, self.step_count // self.steps_per_epoch)

    def named_parameters(self):
        """("student.<timm name>" / "extra.<name>", parameter) over everything the optimizer trains."""
        return [(f"{prefix}.{name}", p) for prefix, m in (("student", self.student), ("extra", self.extra))
                if m is not None for name, p in m.named_parameters()]

    def parameters(self):
        return [p for _, p in self.named_parameters()]

    def step(self, batch):
        """One optimizer step on `batch`: "image" normalised NHWC or NCHW float, "target" int (B,) or soft (B, C),
        optional "index" (B,) and "negatives" (B, K) for CRD. Returns {term: float} with the terms averaged over
        groups, "loss" and "lr"."""
        c = self.config
        images = torch.tensor(np.asarray(batch["image"]), dtype=self.dtype)
        if images.shape[-1] == 3 and images.shape[1] != 3:
            images = images.permute(0, 3, 1, 2)
        images = images.contiguous()
        target = torch.tensor(np.asarray(batch["target"]))
        target = target.long() if target.ndim == 1 else target.to(self.dtype)
        extras = {k: torch.tensor(np.asarray(batch[k])) for k in ("index", "negatives") if k in batch}
        lr = self.lr()
        for group in self.optimizer.param_groups:
            group["lr"] = lr

        self.teacher.eval()
        with torch.no_grad():
            teacher_out = self.tap_teacher(images)
        self.student.train()
        if self.extra is not None:
            self.extra.train()
        size = images.shape[0]
        group_size = c.distill.group_size or size
        slices = [slice(g, g + group_size) for g in range(0, size, group_size)]
        cut = lambda out, sl: (out[0][sl], {k: v[sl] for k, v in out[1].items()})   # noqa: E731
        batches = [dict({k: v[sl] for k, v in extras.items()}, target=target[sl]) for sl in slices]
        teachers = [cut(teacher_out, sl) for sl in slices]

        def students(reset, record):
            outs = []
            for sl in slices:
                reset()
                outs.append(self.tap_student(images[sl]))
                record()
            return outs

        student_outs = per_group(self.student, students)
        terms = [{"ce": c.distill.gt_loss_weight * cross_entropy(s[0], b["target"], c.distill.label_smoothing)}
                 for s, b in zip(student_outs, batches)]
        if self.extra is not None:
            if hasattr(self.extra, "begin_step"):
                self.extra.begin_step(student_outs, teachers, batches)

            def methods(reset, record):
                outs = []
                for s, t, b in zip(student_outs, teachers, batches):
                    reset()
                    outs.append(self.extra(s, t, b))
                    record()
                return outs

            for parts, more in zip(terms, per_group(self.extra, methods)):
                parts.update(more)
            if hasattr(self.extra, "end_step"):
                self.extra.end_step()
        loss = torch.stack([sum(parts.values()) for parts in terms]).mean()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.grads = {name: None if p.grad is None else p.grad.detach().clone()
                      for name, p in self.named_parameters()}
        if c.optim.clip_grad:
            torch.nn.utils.clip_grad_norm_(self.parameters(), c.optim.clip_grad)
        self.optimizer.step()
        self.step_count += 1
        out = {k: float(torch.stack([parts[k].detach() for parts in terms]).mean()) for k in terms[0]}
        out.update(loss=float(loss.detach()), lr=lr)
        return out


def make_optimizer(config, modules):
    """timm create_optimizer_v2 on the distiller: decay iff ndim > 1 (docs/reference.md §4.3)."""
    o = config.optim
    params = [p for m in modules if m is not None for p in m.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.ndim > 1], "weight_decay": o.weight_decay},
              {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0}]
    lr = epoch_lr(o, 0)
    if o.name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=o.momentum, nesterov=True)
    if o.name == "momentum":
        return torch.optim.SGD(groups, lr=lr, momentum=o.momentum, nesterov=False)
    if o.name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=tuple(o.betas), eps=o.eps)
    raise ValueError(f"torch reference: optimizer {o.name!r} is not implemented (sgd, momentum, adamw)")


def build(config, num_classes, steps_per_epoch, num_train_examples=1, seed=0, student_state_dict=None,
          teacher_state_dict=None, dtype=torch.float32):
    """A `Reference` for `config` (its student/teacher/method/optim sections): timm models, randomly initialised
    from `seed` or loaded from the given state_dicts (strict), the method's module, the optimizer."""
    student = create_timm(config.student.model, num_classes, config.student.overrides, seed)
    teacher = create_timm(config.teacher.model, num_classes, config.teacher.overrides, seed + 1)
    for model, sd in ((student, student_state_dict), (teacher, teacher_state_dict)):
        if sd is not None:
            model.load_state_dict({k: torch.as_tensor(np.asarray(v)) for k, v in sd.items()}, strict=True)
    for p in teacher.parameters():
        p.requires_grad_(False)
    taps = [Tapped(m, section.model, num_classes, section.overrides)
            for m, section in ((student, config.student), (teacher, config.teacher))]
    method = config.distill.method
    size = config.data.image_size
    with torch.no_grad():      # example outputs: the feature shapes the method's modules are built for
        student.eval()
        teacher.eval()
        examples = [tap(torch.zeros(2, 3, size, size)) for tap in taps]
    torch.manual_seed(seed + 2)
    extra = torch_distillers.build(method, config.distill.get(method), num_classes, num_train_examples, *examples)
    for m in (student, teacher, extra):
        if m is not None:
            m.to(dtype)
    notes = [f"{method}: {torch_distillers.DIFFERENCES[method]}"] if method in torch_distillers.DIFFERENCES else []
    optimizer = make_optimizer(config, (student, extra))
    return Reference(config, student, teacher, extra, optimizer, steps_per_epoch, *taps, dtype=dtype,
                     notes=tuple(notes))
