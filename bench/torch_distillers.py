"""The distillers of docs/reference.md §1-2 re-stated in PyTorch: the other side of `python -m rsd_jax.step_check`.

Written from the spec's formulas, not from either code base. Each method is an nn.Module built by
`build(method, section, num_classes, num_train_examples, student_example, teacher_example)` (the examples give the
feature shapes) whose `forward(student, teacher, batch)` returns {term: weighted loss} for ONE statistics group (one
DDP rank of the reference):
  student, teacher: (logits, {"pre_logits": (B, D), "stage1".."stage4": maps (B, C, H, W) or tokens (B, L, C)})
  batch: "target" (B,) int or (B, C) soft, "index" (B,) dataset indices, "negatives" (B, K) CRD contrast indices.
A method that needs the whole global batch (CRD: its normaliser Z and its memory update) also has
`begin_step(students, teachers, batches)` and `end_step()`, called around the groups.

Module and parameter names are rsd_jax's Flax names under convert.core's rule (`blocks_0` <-> `blocks.0`), so one
generic mapping moves their state both ways. Where rsd_jax deliberately departs from the reference (docs/reference.md §7), this
follows rsd_jax and `DIFFERENCES[method]` says how.
"""
import functools
import math

import torch
import torch.nn.functional as F
from torch import nn

DIFFERENCES = {
    "rsd": "only the pre-logit stage (docs/reference.md §7.1); CE x gt_loss_weight (the reference ignores it, §7.2)",
    "dkd": "alpha, beta, temperature read from the config (the reference crashes on missing attributes, §7.4)",
    "ofa": "log_softmax instead of log(softmax); prefix tokens counted from the token grid (§7.5, §7.17); "
           "the branch ViT blocks use LayerNorm eps 1e-6",
    "fitnet": "prefix tokens counted from the token grid (§7.5); patch merges concatenate (row, column, channel)",
    "rkd": "distances from the differences of the features, not the |a|^2 + |b|^2 - 2ab expansion (cancels in "
           "float32 for close features); coincident embeddings pass no angle gradient (F.normalize's eps makes it "
           "1e12 x the error)",
    "crd": "Z fixed from the mean over the whole first global batch, and every group's examples update the memory "
           "(under DDP each rank would fix its own Z and rank 0's buffers win)",
}


# ------------------------------------------------------------------------------------------------ losses
def standardize(x, eps=1e-5):
    return (x - x.mean(0, keepdim=True)) / (x.std(0, unbiased=False, keepdim=True) + eps)


def rsd_loss(student, teacher, kappa):
    """docs/reference.md §1.1 on one group's (B, D) features."""
    c = standardize(teacher).T @ standardize(student) / student.shape[0]
    eye = torch.eye(c.shape[0], dtype=c.dtype, device=c.device)
    cost = (c - eye) ** 2
    return (cost * eye).sum() + kappa * (cost * (1 - eye)).sum()


def kd_loss(student_logits, teacher_logits, temperature):
    t = temperature
    return F.kl_div(F.log_softmax(student_logits / t, -1), F.log_softmax(teacher_logits / t, -1),
                    reduction="batchmean", log_target=True) * t * t


def hard_target(target, logits):
    """One-hot (in the logits' dtype) of the integer target, or of the argmax of soft (mixup) targets."""
    index = target.argmax(-1) if target.ndim == 2 else target
    return F.one_hot(index.long(), logits.shape[-1]).to(logits.dtype)


def dkd_loss(zs, zt, target, alpha, beta, temperature):
    t = temperature
    gt = hard_target(target, zs)
    ps, pt = F.softmax(zs / t, -1), F.softmax(zt / t, -1)
    binary = lambda p: torch.stack([(p * gt).sum(-1), (p * (1 - gt)).sum(-1)], -1)   # noqa: E731
    tckd = F.kl_div(torch.log(binary(ps)), binary(pt), reduction="batchmean")
    nckd = F.kl_div(F.log_softmax(zs / t - 1000 * gt, -1), F.softmax(zt / t - 1000 * gt, -1), reduction="batchmean")
    return (alpha * tckd + beta * nckd) * t * t


