"""Reference PyTorch implementations used to check and time rsd_jax (needs torch and timm; never imported by
rsd_jax itself)."""
