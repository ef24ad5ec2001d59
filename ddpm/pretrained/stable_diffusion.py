"""A Stable Diffusion pipeline directory (SD 1.x / 2.x in diffusers' layout: model_index.json,
unet/, vae/, text_encoder/, tokenizer/, scheduler/) as a run config.

The run is latent diffusion on the pipeline's own VAE (`config.latent.autoencoder_workdir` =
DIR/vae, read as it is, with its `scaling_factor`), the U-Net (`ddpm.pretrained.
unet2d_condition`) cross-attending to the CLIP text encoder's last hidden state
(`config.text.source="clip:DIR"`: DIR/tokenizer and DIR/text_encoder, frozen, run once per
batch of prompts), sampled with guidance 7.5 as the pipelines are. `--mode=import` writes the
U-Net (with the empty prompt's encoding as its null context) into the workdir.
"""

import os

import ml_collections

from ddpm.config import runs, schema
from ddpm.errors import UserError
from ddpm.pretrained import autoencoder_kl, files, scheduler, unet2d_condition
from ddpm.pretrained.files import refuse

INDEX = "model_index.json"
PIPELINES = ("StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline")
FOLDERS = ("unet", "vae", "text_encoder", "tokenizer")
_NOT_YET = {
    "StableDiffusionXLPipeline": "SDXL's second text encoder (text_encoder_2) and its added "
    "size / crop conditions are not implemented",
    "StableDiffusionInpaintPipeline": "its 9-channel inpainting U-Net is not implemented "
    "(inpaint any SD pipeline with --mode=inpaint instead)",
}
GUIDANCE = 7.5


def is_pipeline(path: str) -> bool:
    return os.path.isfile(os.path.join(path, INDEX))


def describe(path: str) -> tuple[ml_collections.ConfigDict, list[str], files.ModelFiles]:
    """(run config, notes, the U-Net's files) of the pipeline directory `path`; UserError for
    a layout or a model our networks cannot express."""
    index_path = os.path.join(path, INDEX)
    kind = files.read_json(index_path).get("_class_name")
    if kind not in PIPELINES:
        why = _NOT_YET.get(kind, "is not a Stable Diffusion 1.x / 2.x pipeline")
        raise UserError(
            f"{index_path}: _class_name={kind!r} {why} (accepted: {', '.join(PIPELINES)})"
        )
    for folder in FOLDERS:
        if not os.path.isdir(os.path.join(path, folder)):
            raise UserError(
                f"{path} has no {folder}/ folder; a Stable Diffusion pipeline has "
                f"{', '.join(f + '/' for f in FOLDERS)}"
            )
    found = files.read_model_dir(os.path.join(path, "unet"))
    source = os.path.join(found.folder, "config.json")
    if found.class_name != unet2d_condition.CLASS_NAME:
        raise refuse(
            source, "_class_name", found.class_name, f"is not {unet2d_condition.CLASS_NAME}"
        )
    config = schema.get_config()
    config.pretrained.path = path
    config.objective = "latent"
    config.model, latent = unet2d_condition.model_section(found.config, source)

    vae_source = os.path.join(path, "vae", "config.json")
    vae_cfg = files.read_json(vae_source)
    vae = autoencoder_kl.run_config(vae_cfg, vae_source)
    if vae.model.z_channels != latent["channels"]:
        raise refuse(
            vae_source,
            "latent_channels",
            vae.model.z_channels,
            f"must be the U-Net's in_channels={latent['channels']}",
        )
    if vae_cfg.get("shift_factor") is not None:
        raise refuse(vae_source, "shift_factor", vae_cfg["shift_factor"], "is not supported (null)")
    config.data.image_size = latent["image_size"] * runs.latent_factor(vae.model)
    config.data.channels = vae.data.channels
    config.latent.autoencoder_workdir = os.path.join(path, "vae")
    config.latent.scale_factor = float(vae_cfg.get("scaling_factor", 0.18215))

    text_source = os.path.join(path, "text_encoder", "config.json")
    width = files.read_json(text_source).get("hidden_size", 512)
    context = unet2d_condition.context_fields(found.config)
    if width != context["width"]:
        raise refuse(
            text_source,
            "hidden_size",
            width,
            f"must be the U-Net's cross_attention_dim={context['width']}",
        )
    config.text.source = f"clip:{path}"
    config.text.max_length, config.text.width = context["max_length"], context["width"]

    notes = scheduler.apply(config, found.scheduler or {}, f"{path}/scheduler")
    if found.scheduler is None:
        notes.append(f"{path}: no scheduler config; config.diffusion keeps its defaults")
    elif found.scheduler.get("_class_name") not in ("DDIMScheduler", "DDPMScheduler"):
        notes.append(
            f"{path}/scheduler: {found.scheduler.get('_class_name')} is sampled with "
            "DPM-Solver++(2M), 25 steps (--config.sample.method / num_steps choose another)"
        )
    s = config.sample
    s.method, s.num_steps, s.guidance_scale = "dpm++2m", 25, GUIDANCE
    s.num_samples, s.batch_size = 4, 4
    config.training.label_dropout = 0.1
    return config, notes, found