def pearson(a, b, eps=1e-8):
    """Per-row Pearson correlation: cosine of the centred rows, eps added to the product of norms."""
    a, b = a - a.mean(1, keepdim=True), b - b.mean(1, keepdim=True)
    return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1) + eps)


def dist_loss(zs, zt, beta, gamma, tau):
    ps, pt = F.softmax(zs / tau, -1), F.softmax(zt / tau, -1)
    return tau * tau * (beta * (1 - pearson(ps, pt).mean()) + gamma * (1 - pearson(ps.T, pt.T).mean()))


def rkd_distances(e, squared, eps):
    d = ((e[:, None, :] - e[None, :, :]) ** 2).sum(-1).clamp(min=eps)     # as rsd_jax: differences, not the expansion
    d = d if squared else d.sqrt()
    d = d.clone()
    d[range(len(e)), range(len(e))] = 0
    return d / d[d > 0].mean()


def rkd_angles(e):
    diff = e[None, :, :] - e[:, None, :]
    sq = (diff * diff).sum(2, keepdim=True)      # as rsd_jax: a zero difference is 0 with no gradient
    diff = torch.where(sq > 0, diff / sq.clamp_min(1e-30).sqrt(), torch.zeros_like(diff))
    return torch.bmm(diff, diff.transpose(1, 2)).reshape(-1)


def rkd_loss(fs, ft, distance_weight, angle_weight, eps, squared):
    fs, ft = fs.flatten(1), ft.flatten(1)
    with torch.no_grad():
        dt, at = rkd_distances(ft, squared, eps), rkd_angles(ft)
    return (distance_weight * F.smooth_l1_loss(rkd_distances(fs, squared, eps), dt)
            + angle_weight * F.smooth_l1_loss(rkd_angles(fs), at))


def ofa_loss(zs, zt, target, eps, temperature):
    pt = F.softmax(zt / temperature, -1)
    m = hard_target(target, zs)
    return (-((pt + m) ** eps - m) * F.log_softmax(zs / temperature, -1)).sum(-1).mean()


def nce(x, num_data, eps=1e-7):
    """CRD's NCE loss of (B, K + 1) positive-first scores, noise distribution uniform over the data."""
    noise = (x.shape[1] - 1) / num_data
    log_d1 = torch.log(x[:, 0] / (x[:, 0] + noise + eps))
    log_d0 = torch.log(noise / (x[:, 1:] + noise + eps))
    return -(log_d1.sum() + log_d0.sum()) / x.shape[0]


# ------------------------------------------------------------------------------------------------ feature grids
def prefix_count(tokens):
    return tokens.shape[1] - math.isqrt(tokens.shape[1]) ** 2


def as_nchw_grid(x):
    """A stage output as an NCHW patch grid: maps as they are, tokens without their prefix tokens."""
    if x.ndim == 4:
        return x
    g = math.isqrt(x.shape[1])
    return x[:, prefix_count(x):].reshape(x.shape[0], g, g, x.shape[2]).permute(0, 3, 1, 2)


