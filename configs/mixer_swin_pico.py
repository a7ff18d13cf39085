"""Mixer-B/16 -> Swin-P on CIFAR-100 with RSD, the reference's cifar/vit_mlp.yaml recipe (one pair of its train.sh).

  python -m convert.from_torch mixer_b16_224_cifar100.pth --out teachers/mixer
  python -m rsd_jax.data.prepare cifar100 --archive cifar-100-python.tar.gz --data_dir data
  python -m rsd_jax.main --config configs/mixer_swin_pico.py --workdir workdirs/mixer_swin_pico \\
      --config.teacher.path=teachers/mixer --config.data.data_dir=data
  python -m rsd_jax.main --config configs/mixer_swin_pico.py:smoke --workdir /tmp/mixer_swin_pico_smoke   # tiny, CPU, CI
"""
from configs.presets import pair_config_module

get_config = pair_config_module("mixer_b16_224", "swin_pico_patch4_window7_224")
