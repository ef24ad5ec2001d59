"""Class-conditional diffusion on MNIST-5k with a small DiT instead of the U-Net (2-core CPU).

python main.py --config=configs/mnist_dit.py --workdir=runs/mnist_dit

The recipe of configs/mnist.py (v-prediction, min-SNR-5, cosine schedule, EMA with warmup,
guidance 3) with `models.mnist_dit()` and a transformer's lower learning rate.
"""

import ml_collections

from configs import mnist, models


def get_config() -> ml_collections.ConfigDict:
    config = mnist.get_config()
    config.model = models.mnist_dit()
    config.training.learning_rate = 1e-3
    return config
