"""Class-conditional diffusion on MNIST-5k with a small DiT instead of the U-Net (2-core CPU).

python main.py --config=configs/mnist_dit.py --workdir=runs/mnist_dit

The recipe of configs/mnist.py (v-prediction, min-SNR-5, cosine schedule, EMA with warmup,
guidance 3) with `presets.mnist_dit()` and a transformer's lower learning rate.
"""

import ml_collections

from ddpm.config import presets


def get_config() -> ml_collections.ConfigDict:
    config = presets.mnist_ddpm()
    config.model = presets.mnist_dit()
    config.training.learning_rate = 1e-3
    return config
