"""diffusers' `UNet2DModel` (the DDPM releases: CIFAR-10, CelebA-HQ, LSUN; class-conditional
ones with `num_class_embeds`) as our U-Net (`ddpm.models.unet`).

The two networks are the same graph: per level `layers_per_block` ResBlocks (+ attention on
`Attn*Block2D` levels), a strided-conv downsample, the middle ResBlock-attention-ResBlock,
`layers_per_block + 1` ResBlocks per level on the way up over concatenated skips. What our
U-Net cannot express is refused, naming the config.json field.
"""

from collections.abc import Callable

import ml_collections

from ddpm.config import schema
from ddpm.pretrained import blocks
from ddpm.pretrained.files import refuse, require_fixed
from ddpm.pretrained.layout import Rule, rename_deprecated_attention, rule

# The tensors as the table expects them (old checkpoints' attention names).
prepare = rename_deprecated_attention
CLASS_NAME = "UNet2DModel"
_DOWN = {"DownBlock2D": False, "AttnDownBlock2D": True}
_UP = {"UpBlock2D": False, "AttnUpBlock2D": True}
# config.json field -> the only value(s) our U-Net computes (diffusers' defaults included).
_FIXED = {
    "time_embedding_type": ("positional",),
    "center_input_sample": (False,),
    "act_fn": ("silu",),
    "mid_block_type": ("UNetMidBlock2D",),
    "mid_block_scale_factor": (1, 1.0),
    "downsample_type": ("conv",),
    "upsample_type": ("conv",),
    "class_embed_type": (None,),
    "resnet_time_scale_shift": ("default", "scale_shift"),
}


