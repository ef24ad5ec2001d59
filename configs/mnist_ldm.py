"""Stage 2 of latent diffusion on MNIST-5k: class-conditional diffusion on the 8x8x4 latents
of the autoencoder trained by configs/mnist_autoencoder.py (run that first).

python main.py --config=configs/mnist_ldm.py --workdir=runs/mnist_ldm
python main.py --config=configs/mnist_ldm.py --workdir=runs/mnist_ldm --mode=sample

The objective and sampler are the pixel recipe of configs/mnist.py; the latents are scaled to
std ~ 1 by a factor estimated at the start (saved in the workdir's config.json), sampled
without clipping and decoded by the autoencoder's decoder. Measured on the loaded 2-core CPU
(~1.5 steps/s): after 1500 steps, DDIM-50 with guidance 3 gives digits of the right class in
nearly every cell of the 10x10 grid.
"""

import ml_collections

from ddpm.config import presets


def get_config() -> ml_collections.ConfigDict:
    config = presets.mnist_ddpm()
    config.objective = "latent"
    config.data.image_size = 32  # must match the autoencoder run
    config.latent.autoencoder_workdir = "runs/mnist_autoencoder"  # its latents: 8x8x4
    config.latent.sample_posterior = True

    m = config.model  # mnist_small's class-conditional U-Net, on 8x8 latents: 8 -> 4
    m.ch, m.ch_mult, m.num_res_blocks = 32, (1, 2), 2
    m.attention_resolutions, m.mid_attention, m.num_groups = (), True, 8

    t = config.training
    t.num_steps = 1500
    t.checkpoint_every = 500
    t.sample_every = 1000
    config.sample.clip_x0 = False  # latents are not in [-1, 1]
    return config
