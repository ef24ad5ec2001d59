"""diffusers' `DiTTransformer2DModel` (DiT-XL/2-256 and the other sizes; learned-sigma output)
as our DiT (`ddpm.models.dit`).

The graphs agree once our DiT takes diffusers' choices: the sin-cos time embedding with
frequency shift 1, the column-first 2-D position embedding, and the MLP LayerNorm's epsilon.
diffusers keeps a copy of the time and label embedding in every block (identical in the
released checkpoints); ours has one, so the copies must agree.
"""

import ml_collections
import numpy as np

from ddpm.config import schema
from ddpm.errors import UserError
from ddpm.pretrained.files import refuse, require_fixed
from ddpm.pretrained.layout import Rule, Tensors, rule

CLASS_NAME = "DiTTransformer2DModel"
_FIXED = {
    "activation_fn": ("gelu-approximate",),
    "norm_type": ("ada_norm_zero",),
    "norm_elementwise_affine": (False,),
    "attention_bias": (True,),
}
_EMBED = "norm1.emb."


def model_section(cfg: dict, source: str) -> tuple[ml_collections.ConfigDict, dict]:
    """(our `config.model`, data fields) of a DiTTransformer2DModel config.json."""
    require_fixed(cfg, _FIXED, source)
    classes = cfg.get("num_embeds_ada_norm", 1000)
    if not isinstance(classes, int) or classes < 1:
        raise refuse(source, "num_embeds_ada_norm", classes, "must be the number of classes")
    in_ch = cfg.get("in_channels", 4)
    out_ch = cfg.get("out_channels") or in_ch
    if out_ch not in (in_ch, 2 * in_ch):
        raise refuse(
            source, "out_channels", out_ch, f"must be in_channels={in_ch} (or twice: learned sigma)"
        )
    size = cfg.get("sample_size", 32)
    if not isinstance(size, int):
        raise refuse(source, "sample_size", size, "must be an int")
    m = schema.dit()
    m.patch_size = cfg.get("patch_size", 2)
    m.num_heads = cfg.get("num_attention_heads", 16)
    m.hidden_size = m.num_heads * cfg.get("attention_head_dim", 72)
    m.depth = cfg.get("num_layers", 28)
    m.mlp_ratio = 4.0
    m.dropout = float(cfg.get("dropout", 0.0))
    m.mlp_norm_eps = float(cfg.get("norm_eps", 1e-5))
    m.pos_embed_layout = "col_row"
    m.num_classes = classes
    m.learn_sigma = out_ch == 2 * in_ch
    m.time_embed_freqs = 128
    m.time_embed_order = "cos_sin"
    m.time_embed_freq_shift = 1.0
    return m, {"image_size": size, "channels": in_ch}


def prepare(tensors: Tensors, source: str) -> Tensors:
    """`tensors` without the per-block copies of the time/label embedding (blocks 1..n-1),
    after checking that they equal block 0's."""
    kept = {}
    for key, value in tensors.items():
        parts = key.split(".", 2)
        if parts[0] == "transformer_blocks" and parts[1] != "0" and parts[2].startswith(_EMBED):
            first = f"transformer_blocks.0.{parts[2]}"
            if first not in tensors or not np.array_equal(tensors[first], value):
                raise UserError(
                    f"{source}: {key} differs from {first}; our DiT has one time and label "
                    "embedding for all blocks"
                )
            continue
        kept[key] = value
    return kept


def rules(m: ml_collections.ConfigDict, size: int, tensors: dict) -> list[Rule]:
    """The module table of our DiT `m` against a DiTTransformer2DModel state dict."""
    del size
    emb = f"transformer_blocks.0.{_EMBED}"
    table_key = f"{emb}class_embedder.embedding_table.weight"
    with_null = table_key in tensors and tensors[table_key].shape[0] == m.num_classes + 1
    table = [
        rule("patch_embed", "pos_embed.proj", "patch_conv"),
        rule("time_dense1", f"{emb}timestep_embedder.linear_1", "dense"),
        rule("time_dense2", f"{emb}timestep_embedder.linear_2", "dense"),
        rule(
            "label_embed",
            f"{emb}class_embedder.embedding_table",
            "embed" if with_null else "label_embed",
        ),
    ]
    for i in range(m.depth):
        block = f"transformer_blocks.{i}"
        qkv = tuple(f"{block}.attn1.to_{x}" for x in "qkv")
        table += [
            rule(f"block{i}/adaLN_modulation", f"{block}.norm1.linear", "dense"),
            rule(f"block{i}/qkv", qkv, "dense"),
            rule(f"block{i}/proj", f"{block}.attn1.to_out.0", "dense"),
            rule(f"block{i}/mlp_in", f"{block}.ff.net.0.proj", "dense"),
            rule(f"block{i}/mlp_out", f"{block}.ff.net.2", "dense"),
        ]
    return table + [
        rule("final_modulation", "proj_out_1", "dense"),
        rule("final_linear", "proj_out_2", "dense"),
    ]