def merge_nchw(x, r):
    """Each r x r block of an NCHW grid concatenated on channels in (row, column, channel) order."""
    b, c, h, w = x.shape
    x = x.permute(0, 2, 3, 1).reshape(b, h // r, r, w // r, r, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(b, h // r, w // r, r * r * c).permute(0, 3, 1, 2)


def linear_nchw(layer, x):
    return layer(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


# ------------------------------------------------------------------------------------------------ modules
class Projector(nn.Module):
    """docs/reference.md §1.3: Linear(d_s, gamma d_s, no bias) -> BatchNorm1d -> exact GELU -> Linear(., d_t, no bias),
    Linears trunc-normal(0.02)."""

    def __init__(self, d_student, d_teacher, gamma):
        super().__init__()
        self.fc1 = nn.Linear(d_student, gamma * d_student, bias=False)
        self.bn = nn.BatchNorm1d(gamma * d_student)
        self.fc2 = nn.Linear(gamma * d_student, d_teacher, bias=False)
        for fc in (self.fc1, self.fc2):
            nn.init.trunc_normal_(fc.weight, std=0.02)

    def forward(self, x):
        return self.fc2(F.gelu(self.bn(self.fc1(x))))


class RSD(nn.Module):
    def __init__(self, c, student, teacher, **_):
        super().__init__()
        self.c = c
        self.projector = Projector(student[1]["pre_logits"].shape[-1], teacher[1]["pre_logits"].shape[-1], c.gamma)

    def forward(self, student, teacher, batch):
        projected = self.projector(student[1]["pre_logits"])
        return {"rsd": self.c.loss_weight * rsd_loss(projected, teacher[1]["pre_logits"], self.c.kappa)}


class Logits(nn.Module):
    """KD, DKD, DIST: losses of the two models' logits, no parameters."""

    def __init__(self, c, method, **_):
        super().__init__()
        self.c, self.method = c, method

    def forward(self, student, teacher, batch):
        c, zs, zt = self.c, student[0], teacher[0]
        if self.method == "kd":
            loss = kd_loss(zs, zt, c.temperature)
        elif self.method == "dkd":
            loss = dkd_loss(zs, zt, batch["target"], c.alpha, c.beta, c.temperature)
        else:
            loss = dist_loss(zs, zt, c.beta, c.gamma, c.tau)
        return {self.method: c.loss_weight * loss}


class RKD(nn.Module):
    def __init__(self, c, **_):
        super().__init__()
        self.c = c

    def forward(self, student, teacher, batch):
        c = self.c
        return {"rkd": c.loss_weight * rkd_loss(student[1][c.feature], teacher[1][c.feature], c.distance_weight,
                                                c.angle_weight, c.eps, c.squared)}


class Correlation(nn.Module):
    def __init__(self, c, student, teacher, **_):
        super().__init__()
        self.c = c
        self.embed_s = nn.Linear(student[1][c.feature][0].numel(), c.feat_dim)
        self.embed_t = nn.Linear(teacher[1][c.feature][0].numel(), c.feat_dim)

    def forward(self, student, teacher, batch):
        c = self.c
        delta = (self.embed_s(student[1][c.feature].flatten(1)) - self.embed_t(teacher[1][c.feature].flatten(1))).abs()
        return {"correlation": c.loss_weight * c.scale * (delta[:-1] * delta[1:]).sum(1).mean()}


class CRD(nn.Module):
    """Embeddings of both models, two memory banks (buffers `student`, `teacher`), the normaliser Z of the first
    step (`z`, `z_set`); negatives come with the batch (the reference's dataset draws them)."""

    def __init__(self, c, student, teacher, num_train_examples, **_):
        super().__init__()
        self.c, self.n = c, num_train_examples
        self.embed_s = nn.Linear(student[1][c.feature][0].numel(), c.feat_dim)
        self.embed_t = nn.Linear(teacher[1][c.feature][0].numel(), c.feat_dim)
        stdv = 1 / math.sqrt(c.feat_dim / 3)
        for name in ("student", "teacher"):
            self.register_buffer(name, torch.rand(self.n, c.feat_dim) * 2 * stdv - stdv)
        self.register_buffer("z", torch.zeros(2))
        self.register_buffer("z_set", torch.zeros((), dtype=torch.bool))
        self._pending = []

    def embed(self, student, teacher):
        f = lambda out: out[1][self.c.feature].flatten(1)   # noqa: E731
        return F.normalize(self.embed_s(f(student)), dim=1, eps=0), F.normalize(self.embed_t(f(teacher)), dim=1, eps=0)

    def scores(self, vs, vt, batch):
        idx = torch.cat([batch["index"][:, None], batch["negatives"]], 1).long()
        out_s = torch.exp(torch.einsum("bkd,bd->bk", self.teacher[idx], vs) / self.c.temperature)
        out_t = torch.exp(torch.einsum("bkd,bd->bk", self.student[idx], vt) / self.c.temperature)
        return out_s, out_t

    @torch.no_grad()
    def begin_step(self, students, teachers, batches):
        if not self.z_set:
            means = [torch.stack([o.mean() for o in self.scores(*self.embed(s, t), b)])
                     for s, t, b in zip(students, teachers, batches)]
            self.z.copy_(torch.stack(means).mean(0) * self.n)

    def forward(self, student, teacher, batch):
        vs, vt = self.embed(student, teacher)
        out_s, out_t = self.scores(vs, vt, batch)
        self._pending.append((batch["index"].long(), vs.detach(), vt.detach()))
        return {"crd": self.c.loss_weight * (nce(out_s / self.z[0], self.n) + nce(out_t / self.z[1], self.n))}

    @torch.no_grad()
    def end_step(self):
        index, vs, vt = (torch.cat(x) for x in zip(*self._pending))
        self._pending = []
        m = self.c.momentum
        for bank, v in ((self.student, vs), (self.teacher, vt)):
            bank[index] = F.normalize(bank[index] * m + v * (1 - m), dim=1, eps=0)
        self.z_set.fill_(True)


class FitNetAligner(nn.Module):
    """Student stage -> (prediction, target) NCHW grids of one shape (docs/reference.md §2.2; rules in fitnet.py)."""

    def __init__(self, student_shape, teacher_shape):
        super().__init__()
        self.cnn_student = len(student_shape) == 3
        hs, cs = self.grid(student_shape)
        ht, ct = self.grid(teacher_shape)
        self.r, self.mode = max(hs, ht) // min(hs, ht), ("same" if hs == ht else "down" if hs > ht else "up")
        r2 = self.r * self.r
        if self.mode == "same":
            self.proj = nn.Conv2d(cs, ct, 1) if self.cnn_student else nn.Linear(cs, ct)
        elif self.mode == "down" and self.cnn_student:
            self.proj = nn.Conv2d(cs, ct, self.r, stride=self.r)
        elif self.mode == "down":
            self.proj = nn.Conv2d(r2 * cs, ct, 1) if len(teacher_shape) == 3 else nn.Linear(r2 * cs, ct)
        else:
            self.proj = nn.Conv2d(cs, r2 * ct, 1) if self.cnn_student else nn.Linear(cs, r2 * ct)

    @staticmethod
    def grid(shape):
        """(grid side, channels) of a (C, H, W) map or (L, C) tokens."""
        return (shape[1], shape[0]) if len(shape) == 3 else (math.isqrt(shape[0]), shape[1])

    def forward(self, s, t):
        s, t = as_nchw_grid(s), as_nchw_grid(t)
        if self.mode == "down" and not self.cnn_student:
            s = merge_nchw(s, self.r)
        if self.mode == "up":
            t = merge_nchw(t, self.r)
        pred = self.proj(s) if isinstance(self.proj, nn.Conv2d) else linear_nchw(self.proj, s)
        return pred, t


class FitNet(nn.Module):
    def __init__(self, c, student, teacher, **_):
        super().__init__()
        self.c = c
        for s in c.stages:
            setattr(self, f"stage{s}", FitNetAligner(student[1][f"stage{s}"].shape[1:],
                                                     teacher[1][f"stage{s}"].shape[1:]))

    def forward(self, student, teacher, batch):
        pairs = [getattr(self, f"stage{s}")(student[1][f"stage{s}"], teacher[1][f"stage{s}"]) for s in self.c.stages]
        return {"fitnet": self.c.loss_weight * self.c.scale * sum(F.mse_loss(p, t) for p, t in pairs)}


class SepConv(nn.Module):
    def __init__(self, cin, out):
        super().__init__()
        self.dw1 = nn.Conv2d(cin, cin, 3, 2, 1, groups=cin, bias=False)
        self.pw1 = nn.Conv2d(cin, cin, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cin)
        self.dw2 = nn.Conv2d(cin, cin, 3, 1, 1, groups=cin, bias=False)
        self.pw2 = nn.Conv2d(cin, out, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out)

    def forward(self, x):
        x = F.relu(self.bn1(self.pw1(self.dw1(x))))
        return F.relu(self.bn2(self.pw2(self.dw2(x))))


class OFACNNBranch(nn.Module):
    def __init__(self, stage, cin, width, num_classes):
        super().__init__()
        self.stage = stage
        if stage < 4:
            n = 4 - stage
            for i in range(n):
                out = width if i == n - 1 else 2 * cin
                setattr(self, f"sepconv{i}", SepConv(cin, out))
                cin = out
        else:
            self.conv = nn.Conv2d(cin, width, 1)
        self.head = nn.Linear(width, num_classes)

    def forward(self, x):
        if self.stage < 4:
            for i in range(4 - self.stage):
                x = getattr(self, f"sepconv{i}")(x)
        else:
            x = self.conv(x)
        return self.head(x.mean((2, 3)))


class PatchMerge(nn.Module):
    def __init__(self, cin, out, act):
        super().__init__()
        self.norm = nn.LayerNorm(4 * cin)
        self.reduction = nn.Linear(4 * cin, out, bias=False)
        self.act = act

    def forward(self, x):     # (B, H, W, C)
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], -1)
        x = self.reduction(self.norm(x))
        return F.gelu(x) if self.act else x


