"""The DDPM paper's CIFAR-10 run (Ho et al., 2020): 35.7M-parameter U-Net, linear schedule.

Needs the prepared TFDS dataset (`tfds build cifar10`, see README) and an accelerator. The
recipe is `ddpm.config.presets.cifar10()`.
"""

import ml_collections

from ddpm.config import presets


def get_config() -> ml_collections.ConfigDict:
    return presets.cifar10()
