"""diffusers' `UNet2DConditionModel` (Stable Diffusion 1.x and 2.x) as our U-Net with
`attention_type="transformer"` (`ddpm.models.layers.SpatialTransformer`) cross-attending to
the text encoder's hidden states.

The graph is UNet2DModel's (`ddpm.pretrained.unet2d`) with `CrossAttn*Block2D` levels whose
attention is a Transformer2DModel. diffusers' `attention_head_dim` of this class counts heads
(SD 1.x: 8 on every level); a per-level list (SD 2.x: 5, 10, 20, 20 on 320 / 640 / 1280
channels) must give one head width (64). SDXL's added conditions and everything else our
U-Net cannot compute are refused, naming the config.json field.

The learned null context of our conditioning (`ddpm.models.context`) is the text encoder's
encoding of the empty prompt, Stable Diffusion's unconditional input (`prepare`).
"""

import os

import ml_collections
import numpy as np

from ddpm.errors import UserError
from ddpm.pretrained import blocks, clip_text, unet2d
from ddpm.pretrained.files import refuse
from ddpm.pretrained.layout import Rule, rule

CLASS_NAME = "UNet2DConditionModel"
NULL_CONTEXT = "null_context"  # the empty prompt's encoding, added to the state dict
_DOWN = {"DownBlock2D": False, "CrossAttnDownBlock2D": True}
_UP = {"UpBlock2D": False, "CrossAttnUpBlock2D": True}
_FIXED = {
    "time_embedding_type": ("positional",),
    "center_input_sample": (False,),
    "act_fn": ("silu",),
    "mid_block_type": ("UNetMidBlock2DCrossAttn",),
    "mid_block_scale_factor": (1, 1.0),
    "resnet_time_scale_shift": ("default",),
    "class_embed_type": (None,),
    "num_class_embeds": (None,),
    "addition_embed_type": (None,),  # SDXL's text_time conditions
    "addition_time_embed_dim": (None,),
    "encoder_hid_dim": (None,),
    "time_cond_proj_dim": (None,),
    "timestep_post_act": (None,),
    "time_embedding_act_fn": (None,),
    "only_cross_attention": (False,),
    "dual_cross_attention": (False,),
    "conv_in_kernel": (3,),
    "conv_out_kernel": (3,),
    "attention_type": ("default",),
    "cross_attention_norm": (None,),
    "num_attention_heads": (None,),
    "reverse_transformer_layers_per_block": (None,),
    "resnet_skip_time_act": (False,),
    "resnet_out_scale_factor": (1, 1.0),
}


def model_section(cfg: dict, source: str) -> tuple[ml_collections.ConfigDict, dict]:
    """(our `config.model`, data fields {image_size, channels}) of a UNet2DConditionModel
    config.json (`cfg`; `source` names it in errors)."""
    m, data = unet2d.level_section(cfg, source, _FIXED, _DOWN, _UP)
    if cfg.get("out_channels", 4) != data["channels"]:
        raise refuse(source, "out_channels", cfg["out_channels"], "must equal in_channels")
    channels = list(cfg["block_out_channels"])
    heads = cfg.get("attention_head_dim", 8)
    if isinstance(heads, int):
        m.num_heads, m.head_dim = heads, None
    else:
        pairs = list(zip(channels, heads, strict=False))
        widths = {c // h for c, h in pairs}
        if len(heads) != len(channels) or len(widths) != 1 or any(c % h for c, h in pairs):
            raise refuse(
                source, "attention_head_dim", heads, "must give one head width on every level"
            )
        m.head_dim = widths.pop()
    depth = cfg.get("transformer_layers_per_block", 1)
    if not isinstance(depth, int):
        depths = set(depth)
        if len(depths) != 1:
            raise refuse(source, "transformer_layers_per_block", depth, "must be one count")
        depth = depths.pop()
    m.attention_type = "transformer"
    m.transformer_depth = depth
    m.mid_attention = True
    return m, data


def context_fields(cfg: dict) -> dict:
    """config.text fields of the U-Net's context: L = 77 tokens of cross_attention_dim."""
    return {"max_length": 77, "width": cfg.get("cross_attention_dim", 1280)}


def prepare(tensors: dict, source: str) -> dict:
    """The state dict (of the weights file `source`, in a pipeline's unet/) plus the empty
    prompt's encoding [77, D] by the pipeline's text encoder as `null_context.weight`."""
    pipeline = os.path.dirname(os.path.dirname(os.path.abspath(source)))
    if not os.path.isdir(os.path.join(pipeline, "text_encoder")):
        raise UserError(
            f"{source}: a text-conditioned U-Net is imported from its pipeline directory, "
            f"which has text_encoder/ and tokenizer/ beside unet/ ({pipeline} has none)"
        )
    empty = clip_text.encode_prompts(pipeline, [""])[0]
    return {**tensors, f"{NULL_CONTEXT}.weight": np.asarray(empty, np.float32)}


def rules(m: ml_collections.ConfigDict, size: int, tensors: dict) -> list[Rule]:
    """The module table of our U-Net `m` against a UNet2DConditionModel state dict."""

    def transformer(ours: str, theirs: str) -> list[Rule]:
        return blocks.transformer(ours, theirs, m.transformer_depth)

    table = unet2d.rules(m, size, tensors, transformer)
    return [*table, rule("context/null_context", NULL_CONTEXT, "param")]
