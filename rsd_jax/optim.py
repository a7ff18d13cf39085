"""Optimizers and LR schedules with the reference's semantics (docs/reference.md §4.3, §4.4).

* `sgd` is SGD with Nesterov momentum and L2 weight decay added to the gradient (torch.optim.SGD), `adamw` is
  decoupled AdamW (torch.optim.AdamW), `lamb` is timm's Lamb (the reference's imagenet/stronger.yaml).
  Gradients are clipped by global norm before any of them, as timm does.
* Weight decay applies to parameters with more than one dimension, and to nothing else: the reference builds its
  optimizer on the distiller, which has no `no_weight_decay()`, so cls_token, pos_embed and Swin's relative position
  tables are decayed, while biases, norms and layer scales are not.
* The LR is constant within an epoch (timm steps its scheduler per epoch): linear warmup from `warmup_lr`, then
  cosine from `lr` to `min_lr` counted from epoch 0, or a step decay.
"""
import jax
import jax.numpy as jnp
import optax

from rsd_jax.errors import UserError


def epoch_lr(config, epoch):
    """LR of epoch `epoch` (a float or traced value), timm's CosineLRScheduler/StepLRScheduler formulas."""
    epoch = jnp.asarray(epoch, jnp.float32)
    warm = config.warmup_lr + epoch * (config.lr - config.warmup_lr) / max(config.warmup_epochs, 1)
    if config.schedule == "cosine":
        main = config.min_lr + 0.5 * (config.lr - config.min_lr) * (1 + jnp.cos(jnp.pi * epoch / config.epochs))
    elif config.schedule == "step":
        main = config.lr * config.decay_rate ** jnp.floor(epoch / config.decay_epochs)
    elif config.schedule == "constant":
        main = jnp.asarray(config.lr, jnp.float32)
    else:
        raise UserError(f"unknown schedule {config.schedule!r}; known: cosine, step, constant")
    return jnp.where(epoch < config.warmup_epochs, warm, main)


def schedule(config, steps_per_epoch):
    return lambda step: epoch_lr(config, step // steps_per_epoch)


def decay_mask(params):
    return jax.tree_util.tree_map(lambda p: p.ndim > 1, params)


def create(config, steps_per_epoch):
    """The optax transformation for `config` (the `optim` section)."""
    lr = schedule(config, steps_per_epoch)
    parts = [optax.clip_by_global_norm(config.clip_grad)] if config.clip_grad else []
    if config.name == "sgd":
        parts += [optax.add_decayed_weights(config.weight_decay, mask=decay_mask),
                  optax.sgd(lr, momentum=config.momentum, nesterov=True)]
    elif config.name == "momentum":
        parts += [optax.add_decayed_weights(config.weight_decay, mask=decay_mask),
                  optax.sgd(lr, momentum=config.momentum, nesterov=False)]
    elif config.name == "adamw":
        parts += [optax.adamw(lr, b1=config.betas[0], b2=config.betas[1], eps=config.eps,
                              weight_decay=config.weight_decay, mask=decay_mask)]
    elif config.name == "lamb":
        # timm's Lamb, the reference's: Adam moments, decoupled decay, then the layer-wise trust ratio
        # ||p|| / ||update||, which timm applies only where the weight decay is not 0 (optax's lamb applies it to
        # every parameter). timm's built-in clip of the global gradient norm at 1 is `clip_grad` here.
        adapt = (lambda params: jax.tree_util.tree_map(lambda _: False, params)) if not config.weight_decay \
            else decay_mask
        parts += [optax.scale_by_adam(b1=config.betas[0], b2=config.betas[1], eps=config.eps),
                  optax.add_decayed_weights(config.weight_decay, mask=decay_mask),
                  optax.masked(optax.scale_by_trust_ratio(), adapt),
                  optax.scale_by_learning_rate(lr)]
    else:
        raise UserError(f"unknown optimizer {config.name!r}; known: sgd (Nesterov), momentum, adamw, lamb")
    return optax.chain(*parts)
