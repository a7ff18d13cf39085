"""rsd_jax: cross-architecture knowledge distillation (RSD and baselines) in JAX/Flax."""
