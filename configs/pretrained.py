"""A pretrained diffusers model as a run: the config its directory describes.

    python main.py --mode=import --config=configs/pretrained.py:DIR --workdir=W
    python main.py --mode=sample --config=configs/pretrained.py:DIR --workdir=W

DIR is a local diffusers model or pipeline directory (e.g. `huggingface-cli download
google/ddpm-cifar10-32 --local-dir DIR` where there is network). The model section, image
shape, schedule and prediction come from its config.json and scheduler config
(`ddpm.pretrained.config_for`); everything else is the schema's default, and any field can be
overridden on the command line as usual (sampler, steps, guidance, data for eval or
fine-tuning: e.g. --config.data.source=tfds:cifar10).
"""

import ml_collections

from ddpm import pretrained


def get_config(path: str | None = None) -> ml_collections.ConfigDict:
    if not path:
        raise ValueError("name the diffusers directory: --config=configs/pretrained.py:DIR")
    return pretrained.config_for(path)