def level_section(
    cfg: dict, source: str, fixed: dict, down_kinds: dict, up_kinds: dict
) -> tuple[ml_collections.ConfigDict, dict]:
    """(our `config.model` without its attention heads, data fields {image_size, channels})
    of a diffusers U-Net config.json (`cfg`): its `fixed` fields checked, its levels from
    `down_kinds` / `up_kinds` (block type -> has attention), channels, groups, time
    embedding, size. Shared by UNet2DModel and UNet2DConditionModel."""
    require_fixed(cfg, fixed, source)
    down, up = list(cfg.get("down_block_types", ())), list(cfg.get("up_block_types", ()))
    for field, types, known in (
        ("down_block_types", down, down_kinds),
        ("up_block_types", up, up_kinds),
    ):
        unknown = [b for b in types if b not in known]
        if unknown or not types:
            raise refuse(source, field, types, f"has blocks other than {', '.join(known)}")
    attn_down = [down_kinds[b] for b in down]
    if [up_kinds[b] for b in reversed(up)] != attn_down:
        raise refuse(
            source, "up_block_types", up, f"must mirror down_block_types={down} (attention)"
        )
    channels = list(cfg.get("block_out_channels", ()))
    if len(channels) != len(down) or any(c % channels[0] for c in channels):
        raise refuse(
            source,
            "block_out_channels",
            channels,
            "must be multiples of the first, one per block (our U-Net: ch * ch_mult)",
        )
    ch = channels[0]
    if ch % 2:
        raise refuse(source, "block_out_channels", channels, "must start with an even width")
    if cfg.get("time_embedding_dim") not in (None, 4 * ch):
        raise refuse(source, "time_embedding_dim", cfg["time_embedding_dim"], f"must be {4 * ch}")
    size = cfg.get("sample_size")
    if isinstance(size, list | tuple):
        if len(size) != 2 or size[0] != size[1]:
            raise refuse(source, "sample_size", size, "must be square")
        size = size[0]
    if not isinstance(size, int):
        raise refuse(source, "sample_size", size, "must be the image size (an int)")
    m = schema.unet()
    m.ch = ch
    m.ch_mult = tuple(c // ch for c in channels)
    m.num_res_blocks = cfg.get("layers_per_block", 2)
    m.attention_resolutions = tuple(size // 2**i for i in range(len(channels)) if attn_down[i])
    m.num_groups = cfg.get("norm_num_groups", 32)
    m.norm_eps = float(cfg.get("norm_eps", 1e-5))
    m.downsample_padding = cfg.get("downsample_padding", 1)
    m.dropout = float(cfg.get("dropout", 0.0))
    m.time_embed_order = "cos_sin" if cfg.get("flip_sin_to_cos", True) else "sin_cos"
    m.time_embed_freq_shift = float(cfg.get("freq_shift", 0))
    return m, {"image_size": size, "channels": cfg.get("in_channels", 3)}


def model_section(cfg: dict, source: str) -> tuple[ml_collections.ConfigDict, dict]:
    """(our `config.model`, data fields {image_size, channels}) of a UNet2DModel config.json
    (`cfg`; `source` names it in errors)."""
    m, data = level_section(cfg, source, _FIXED, _DOWN, _UP)
    groups = m.num_groups
    if cfg.get("attn_norm_num_groups") not in (None, groups):
        raise refuse(
            source, "attn_norm_num_groups", cfg["attn_norm_num_groups"], f"must be {groups}"
        )
    shift = cfg.get("resnet_time_scale_shift", "default")
    if (
        shift != "default"
        and cfg.get("add_attention", True)
        and cfg.get("attn_norm_num_groups") is None
    ):
        raise refuse(
            source,
            "attn_norm_num_groups",
            None,
            f"with resnet_time_scale_shift={shift!r} leaves diffusers' middle attention without "
            "a GroupNorm, which ours has",
        )
    in_ch, out_ch = data["channels"], cfg.get("out_channels", 3)
    if out_ch not in (in_ch, 2 * in_ch):
        raise refuse(
            source, "out_channels", out_ch, f"must be in_channels={in_ch} (or twice: learned sigma)"
        )
    head_dim = cfg.get("attention_head_dim", 8)
    m.mid_attention = cfg.get("add_attention", True)
    m.num_heads, m.head_dim = (1, None) if head_dim is None else (4, head_dim)
    m.scale_shift_norm = shift == "scale_shift"
    m.num_classes = cfg.get("num_class_embeds")
    m.learn_sigma = out_ch == 2 * in_ch
    return m, data


def rules(
    m: ml_collections.ConfigDict,
    size: int,
    tensors: dict,
    attention: Callable[[str, str], list[Rule]] = blocks.attention,
) -> list[Rule]:
    """The module table of our U-Net `m` (image size `size`) against a UNet2DModel state
    dict (`tensors` says which ResBlocks have a 1x1 shortcut); `attention(ours, theirs)`:
    an attention block's table (UNet2DConditionModel's transformers)."""

    def res(ours: str, theirs: str) -> list[Rule]:
        return blocks.resblock(ours, theirs, tensors)

    levels = len(m.ch_mult)
    table = [
        rule("conv_in", "conv_in", "conv"),
        rule("time_dense1", "time_embedding.linear_1", "dense"),
        rule("time_dense2", "time_embedding.linear_2", "dense"),
    ]
    if m.num_classes is not None:
        table.append(rule("label_embed", "class_embedding", "label_embed"))
    for level in range(levels):
        attn = size // 2**level in m.attention_resolutions
        for i in range(m.num_res_blocks):
            table += res(f"down{level}_res{i}", f"down_blocks.{level}.resnets.{i}")
            if attn:
                table += attention(f"down{level}_attn{i}", f"down_blocks.{level}.attentions.{i}")
        if level != levels - 1:
            conv = f"down_blocks.{level}.downsamplers.0.conv"
            table.append(rule(f"down{level}_resample/Conv_0", conv, "conv"))
    table += blocks.middle("", "", tensors, attention if m.mid_attention else None)
    for level in reversed(range(levels)):
        block = f"up_blocks.{levels - 1 - level}"
        attn = size // 2**level in m.attention_resolutions
        for i in range(m.num_res_blocks + 1):
            table += res(f"up{level}_res{i}", f"{block}.resnets.{i}")
            if attn:
                table += attention(f"up{level}_attn{i}", f"{block}.attentions.{i}")
        if level != 0:
            table.append(rule(f"up{level}_resample/Conv_0", f"{block}.upsamplers.0.conv", "conv"))
    table += [rule("norm_out", "conv_norm_out", "norm"), rule("conv_out", "conv_out", "conv")]
    return table
