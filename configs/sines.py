"""1-D signals: class-conditional diffusion on the embedded `sines` dataset (audio-style).

python main.py --config=configs/sines.py --workdir=runs/sines
python main.py --config=configs/sines.py --workdir=runs/sines --mode=sample  # plot PNG + WAV

Signals [256, 1] (sums of sinusoids, class = frequency band, ddpm/data/sines.py) through the
same U-Net with 1-D convolutions and attention; the recipe is the MNIST one's.
"""

import ml_collections

from ddpm.config import presets, schema


def get_config() -> ml_collections.ConfigDict:
    config = schema.get_config()
    config.data.source = "sines"
    config.data.length = 256
    config.data.channels = 1
    config.model = presets.mnist_small()
    config.model.num_classes = 4  # frequency bands
    config.model.ch_mult = (1, 2, 2, 2)  # levels 256, 128, 64, 32
    config.model.attention_resolutions = (32,)

    config.diffusion.schedule = "cosine"
    config.diffusion.prediction = "v"
    config.diffusion.loss_weighting = "min_snr"

    t = config.training
    t.num_steps = 2000
    t.batch_size = 64
    t.learning_rate = 2e-3
    t.warmup_steps = 200
    t.lr_schedule = "cosine"
    t.ema_decay = 0.999
    t.ema_warmup = True
    t.log_every = 100
    t.checkpoint_every = 500
    t.sample_every = 1000

    config.sample.method = "ddim"
    config.sample.num_steps = 50
    config.sample.guidance_scale = 2.0
    config.sample.num_samples = 16  # 4 rows (one per band) of 4
    config.sample.clip_x0 = True
    return config
