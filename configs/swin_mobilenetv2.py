"""Swin-T -> MobileNetV2 on CIFAR-100 with RSD, the reference's cifar/cnn.yaml recipe (one pair of its train.sh).

  python -m convert.from_torch swin_tiny_patch4_window7_224_cifar100.pth --out teachers/swin
  python -m rsd_jax.data.prepare cifar100 --archive cifar-100-python.tar.gz --data_dir data
  python -m rsd_jax.main --config configs/swin_mobilenetv2.py --workdir workdirs/swin_mobilenetv2 \\
      --config.teacher.path=teachers/swin --config.data.data_dir=data
  python -m rsd_jax.main --config configs/swin_mobilenetv2.py:smoke --workdir /tmp/swin_mobilenetv2_smoke   # tiny, CPU, CI
"""
from configs.presets import pair_config_module

get_config = pair_config_module("swin_tiny_patch4_window7_224", "mobilenetv2_100")
