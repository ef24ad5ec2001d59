"""The default run: class-conditional flow matching on the embedded MNIST-5k digits (2-core
CPU, 8-10 minutes).

python main.py --config=configs/mnist.py --workdir=runs/mnist

The recipe (a 0.64M-parameter U-Net trained on x_t = (1 - t) x_0 + t eps with the velocity
target and logit-normal t, 1200 steps of batch 64, DPM-Solver++(2M) with 20 steps and guidance
1.5) is `ddpm.config.presets.mnist()`, where its choice by measurement against the previous
default (configs/mnist_ddpm.py) and EDM (configs/mnist_edm.py) is recorded.
"""

import ml_collections

from ddpm.config import presets


def get_config() -> ml_collections.ConfigDict:
    return presets.mnist()
