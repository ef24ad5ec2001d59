"""Sweep: learning rate x objective on the default MNIST recipe (configs/mnist.py), 6 trials.

python main.py --mode=sweep --config=configs/sweeps/mnist_lr.py --workdir=runs/mnist_lr

Each trial trains in runs/mnist_lr/<trial name>; the table of final metrics goes to
runs/mnist_lr/results.csv and the loss curves to runs/mnist_lr/results.png.
"""

import ml_collections

from ddpm.config import presets


def get_config() -> ml_collections.ConfigDict:
    """The base config every trial starts from (override it with --config.<path>=...)."""
    config = presets.mnist_ddpm()
    config.training.num_steps = 600
    config.training.sample_every = 600
    return config


def get_sweep() -> dict:
    """Every learning rate with each objective: 3 x 2 trials."""
    return {
        "grid": {"training.learning_rate": [1e-3, 2e-3, 4e-3]},
        "trials": [
            {"diffusion.prediction": "eps", "diffusion.loss_weighting": "none"},
            {"diffusion.prediction": "v", "diffusion.loss_weighting": "min_snr"},
        ],
    }
