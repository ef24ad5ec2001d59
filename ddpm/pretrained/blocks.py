"""Module tables of the blocks diffusers' networks share (`ResnetBlock2D`, `Attention` with a
group norm) against ours (`ddpm.models.layers.ResBlock`, `AttentionBlock`)."""

from collections.abc import Callable

from ddpm.pretrained.layout import Rule, rule


def resblock(ours: str, theirs: str, tensors: dict) -> list[Rule]:
    """Our ResBlock from a ResnetBlock2D; its time projection and 1x1 shortcut are mapped
    when the state dict has them (the conversion then checks that ours has them too)."""
    rules = [
        rule(f"{ours}/norm1", f"{theirs}.norm1", "norm"),
        rule(f"{ours}/conv1", f"{theirs}.conv1", "conv"),
        rule(f"{ours}/norm2", f"{theirs}.norm2", "norm"),
        rule(f"{ours}/conv2", f"{theirs}.conv2", "conv"),
    ]
    if f"{theirs}.time_emb_proj.weight" in tensors:
        rules.append(rule(f"{ours}/emb_proj", f"{theirs}.time_emb_proj", "dense"))
    if f"{theirs}.conv_shortcut.weight" in tensors:
        rules.append(rule(f"{ours}/skip", f"{theirs}.conv_shortcut", "conv"))
    return rules


def attention(ours: str, theirs: str) -> list[Rule]:
    """Our `AttentionBlock` (fused qkv) from diffusers' `Attention` with a group norm."""
    qkv = tuple(f"{theirs}.to_{x}" for x in "qkv")
    return [
        rule(f"{ours}/GroupNorm_0", f"{theirs}.group_norm", "norm"),
        rule(f"{ours}/qkv", qkv, "dense"),
        rule(f"{ours}/proj", f"{theirs}.to_out.0", "dense"),
    ]


def middle(
    ours: str, theirs: str, tensors: dict, attention: Callable[[str, str], list[Rule]] | None
) -> list[Rule]:
    """A UNetMidBlock2D(CrossAttn): ResBlock, `attention`'s table (None: none), ResBlock."""
    table = resblock(f"{ours}mid_res0", f"{theirs}mid_block.resnets.0", tensors)
    if attention is not None:
        table += attention(f"{ours}mid_attn", f"{theirs}mid_block.attentions.0")
    return table + resblock(f"{ours}mid_res1", f"{theirs}mid_block.resnets.1", tensors)


def transformer(ours: str, theirs: str, depth: int = 1) -> list[Rule]:
    """Our `SpatialTransformer` from a Transformer2DModel (1x1-conv or linear projections:
    both are dense maps; bias-free q/k/v)."""
    table = [
        rule(f"{ours}/norm", f"{theirs}.norm", "norm"),
        rule(f"{ours}/proj_in", f"{theirs}.proj_in", "dense"),
        rule(f"{ours}/proj_out", f"{theirs}.proj_out", "dense"),
    ]
    for j in range(depth):
        block = f"{theirs}.transformer_blocks.{j}"
        for n in (1, 2):
            attn = f"{block}.attn{n}"
            table += [
                rule(f"{ours}/block{j}_attn{n}/q", f"{attn}.to_q", "dense"),
                rule(f"{ours}/block{j}_attn{n}/kv", (f"{attn}.to_k", f"{attn}.to_v"), "dense"),
                rule(f"{ours}/block{j}_attn{n}/proj", f"{attn}.to_out.0", "dense"),
            ]
        table += [rule(f"{ours}/block{j}_norm{n}", f"{block}.norm{n}", "norm") for n in (1, 2, 3)]
        table += [
            rule(f"{ours}/block{j}_ff_in", f"{block}.ff.net.0.proj", "dense"),
            rule(f"{ours}/block{j}_ff_out", f"{block}.ff.net.2", "dense"),
        ]
    return table
