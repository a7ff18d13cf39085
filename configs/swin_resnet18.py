"""Swin-T -> ResNet18 on CIFAR-100 with RSD, the reference's cifar/cnn.yaml recipe (one pair of its train.sh).

  python -m convert.from_torch swin_tiny_patch4_window7_224_cifar100.pth --out teachers/swin
  python -m rsd_jax.data.prepare cifar100 --archive cifar-100-python.tar.gz --data_dir data
  python -m rsd_jax.main --config configs/swin_resnet18.py --workdir workdirs/swin_resnet18 \\
      --config.teacher.path=teachers/swin --config.data.data_dir=data
  python -m rsd_jax.main --config configs/swin_resnet18.py:smoke --workdir /tmp/swin_resnet18_smoke   # tiny, CPU, CI
"""
from configs.presets import pair_config_module

get_config = pair_config_module("swin_tiny_patch4_window7_224", "resnet18")
