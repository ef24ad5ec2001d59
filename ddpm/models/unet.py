"""The DDPM U-Net (Ho et al. 2020), with the options of its successors.

Encoder: a 3x3 input conv, then per level `num_res_blocks` ResBlocks (each followed by
self-attention when the feature map's resolution is in `attention_resolutions`) and a
downsample (except the last level). Middle: ResBlock, attention, ResBlock. Decoder: per
level `num_res_blocks + 1` ResBlocks on the concatenation with the matching encoder
activation (attention as in the encoder) and an upsample (except the first level).
Output: GroupNorm, SiLU, a zero-initialised 3x3 conv — a fresh model outputs zeros.
"""

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
from jax.typing import ArrayLike, DTypeLike

from ddpm.models.context import ContextEncoder, ContextSpec, cond_arguments, context_spec
from ddpm.models.layers import (
    AttentionBlock,
    CrossAttentionBlock,
    Downsample,
    GuidanceEmbed,
    ResBlock,
    SpatialTransformer,
    Upsample,
    _conv,
    default_init,
    group_norm,
    timestep_embedding,
)

Array = jax.Array


class UNet(nn.Module):
    """Denoiser eps/x0/v = f(x_t, t[, label]).

    Fields mirror `config.model` (see `ddpm/config/schema.py`); `out_channels` is the image's
    channel count (doubled when `learn_sigma`).
    """

    out_channels: int
    ch: int = 64
    ch_mult: Sequence[int] = (1, 2, 2)
    num_res_blocks: int = 2
    attention_resolutions: Sequence[int] = (16,)
    num_heads: int = 4
    head_dim: int | None = None
    mid_attention: bool = True
    dropout: float = 0.0
    num_classes: int | None = None
    resblock_updown: bool = False
    scale_shift_norm: bool = False
    num_groups: int = 32
    norm_eps: float = 1e-6
    downsample_padding: int = 0
    time_embed_freqs: int | None = None
    time_embed_max_period: float = 10000.0
    time_embed_order: str = "cos_sin"
    time_embed_freq_shift: float = 0.0
    dtype: DTypeLike = jnp.float32
    param_dtype: DTypeLike = jnp.float32
    remat: bool = False
    context_spec: ContextSpec | None = None  # cross-attention on a token sequence (text)
    guidance_embed: bool = False  # takes the guidance scale as an input (guided distillation)
    # "block": self-attention (+ cross-attention onto the context) blocks; "transformer":
    # Stable Diffusion's `SpatialTransformer`s of `transformer_depth` blocks (needs a context)
    attention_type: str = "block"
    transformer_depth: int = 1

    @nn.compact
    def __call__(
        self,
        x: ArrayLike,
        t: ArrayLike,
        labels: ArrayLike | None = None,
        train: bool = False,
        *,
        tokens: ArrayLike | None = None,
        context: ArrayLike | None = None,
        context_mask: ArrayLike | None = None,
        guidance: ArrayLike | None = None,
    ) -> Array:
        """x: [B, H, W, C] float (or a 1-D signal [B, L, C]: 1-D convolutions and attention),
        t: [B] int or float (fractional t is fine),
        labels: [B] int in [0, num_classes] (num_classes = the null label of classifier-free
        guidance) or None (= all null; ignored by an unconditional model); or a dict of the
        conditioning keywords (labels, tokens, context, context_mask, guidance) in its place.
        With `context_spec`: tokens [B, L] int (PAD = 0), or context [B, L, D] with
        context_mask [B, L] bool; rows without any (and neither given) mean "no text" (the
        learned null context, see `ddpm.models.context`). Cross-attention follows every
        self-attention block.
        guidance: [B] float, the guidance scale of a `guidance_embed` network (None = 1).
        `train=True` enables dropout and then needs `rngs={"dropout": key}`.
        Returns [B, H, W, out_channels] (or [B, L, out_channels]) float32.
        """
        x = jnp.asarray(x)
        labels, tokens, context, context_mask, guidance = cond_arguments(
            labels, tokens, context, context_mask, guidance
        )
        levels = len(self.ch_mult)
        factor = 2 ** (levels - 1)
        if x.ndim not in (3, 4) or any(n % factor for n in x.shape[1:-1]):
            raise ValueError(
                f"U-Net input of shape {x.shape}: expected [B, H, W, C] or [B, L, C] with H, W "
                f"(L) divisible by 2^(len(ch_mult)-1)={factor}"
            )
        rank = x.ndim - 2
        res_block = nn.remat(ResBlock) if self.remat else ResBlock
        common = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        block = lambda out_ch, name, resample=None: res_block(
            out_ch,
            num_groups=self.num_groups,
            norm_eps=self.norm_eps,
            dropout=self.dropout,
            scale_shift_norm=self.scale_shift_norm,
            resample=resample,
            deterministic=not train,
            name=name,
            **common,
        )
        heads = (self.num_heads, self.head_dim, self.num_groups, self.norm_eps)

        emb = self._embed(t, labels, guidance)
        ctx = None
        if self.context_spec is not None:
            ctx = ContextEncoder(self.context_spec, name="context", **common)(
                x.shape[0], tokens, context, context_mask
            )

        if self.attention_type == "transformer" and ctx is None:
            raise ValueError("attention_type='transformer' needs a context_spec (text)")

        def attention(h: Array, name: str) -> Array:
            """Self-attention, then cross-attention onto the context (if any)."""
            if self.attention_type == "transformer":
                return SpatialTransformer(
                    self.num_heads,
                    self.head_dim,
                    self.num_groups,
                    self.transformer_depth,
                    name=name,
                    **common,
                )(h, *ctx)
            h = AttentionBlock(*heads, name=name, **common)(h)
            if ctx is not None:
                h = CrossAttentionBlock(*heads, name=f"{name}_cross", **common)(h, *ctx)
            return h

        h = _conv(self.ch, rank=rank, name="conv_in", **common)(x.astype(self.dtype))
        hs = [h]
        for level, mult in enumerate(self.ch_mult):
            for i in range(self.num_res_blocks):
                h = block(self.ch * mult, f"down{level}_res{i}")(h, emb)
                if h.shape[1] in self.attention_resolutions:
                    h = attention(h, f"down{level}_attn{i}")
                hs.append(h)
            if level != levels - 1:
                if self.resblock_updown:
                    h = block(h.shape[-1], f"down{level}_resample", "down")(h, emb)
                else:
                    h = Downsample(
                        padding=self.downsample_padding, name=f"down{level}_resample", **common
                    )(h)
                hs.append(h)

        h = block(h.shape[-1], "mid_res0")(h, emb)
        if self.mid_attention:
            h = attention(h, "mid_attn")
        h = block(h.shape[-1], "mid_res1")(h, emb)

        for level in reversed(range(levels)):
            for i in range(self.num_res_blocks + 1):
                h = jnp.concatenate([h, hs.pop()], axis=-1)
                h = block(self.ch * self.ch_mult[level], f"up{level}_res{i}")(h, emb)
                if h.shape[1] in self.attention_resolutions:
                    h = attention(h, f"up{level}_attn{i}")
            if level != 0:
                if self.resblock_updown:
                    h = block(h.shape[-1], f"up{level}_resample", "up")(h, emb)
                else:
                    h = Upsample(name=f"up{level}_resample", **common)(h)

        h = group_norm(self.num_groups, epsilon=self.norm_eps, name="norm_out", **common)(h)
        zeros = nn.initializers.zeros
        h = _conv(self.out_channels, rank=rank, kernel_init=zeros, name="conv_out", **common)(
            nn.silu(h)
        )
        return h.astype(jnp.float32)

    def _embed(self, t: ArrayLike, labels: ArrayLike | None, guidance: ArrayLike | None) -> Array:
        """Time MLP (+ label embedding, + guidance embedding). t: [B], labels: [B] or None,
        guidance: [B] or None. Returns [B, 4*ch]."""
        dim = 4 * self.ch
        freqs = self.time_embed_freqs or self.ch // 2
        emb = timestep_embedding(
            t,
            2 * freqs,
            self.time_embed_max_period,
            order=self.time_embed_order,
            freq_shift=self.time_embed_freq_shift,
        )
        dense = lambda name: nn.Dense(
            dim,
            kernel_init=default_init,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name=name,
        )
        emb = dense("time_dense1")(emb.astype(self.dtype))
        emb = dense("time_dense2")(nn.silu(emb))
        if self.num_classes is not None:
            if labels is None:
                labels = jnp.full(emb.shape[:1], self.num_classes, jnp.int32)
            emb = emb + nn.Embed(
                self.num_classes + 1,
                dim,
                dtype=self.dtype,
                param_dtype=self.param_dtype,
                name="label_embed",
            )(jnp.asarray(labels, jnp.int32))
        if self.guidance_embed:
            emb = emb + GuidanceEmbed(
                dim, freqs, name="guidance_embed", dtype=self.dtype, param_dtype=self.param_dtype
            )(guidance, emb.shape[0])
        return emb


