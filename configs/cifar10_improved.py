"""CIFAR-10 with modern choices: cosine schedule (iDDPM), v-prediction with min-SNR-5 loss
weighting (Hang et al., 2023), AdamW with cosine decay, EMA warmup, scale-shift time
conditioning, class conditioning with classifier-free guidance, bfloat16 compute and DPM++2M.
"""

import ml_collections

from ddpm.config import presets


def get_config() -> ml_collections.ConfigDict:
    config = presets.cifar10()
    config.model.scale_shift_norm = True
    config.model.resblock_updown = True
    config.model.num_heads = 4
    config.model.num_classes = 10
    config.model.dtype = "bfloat16"

    config.diffusion.schedule = "cosine"
    config.diffusion.prediction = "v"
    config.diffusion.loss_weighting = "min_snr"
    config.diffusion.min_snr_gamma = 5.0

    t = config.training
    t.num_steps = 400_000
    t.optimizer = "adamw"
    t.weight_decay = 0.0
    t.learning_rate = 3e-4
    t.lr_schedule = "cosine"
    t.adam_b2 = 0.99
    t.ema_warmup = True
    t.label_dropout = 0.1

    config.sample.method = "dpm++2m"
    config.sample.num_steps = 20
    config.sample.guidance_scale = 1.5
    return config
