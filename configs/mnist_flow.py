"""Flow matching (rectified flow; Lipman et al., 2023, Liu et al., 2023) on MNIST: the default
run (configs/mnist.py), named for the objectives table.

python main.py --config=configs/mnist_flow.py --workdir=runs/mnist_flow

x_t = (1 - t) x_0 + t eps, velocity target eps - x_0, logit-normal t as in Stable Diffusion 3;
the data, network, optimizer and steps of configs/mnist_ddpm.py; DPM-Solver++(2M) through the
flow's alpha = 1 - t, sigma = t, 20 steps, guidance 1.5.
"""

import ml_collections

from ddpm.config import presets


def get_config() -> ml_collections.ConfigDict:
    return presets.mnist()
