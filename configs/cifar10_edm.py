"""EDM on CIFAR-10 (Karras et al., 2022): the paper's class-conditional settings
(`ddpm.config.presets.edm_cifar10`: the DDPM++-size U-Net, preconditioning, log-normal
sigma with P_mean -1.2 / P_std 1.2, sigma_data 0.5, 200M images of batch 512, Adam 1e-3, EMA
half-life 0.5M images), sampled with the paper's Heun on the rho = 7 grid, 18 steps (35
network calls). Paper: FID 1.79 (with its augmentation pipeline, which this project lacks).

python main.py --config=configs/cifar10_edm.py --workdir=runs/cifar10_edm
"""

import ml_collections

from ddpm.config import presets


def get_config() -> ml_collections.ConfigDict:
    return presets.edm_cifar10()
