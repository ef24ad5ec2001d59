"""Flow matching on CIFAR-10: EDM's CIFAR-10 run (`ddpm.config.presets.edm_cifar10`: same
DDPM++-size U-Net, data, optimizer and length) trained on the straight path
x_t = (1 - t) x_0 + t eps with the velocity target and logit-normal t (SD3), with label
dropout for classifier-free guidance; sampled with Heun on t, 18 steps (35 network calls).

python main.py --config=configs/cifar10_flow.py --workdir=runs/cifar10_flow
"""

import ml_collections

from ddpm.config import presets


def get_config() -> ml_collections.ConfigDict:
    config = presets.edm_cifar10()
    config.diffusion.process = "flow"
    config.training.label_dropout = 0.1
    config.sample.guidance_scale = 1.5
    return config
