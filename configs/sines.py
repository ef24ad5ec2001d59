"""1-D signals: class-conditional diffusion on the embedded `sines` dataset (audio-style).

python main.py --config=configs/sines.py --workdir=runs/sines
python main.py --config=configs/sines.py --workdir=runs/sines --mode=sample  # plot PNG + WAV

Signals [256, 1] (sums of sinusoids, class = frequency band, ddpm/data/sines.py) through the
same U-Net with 1-D convolutions and attention; the recipe is the MNIST one's
(`presets.mnist_ddpm()`: v-prediction, min-SNR-5, cosine schedule, EMA with warmup) for longer.
"""

import ml_collections

from ddpm.config import presets


def get_config() -> ml_collections.ConfigDict:
    config = presets.mnist_ddpm()
    config.data.source = "sines"
    config.data.length = 256
    config.data.image_size = 32  # unused by signals; the value their workdirs were made with
    config.model.num_classes = 4  # frequency bands
    config.model.ch_mult = (1, 2, 2, 2)  # levels 256, 128, 64, 32
    config.model.attention_resolutions = (32,)

    t = config.training
    t.num_steps = 2000
    t.checkpoint_every = 500
    t.sample_every = 1000

    config.sample.guidance_scale = 2.0
    config.sample.num_samples = 16  # 4 rows (one per band) of 4
    return config
