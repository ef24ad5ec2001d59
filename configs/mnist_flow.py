"""The default MNIST run trained by flow matching (rectified flow; Lipman et al., 2023, Liu
et al., 2023): x_t = (1 - t) x_0 + t eps, velocity target eps - x_0, logit-normal t as in
Stable Diffusion 3. Same data, network, optimizer and steps as configs/mnist.py; sampled with
Heun on t.

python main.py --config=configs/mnist_flow.py --workdir=runs/mnist_flow

The README's objectives table compares it with the default run and configs/mnist_edm.py at
the same wall-clock budget.
"""

import ml_collections

from ddpm.config import presets


def get_config() -> ml_collections.ConfigDict:
    config = presets.mnist()
    config.diffusion.process = "flow"  # diffusion.flow: logit-normal t, shift 1
    config.sample.method = "heun"
    config.sample.num_steps = 10  # 19 network calls
    return config