class OFATokenBranch(nn.Module):
    def __init__(self, stage, shape, dim, num_classes):
        from timm.models.vision_transformer import Block
        super().__init__()
        length, cin = shape
        g = math.isqrt(length)
        self.merges = max(math.floor(math.log2(g / 7)), 0)
        for i in range(self.merges):
            setattr(self, f"merge{i}", PatchMerge(cin, dim, act=(i == 0 or i != self.merges - 1)))
            cin = dim
        # the reference's timm 0.6.5 Block(dim, num_heads=4): no qkv bias, torch's LayerNorm (timm 1.x's Block
        # defaults to its own LayerNorm, eps 1e-6)
        self.blocks = nn.ModuleList([Block(dim, num_heads=4, norm_layer=nn.LayerNorm)
                                     for _ in range(max(4 - stage, 1))])
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x):
        p, g = prefix_count(x), math.isqrt(x.shape[1])
        prefix, grid = x[:, :p], x[:, p:].reshape(x.shape[0], g, g, x.shape[2])
        for i in range(self.merges):
            grid = getattr(self, f"merge{i}")(grid)
        tokens = torch.cat([prefix, grid.flatten(1, 2)], 1)
        for block in self.blocks:
            tokens = block(tokens)
        return self.head(tokens[:, 0] if p else tokens.mean(1))


