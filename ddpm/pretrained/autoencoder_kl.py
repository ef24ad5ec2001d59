"""diffusers' `AutoencoderKL` (the Stable Diffusion VAE layout: 128/256/512/512, 2 ResBlocks per
level, middle attention, 4 latent channels, quant / post-quant 1x1 convolutions) as our
latent-diffusion stage 1 (`ddpm.models.autoencoder` with `quant_conv`).

The encoder and decoder are the same graphs as ours (ResBlocks without a time embedding,
'SAME'-padded stride-2 downsampling, one-head middle attention, GroupNorm epsilon 1e-6). What
ours cannot express is refused, naming the config.json field.
"""

import ml_collections

from ddpm.config import schema
from ddpm.pretrained import blocks
from ddpm.pretrained.files import refuse, require_fixed
from ddpm.pretrained.layout import Rule, rename_deprecated_attention, rule

# The tensors as the table expects them (old checkpoints' attention names).
prepare = rename_deprecated_attention
CLASS_NAME = "AutoencoderKL"
_FIXED = {
    "act_fn": ("silu",),
    "mid_block_add_attention": (True, False),
    "use_quant_conv": (True, False),
    "use_post_quant_conv": (True, False),
}


def run_config(cfg: dict, source: str) -> ml_collections.ConfigDict:
    """The run config (objective "autoencoder") of an AutoencoderKL config.json."""
    config = schema.get_config()
    config.objective = "autoencoder"
    config.model, data_fields = model_section(cfg, source)
    config.data.update(data_fields)
    return config


def model_section(cfg: dict, source: str) -> tuple[ml_collections.ConfigDict, dict]:
    """(our `config.model`, data fields) of an AutoencoderKL config.json."""
    require_fixed(cfg, _FIXED, source)
    for field, block in (
        ("down_block_types", "DownEncoderBlock2D"),
        ("up_block_types", "UpDecoderBlock2D"),
    ):
        kinds = set(cfg.get(field, (block,)))
        if kinds != {block}:
            raise refuse(source, field, sorted(kinds), f"has blocks other than {block}")
    if cfg.get("use_quant_conv", True) != cfg.get("use_post_quant_conv", True):
        raise refuse(
            source, "use_post_quant_conv", cfg["use_post_quant_conv"], "must equal use_quant_conv"
        )
    channels = list(cfg.get("block_out_channels", (64,)))
    if any(c % channels[0] for c in channels):
        raise refuse(source, "block_out_channels", channels, "must be multiples of the first")
    in_ch, out_ch = cfg.get("in_channels", 3), cfg.get("out_channels", 3)
    if in_ch != out_ch:
        raise refuse(source, "out_channels", out_ch, f"must equal in_channels={in_ch}")
    size = cfg.get("sample_size", 32)
    if isinstance(size, list | tuple):
        size = size[0] if len(size) == 2 and size[0] == size[1] else None
    if not isinstance(size, int):
        raise refuse(source, "sample_size", cfg.get("sample_size"), "must be square")
    m = schema.autoencoder()
    m.ch = channels[0]
    m.ch_mult = tuple(c // channels[0] for c in channels)
    m.num_res_blocks = cfg.get("layers_per_block", 1)
    m.attention_resolutions = ()
    m.mid_attention = cfg.get("mid_block_add_attention", True)
    m.num_heads, m.head_dim = 1, None
    m.num_groups = cfg.get("norm_num_groups", 32)
    m.z_channels = cfg.get("latent_channels", 4)
    m.quant_conv = cfg.get("use_quant_conv", True)
    m.dropout = 0.0
    return m, {"image_size": size, "channels": in_ch}


def notes(cfg: dict, source: str) -> list[str]:
    """What a stage-2 run on this VAE needs to know."""
    out = [
        f"{source}: a latent-diffusion run on this autoencoder scales its latents by "
        f"scaling_factor={cfg.get('scaling_factor', 0.18215)}: "
        f"--config.latent.scale_factor={cfg.get('scaling_factor', 0.18215)}"
    ]
    if cfg.get("shift_factor") is not None:
        out.append(f"{source}: shift_factor={cfg['shift_factor']} has no counterpart here")
    return out


def rules(m: ml_collections.ConfigDict, size: int, tensors: dict) -> list[Rule]:
    """The module table of our autoencoder `m` against an AutoencoderKL state dict."""
    del size  # no attention by resolution in this layout
    levels = len(m.ch_mult)
    table = [rule("encoder/conv_in", "encoder.conv_in", "conv")]
    for level in range(levels):
        down = f"encoder.down_blocks.{level}"
        for i in range(m.num_res_blocks):
            table += blocks.resblock(f"encoder/down{level}_res{i}", f"{down}.resnets.{i}", tensors)
        if level != levels - 1:
            conv = f"{down}.downsamplers.0.conv"
            table.append(rule(f"encoder/down{level}_resample/Conv_0", conv, "conv"))
    table += blocks.middle(
        "encoder/", "encoder.", tensors, blocks.attention if m.mid_attention else None
    )
    table += [
        rule("encoder/GroupNorm_0", "encoder.conv_norm_out", "norm"),
        rule("encoder/conv_out", "encoder.conv_out", "conv"),
        rule("decoder/conv_in", "decoder.conv_in", "conv"),
    ]
    table += blocks.middle(
        "decoder/", "decoder.", tensors, blocks.attention if m.mid_attention else None
    )
    for level in reversed(range(levels)):
        up = f"decoder.up_blocks.{levels - 1 - level}"
        for i in range(m.num_res_blocks + 1):
            table += blocks.resblock(f"decoder/up{level}_res{i}", f"{up}.resnets.{i}", tensors)
        if level != 0:
            table.append(
                rule(f"decoder/up{level}_resample/Conv_0", f"{up}.upsamplers.0.conv", "conv")
            )
    table += [
        rule("decoder/GroupNorm_0", "decoder.conv_norm_out", "norm"),
        rule("decoder/conv_out", "decoder.conv_out", "conv"),
    ]
    if m.quant_conv:
        table += [
            rule("quant", "quant_conv", "conv"),
            rule("post_quant", "post_quant_conv", "conv"),
        ]
    return table
