"""MNIST trained as an EDM model (Karras et al., 2022): the data, network, optimizer and steps
of configs/mnist_ddpm.py with the paper's preconditioning, log-normal noise levels and loss
weight, sampled with Heun on its rho = 7 sigma grid.

python main.py --config=configs/mnist_edm.py --workdir=runs/mnist_edm

The README's objectives table compares it with configs/mnist_ddpm.py and the default run
(flow matching) at the same wall-clock budget.
"""

import ml_collections

from ddpm.config import presets


def get_config() -> ml_collections.ConfigDict:
    config = presets.mnist_ddpm()
    config.diffusion.process = "edm"  # diffusion.edm: the paper's sigma_data, P_mean, P_std
    config.sample.method = "heun"
    config.sample.num_steps = 18  # the paper's 35-NFE sampler
    return config
