"""The DDPM paper's CIFAR-10 run (Ho et al., 2020): 35.7M-parameter U-Net, linear schedule.

Needs the prepared TFDS dataset (`tfds build cifar10`, see README) and an accelerator.
"""

import ml_collections

from configs import default, models


def get_config() -> ml_collections.ConfigDict:
    config = default.get_config()
    config.data.source = "tfds:cifar10"
    config.data.image_size = 32
    config.data.channels = 3
    config.data.random_flip = True
    config.model = models.ddpm_cifar10()

    config.diffusion.schedule = "linear"
    config.diffusion.num_timesteps = 1000
    config.diffusion.prediction = "eps"

    t = config.training
    t.num_steps = 800_000
    t.batch_size = 128
    t.optimizer = "adam"
    t.learning_rate = 2e-4
    t.warmup_steps = 5000
    t.grad_clip = 1.0
    t.ema_decay = 0.9999
    t.label_dropout = 0.0
    t.log_every = 100
    t.checkpoint_every = 10_000
    t.sample_every = 50_000

    config.sample.method = "ddpm"
    config.sample.num_steps = 1000
    config.sample.num_samples = 64
    return config