class OFA(nn.Module):
    def __init__(self, c, student, teacher, num_classes, **_):
        super().__init__()
        self.c = c
        d_s, d_t = student[1]["pre_logits"].shape[-1], teacher[1]["pre_logits"].shape[-1]
        eps = tuple(c.eps)
        self.eps = eps * (len(c.stages) + 1) if len(eps) == 1 else eps
        for s in c.stages:
            shape = tuple(student[1][f"stage{s}"].shape[1:])
            branch = OFACNNBranch(s, shape[0], max(d_s, d_t), num_classes) if len(shape) == 3 else \
                OFATokenBranch(s, shape, d_s, num_classes)
            setattr(self, f"stage{s}", branch)

    def forward(self, student, teacher, batch):
        c, zt, target = self.c, teacher[0], batch["target"]
        branches = sum(ofa_loss(getattr(self, f"stage{s}")(student[1][f"stage{s}"]), zt, target, e, c.temperature)
                       for s, e in zip(c.stages, self.eps))
        return {"kd": c.kd_loss_weight * ofa_loss(student[0], zt, target, self.eps[-1], c.temperature),
                "ofa": c.loss_weight * branches}


_MODULES = {"rsd": RSD, "kd": functools.partial(Logits, method="kd"), "dkd": functools.partial(Logits, method="dkd"),
            "dist": functools.partial(Logits, method="dist"), "rkd": RKD, "correlation": Correlation, "crd": CRD,
            "fitnet": FitNet, "ofa": OFA}


def build(method, section, num_classes, num_train_examples, student_example, teacher_example):
    """The method's torch module (None for vanilla), randomly initialised (the check loads rsd_jax's init)."""
    if method == "vanilla":
        return None
    if method not in _MODULES:
        raise ValueError(f"torch reference: unknown method {method!r}")
    return _MODULES[method](section, student=student_example, teacher=teacher_example, num_classes=num_classes,
                            num_train_examples=num_train_examples)
