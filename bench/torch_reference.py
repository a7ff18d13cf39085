"""The reference's distillation step re-stated in PyTorch + timm, from RSD_SPEC (§1.1-1.4, §2, §4.3-4.5).

A plain eager implementation: the fidelity check (`python -m rsd_jax.step_check`) compares rsd_jax's jitted step
against it, and the speed benchmark uses it as the PyTorch baseline.

    ref = build(config, num_classes, steps_per_epoch)      # also unpacks: student, teacher, projector, optimizer
    losses = ref.step({"image": images, "target": targets})   # one optimizer step

* The teacher runs in eval mode under no_grad on the student's (already augmented and normalised) batch.
* The student and the projector run in train mode. The global batch is cut into `distill.group_size` groups (the
  reference's DDP ranks): each group's BatchNorm and RSD statistics come from its own examples, the loss is the mean
  of the per-group losses (DDP averages the ranks' gradients), and BatchNorm running statistics are averaged over
  groups after the step (the reference's distribute_bn; it runs per epoch there, the JAX side every step).
* RSD: L = CE(label smoothing) + loss_weight * [sum_i (C_ii - 1)^2 + kappa sum_{i!=j} C_ij^2] on the pre-logits.
  KD: L = CE + loss_weight * T^2 * KL(p_t || p_s), batchmean. Soft (B, C) targets (mixup/cutmix) use soft-target CE.
* Optimizer: SGD with Nesterov momentum (timm's `sgd`) or AdamW; weight decay iff ndim > 1 over student and
  projector parameters (the optimizer is built on the distiller, which has no no_weight_decay()); gradient-norm
  clipping when configured; the LR constant within an epoch (timm's per-epoch cosine with linear warmup).
* Deliberate difference kept from rsd_jax (RSD_SPEC §7.2): the CE term of RSD is multiplied by gt_loss_weight,
  which the reference ignores for RSD (equal at the default 1). `ref.notes` lists such notes.
"""
import dataclasses
import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from convert import verify


def epoch_lr(optim, epoch):
    """timm's CosineLRScheduler / StepLRScheduler value for `epoch` (RSD_SPEC §4.4), written from the formula."""
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
    import timm
    torch.manual_seed(seed)
    return timm.create_model(model_name, num_classes=num_classes, **verify.timm_kwargs(model_name, dict(overrides)))


def features(model, x):
    """(logits, pre-logits) of a timm model: the classifier's input and its output."""
    trunk = model.forward_features(x)
    pre = model.forward_head(trunk, pre_logits=True)
    return model.get_classifier()(pre), pre


def make_projector(d_student, d_teacher, gamma):
    """RSD_SPEC §1.3: Linear(d_s, gamma d_s, no bias) -> BatchNorm1d -> exact GELU -> Linear(., d_t, no bias),
    Linears trunc-normal(0.02)."""
    projector = nn.Sequential(nn.Linear(d_student, gamma * d_student, bias=False), nn.BatchNorm1d(gamma * d_student),
                              nn.GELU(), nn.Linear(gamma * d_student, d_teacher, bias=False))
    for m in projector:
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02, a=-2.0, b=2.0)
    return projector


def standardize(x, eps=1e-5):
    return (x - x.mean(0, keepdim=True)) / (x.std(0, unbiased=False, keepdim=True) + eps)


def rsd_loss(student, teacher, kappa):
    """RSD_SPEC §1.1 on one group's (B, D) features."""
    c = standardize(teacher).T @ standardize(student) / student.shape[0]
    eye = torch.eye(c.shape[0], dtype=c.dtype)
    cost = (c - eye) ** 2
    return (cost * eye).sum() + kappa * (cost * (1 - eye)).sum()


def kd_loss(student_logits, teacher_logits, temperature):
    t = temperature
    return F.kl_div(F.log_softmax(student_logits / t, -1), F.log_softmax(teacher_logits / t, -1),
                    reduction="batchmean", log_target=True) * t * t


def cross_entropy(logits, target, smoothing):
    if target.ndim == 2:    # mixup/cutmix: soft targets that already carry the smoothing (timm SoftTargetCrossEntropy)
        return torch.sum(-target * F.log_softmax(logits, -1), -1).mean()
    logp = F.log_softmax(logits, -1)     # timm LabelSmoothingCrossEntropy
    nll = -logp.gather(1, target[:, None])[:, 0]
    return ((1 - smoothing) * nll - smoothing * logp.mean(-1)).mean()


def batchnorm_buffers(*modules):
    """[(owning module, buffer name)] of every BatchNorm running statistic."""
    return [(sub, name) for m in modules if m is not None for sub in m.modules()
            for name in ("running_mean", "running_var") if getattr(sub, name, None) is not None]


