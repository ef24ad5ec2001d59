"""LoRA fine-tuning of a Stable Diffusion pipeline on a folder of captioned images.

    python main.py --config=configs/sd_lora.py:SD_DIR,IMAGES --workdir=runs/my_lora
    python main.py --mode=sample --config=configs/sd_lora.py:SD_DIR,IMAGES \\
        --workdir=runs/my_lora --config.sample.prompt="..."

SD_DIR is a diffusers SD 1.x / 2.x pipeline directory (configs/pretrained.py:SD_DIR's run);
IMAGES a folder with a `captions.jsonl` ({"file_name": ..., "text": ...} per line) or a `.txt`
caption beside each image (ddpm/data/folder.py), at least the pipeline's resolution (512 for
SD 1.5). Rank-4 adapters on the U-Net's attention projections train at 1e-4 with AdamW, as
diffusers' train_text_to_image_lora.py does; the U-Net, VAE and text encoder stay frozen, the
captions are encoded once. runs/my_lora/pytorch_lora_weights.safetensors (rewritten at every
checkpoint) loads in diffusers with `pipe.load_lora_weights`. The grids draw the folder's
first caption unless --config.sample.prompt names another.
"""

import ml_collections

from ddpm import data, pretrained


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    pipeline, _, images = (arg or "").partition(",")
    if not pipeline or not images:
        raise ValueError("name the pipeline and the images: --config=configs/sd_lora.py:SD_DIR,DIR")
    config = pretrained.config_for(pipeline)
    config.data.source = f"folder:{images}"
    config.lora.rank = 4

    t = config.training
    t.num_steps = 1000
    t.batch_size = 4
    t.learning_rate = 1e-4
    t.warmup_steps = 0
    t.lr_schedule = "constant"
    t.ema_decay = 0.0  # the export is the trained adapters, as diffusers' script saves them
    t.log_every = 10
    t.checkpoint_every = 100
    t.sample_every = 250

    captions = data.dataset_info(config).captions
    if captions:
        config.sample.prompt = captions[0]
    return config
