"""The default run until flow matching replaced it: class-conditional DDPM on the embedded
MNIST-5k digits (2-core CPU, 8-10 minutes), and the teacher of configs/mnist_distill.py.

python main.py --config=configs/mnist_ddpm.py --workdir=runs/mnist_ddpm

The recipe (a 0.64M-parameter U-Net, v-prediction with min-SNR-5 weighting, cosine schedule,
1200 steps of batch 64, DDIM-50 with guidance 3) is `ddpm.config.presets.mnist_ddpm()`, where
its choice by measurement is recorded; the MNIST variants (DiT, text, latent, signals) start
from it too.
"""

import ml_collections

from ddpm.config import presets


def get_config() -> ml_collections.ConfigDict:
    return presets.mnist_ddpm()
