"""FitNet (Romero et al., 2015), cross-architecture as in the RSD reference (docs/reference.md §2.2): per stage, an aligner
maps the student's stage output onto the teacher's, L = loss_weight * scale * sum_stages MSE(aligned, target).

Stage outputs are compared on their patch grids: maps (B, H, W, C) as they are, tokens (B, L, C) without their
prefix tokens (L - floor(sqrt L)^2, in front) as a (B, g, g, C) grid. With student grid h_s and teacher grid h_t:
* h_s == h_t: a 1x1 conv (map student) or a Linear (token student) to C_t;
* h_s > h_t, r = h_s / h_t: a map student gets a conv with kernel = stride = r (timm's PatchEmbed); a token student
  is merged r x r (concatenation) and then goes through a Linear (token teacher) or a 1x1 conv (map teacher);
* h_s < h_t, r = h_t / h_s: the student goes to r^2 C_t (1x1 conv or Linear) and is compared with the teacher
  merged r x r. The reference unpatchifies the student instead for token students; the MSE is the same (a mean
  over the same elements in another order).
Init as the reference's init_weights: conv kaiming normal (fan_out) with torch's default bias, Linear
trunc_normal(0.02) with a zero bias.

Differences from the reference: the hard-coded x0.1 of the RSD code base is the visible `scale` (default 0.1, so
the default loss is the reference's); prefix tokens are found from the token count (the reference's `num_tokens`
attribute is missing on timm 0.6.5 ViTs and FitNet fails there, docs/reference.md §7.5); CNN->CNN pairs with different grids
(not handled by the reference) use the same rules as the other pairs.
"""
import flax.linen as nn
import jax.numpy as jnp
import ml_collections

from rsd_jax.distillers.base import Method
from rsd_jax.distillers.ofa import BiasedConv, Dense, space_to_depth, split_prefix


def default_config():
    return ml_collections.ConfigDict(dict(loss_weight=1.0, scale=0.1, stages=(1, 2, 3, 4)))


def as_grid(x):
    """A stage output as a (B, g, g, C) patch grid: maps unchanged, tokens without prefix tokens."""
    return x if x.ndim == 4 else split_prefix(x)[1]


def fitnet_loss(aligned, targets, *, scale=0.1):
    """scale * sum over stages of the mean squared error; `aligned`, `targets`: sequences of equal-shape arrays."""
    return scale * sum(jnp.mean(jnp.square(a.astype(jnp.float32) - t.astype(jnp.float32)))
                       for a, t in zip(aligned, targets))


class Aligner(nn.Module):
    """Student stage output -> (prediction, target) on a common (B, h, h, C') grid."""

    @nn.compact
    def __call__(self, student, teacher):
        cnn_student = student.ndim == 4
        s, t = as_grid(student), as_grid(teacher)
        hs, ht, ct = s.shape[1], t.shape[1], t.shape[-1]
        project = (lambda n, k=1: BiasedConv(n, (k, k), s.shape[-1], strides=k, padding="VALID", name="proj")) \
            if cnn_student else (lambda n, k=1: Dense(n, name="proj"))
        if hs == ht:
            return project(ct)(s), t
        if hs > ht:
            if hs % ht:
                raise ValueError(f"FitNet: student grid {hs} is not a multiple of teacher grid {ht}")
            r = hs // ht
            if cnn_student:
                return project(ct, r)(s), t
            merged = space_to_depth(s, r)
            if teacher.ndim == 4:
                return BiasedConv(ct, (1, 1), merged.shape[-1], name="proj")(merged), t
            return project(ct)(merged), t
        if ht % hs:
            raise ValueError(f"FitNet: teacher grid {ht} is not a multiple of student grid {hs}")
        r = ht // hs
        return project(r * r * ct)(s), space_to_depth(t, r)


class FitNet(Method):
    config: ml_collections.ConfigDict
    context: object

    @nn.compact
    def __call__(self, student_out, teacher_out, batch, train: bool):
        c = self.config
        pairs = [Aligner(name=f"stage{s}")(student_out[1][f"stage{s}"], teacher_out[1][f"stage{s}"])
                 for s in c.stages]
        return {"fitnet": c.loss_weight * fitnet_loss([p for p, _ in pairs], [t for _, t in pairs], scale=c.scale)}
