"""Post-hoc sweep: the EMA width (sigma_rel) of the default run, chosen after training.

python main.py --mode=sweep --config=configs/sweeps/mnist_phema.py --workdir=runs/mnist_phema

The default run (configs/mnist.py, which tracks power EMAs of sigma_rel 0.05 and 0.10) trains
once in runs/mnist_phema/trained; each trial evaluates it (FD and class accuracy of 1,000
samples, the recipe's sampler and guidance) with the EMA of its sigma_rel reconstructed from
the snapshots (ddpm.posthoc_ema). results.csv holds the figures, results.png FD against
sigma_rel. A trained default run can be reused: copy or link it to runs/mnist_phema/trained.
"""

import ml_collections

from ddpm.config import presets


def get_config() -> ml_collections.ConfigDict:
    config = presets.mnist()
    config.eval.metrics = ("fd", "accuracy")
    return config


def get_sweep() -> dict:
    return {"grid": {"phema.sigma_rel": [0.02, 0.05, 0.08, 0.12, 0.2]}}