def unet_from_config(config: ml_collections.ConfigDict, input_shape: tuple[int, ...]) -> UNet:
    """The U-Net of `config.model` (validated by `ddpm.config.validation`) for inputs of
    `input_shape` (no batch axis; the output has its channels, doubled with learn_sigma)."""
    m = config.model
    return UNet(
        out_channels=input_shape[-1] * (2 if m.learn_sigma else 1),
        ch=m.ch,
        ch_mult=tuple(m.ch_mult),
        num_res_blocks=m.num_res_blocks,
        attention_resolutions=tuple(m.attention_resolutions),
        num_heads=m.num_heads,
        head_dim=m.head_dim,
        mid_attention=m.mid_attention,
        dropout=m.dropout,
        num_classes=m.num_classes,
        resblock_updown=m.resblock_updown,
        scale_shift_norm=m.scale_shift_norm,
        num_groups=m.num_groups,
        norm_eps=m.norm_eps,
        downsample_padding=m.downsample_padding,
        time_embed_freqs=m.time_embed_freqs,
        time_embed_max_period=m.time_embed_max_period,
        time_embed_order=m.time_embed_order,
        time_embed_freq_shift=m.time_embed_freq_shift,
        dtype=jnp.dtype(m.dtype),
        param_dtype=jnp.dtype(m.param_dtype),
        remat=m.remat,
        context_spec=context_spec(config),
        guidance_embed=m.guidance_embed,
        attention_type=m.attention_type,
        transformer_depth=m.transformer_depth,
    )
