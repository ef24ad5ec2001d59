"""Text-conditioned diffusion on MNIST-5k: captions measured from each digit (label, stroke
thickness, slant; `ddpm.text`), a word-level tokenizer and a 2-layer text encoder trained with
the U-Net, cross-attention at 7x7 (2-core CPU).

python main.py --config=configs/mnist_text.py --workdir=runs/mnist_text
python main.py --config=configs/mnist_text.py --workdir=runs/mnist_text --mode=sample \
    --config.sample.prompt="a thin handwritten three"
"""

import ml_collections

from ddpm.config import presets


def get_config() -> ml_collections.ConfigDict:
    config = presets.mnist_ddpm()
    config.model.num_classes = None  # the text carries the class
    config.model.attention_resolutions = (7,)  # cross-attention in the 7x7 blocks and middle
    config.text.source = "captions"
    config.text.max_length = 8  # the longest caption has 6 words
    config.text.width = 64
    config.text.depth = 2
    config.text.num_heads = 4
    return config
