"""Mixer-B/16 -> ResNet18 on CIFAR-100 with RSD, the reference's cifar/cnn.yaml recipe (one pair of its train.sh).

  python -m convert.from_torch mixer_b16_224_cifar100.pth --out teachers/mixer
  python -m rsd_jax.data.prepare cifar100 --archive cifar-100-python.tar.gz --data_dir data
  python -m rsd_jax.main --config configs/mixer_resnet18.py --workdir workdirs/mixer_resnet18 \\
      --config.teacher.path=teachers/mixer --config.data.data_dir=data
  python -m rsd_jax.main --config configs/mixer_resnet18.py:smoke --workdir /tmp/mixer_resnet18_smoke   # tiny, CPU, CI
"""
from configs.presets import pair_config_module

get_config = pair_config_module("mixer_b16_224", "resnet18")
