"""Module tables of the blocks diffusers' networks share (`ResnetBlock2D`, `Attention` with a
group norm) against ours (`ddpm.models.layers.ResBlock`, `AttentionBlock`)."""

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


def middle(ours: str, theirs: str, tensors: dict, with_attention: bool) -> list[Rule]:
    """A UNetMidBlock2D: ResBlock, attention (optional), ResBlock."""
    table = resblock(f"{ours}mid_res0", f"{theirs}mid_block.resnets.0", tensors)
    if with_attention:
        table += attention(f"{ours}mid_attn", f"{theirs}mid_block.attentions.0")
    return table + resblock(f"{ours}mid_res1", f"{theirs}mid_block.resnets.1", tensors)
