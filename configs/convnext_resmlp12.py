"""ConvNeXt-T -> ResMLP-S12 on CIFAR-100 with RSD, the reference's cifar/vit_mlp.yaml recipe (one pair of its train.sh).

  python -m convert.from_torch convnext_tiny_cifar100.pth --out teachers/convnext
  python -m rsd_jax.data.prepare cifar100 --archive cifar-100-python.tar.gz --data_dir data
  python -m rsd_jax.main --config configs/convnext_resmlp12.py --workdir workdirs/convnext_resmlp12 \\
      --config.teacher.path=teachers/convnext --config.data.data_dir=data
  python -m rsd_jax.main --config configs/convnext_resmlp12.py:smoke --workdir /tmp/convnext_resmlp12_smoke   # tiny, CPU, CI
"""
from configs.presets import pair_config_module

get_config = pair_config_module("convnext_tiny", "resmlp_12_224")