@dataclasses.dataclass
class Reference:
    config: Any
    student: nn.Module
    teacher: nn.Module
    projector: Any              # nn.Module for RSD, None otherwise
    optimizer: torch.optim.Optimizer
    steps_per_epoch: int
    step_count: int = 0
    notes: tuple = ()
    grads: dict = dataclasses.field(default_factory=dict)   # the last step's gradients (before clipping), by name

    def __iter__(self):
        return iter((self.student, self.teacher, self.projector, self.optimizer))

    def lr(self):
        return epoch_lr(self.config.optim, self.step_count // self.steps_per_epoch)

    def named_parameters(self):
        """("student.<timm name>" / "projector.<index>.<name>", parameter) over everything the optimizer trains."""
        return [(f"{prefix}.{name}", p) for prefix, m in (("student", self.student), ("projector", self.projector))
                if m is not None for name, p in m.named_parameters()]

    def parameters(self):
        return [p for m in (self.student, self.projector) if m is not None for p in m.parameters()]

    def step(self, batch):
        """One optimizer step on `batch`: "image" normalised NHWC or NCHW float, "target" int (B,) or soft (B, C).
        Returns {term: float} with the terms averaged over groups, "loss" and "lr"."""
        c = self.config
        images = torch.tensor(np.asarray(batch["image"]), dtype=torch.float32)
        if images.shape[-1] == 3 and images.shape[1] != 3:
            images = images.permute(0, 3, 1, 2)
        images = images.contiguous()
        target = torch.tensor(np.asarray(batch["target"]))
        if target.ndim == 1:
            target = target.long()
        lr = self.lr()
        for group in self.optimizer.param_groups:
            group["lr"] = lr

        self.teacher.eval()
        with torch.no_grad():
            teacher_logits, teacher_pre = features(self.teacher, images)
        self.student.train()
        if self.projector is not None:
            self.projector.train()
        method, size = c.distill.method, images.shape[0]
        group_size = c.distill.group_size or size
        buffers = batchnorm_buffers(self.student, self.projector)
        start = [getattr(m, name).detach().clone() for m, name in buffers]
        ends, totals, terms = [], [], {}
        for g0 in range(0, size, group_size):
            for (m, name), s in zip(buffers, start):   # each rank starts from the same statistics
                setattr(m, name, s.clone())           # a new tensor: the last group's graph still holds its own
            sl = slice(g0, g0 + group_size)
            logits, pre = features(self.student, images[sl])
            parts = {"ce": c.distill.gt_loss_weight * cross_entropy(logits, target[sl], c.distill.label_smoothing)}
            if method == "rsd":
                m = c.distill.rsd
                parts["rsd"] = m.loss_weight * rsd_loss(self.projector(pre), teacher_pre[sl], m.kappa)
            elif method == "kd":
                m = c.distill.kd
                parts["kd"] = m.loss_weight * kd_loss(logits, teacher_logits[sl], m.temperature)
            elif method != "vanilla":
                raise ValueError(f"torch reference: method {method!r} is not implemented (rsd, kd, vanilla)")
            totals.append(sum(parts.values()))
            for k, v in parts.items():
                terms.setdefault(k, []).append(v.detach())
            ends.append([getattr(m, name) for m, name in buffers])
        loss = torch.stack(totals).mean()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.grads = {name: None if p.grad is None else p.grad.detach().clone()
                      for name, p in self.named_parameters()}
        if c.optim.clip_grad:
            torch.nn.utils.clip_grad_norm_(self.parameters(), c.optim.clip_grad)
        self.optimizer.step()
        with torch.no_grad():     # distribute_bn: the mean of the ranks' running statistics
            for i, (m, name) in enumerate(buffers):
                setattr(m, name, torch.stack([e[i] for e in ends]).mean(0))
        self.step_count += 1
        out = {k: float(torch.stack(v).mean()) for k, v in terms.items()}
        out.update(loss=float(loss.detach()), lr=lr)
        return out


def make_optimizer(config, modules):
    """timm create_optimizer_v2 on the distiller: decay iff ndim > 1 (RSD_SPEC §4.3)."""
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


def build(config, num_classes, steps_per_epoch, seed=0, student_state_dict=None, teacher_state_dict=None):
    """A `Reference` for `config` (its student/teacher/method/optim sections): timm models, randomly initialised
    from `seed` or loaded from the given state_dicts (strict), the RSD projector, the optimizer."""
    student = create_timm(config.student.model, num_classes, config.student.overrides, seed)
    teacher = create_timm(config.teacher.model, num_classes, config.teacher.overrides, seed + 1)
    for model, sd in ((student, student_state_dict), (teacher, teacher_state_dict)):
        if sd is not None:
            model.load_state_dict({k: torch.as_tensor(np.asarray(v)) for k, v in sd.items()}, strict=True)
    for p in teacher.parameters():
        p.requires_grad_(False)
    projector, notes = None, []
    if config.distill.method == "rsd":
        torch.manual_seed(seed + 2)
        projector = make_projector(student.num_features, teacher.num_features, config.distill.rsd.gamma)
        if config.distill.gt_loss_weight != 1.0:
            notes.append("RSD: CE weighted by gt_loss_weight (the reference ignores it, RSD_SPEC §7.2)")
    optimizer = make_optimizer(config, (student, projector))
    return Reference(config, student, teacher, projector, optimizer, steps_per_epoch, notes=tuple(notes))
