"""The Diffusion Transformer (DiT, Peebles & Xie 2023) with adaLN-Zero conditioning.

x [B, H, W, C] -> patchify (p x p patches) -> linear embedding + fixed 2-D sin-cos position
embedding -> `depth` transformer blocks, each modulated by c = time embedding + label
embedding through adaLN-Zero -> final adaLN layer and linear map to p*p*out_channels ->
unpatchify -> [B, H, W, out_channels]. Every modulation and the final linear map are
zero-initialised, so a fresh DiT outputs zeros (each block starts as the identity).
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.typing import ArrayLike, DTypeLike

from ddpm.models.context import ContextEncoder, ContextSpec, cond_arguments, context_spec
from ddpm.models.layers import CrossAttention, GuidanceEmbed, timestep_embedding

Array = jax.Array

# The reference DiT initialises its linear layers with xavier-uniform, embeddings with N(0, 0.02).
_xavier = nn.initializers.xavier_uniform()
_normal = nn.initializers.normal(0.02)


def patchify(x: Array, p: int) -> Array:
    """[B, H, W, C] -> [B, (H/p)(W/p), p*p*C]: row-major patches, each flattened (p_h, p_w, c)."""
    b, h, w, c = x.shape
    x = x.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, (h // p) * (w // p), p * p * c)


def unpatchify(tokens: Array, p: int, height: int, width: int) -> Array:
    """Inverse of `patchify`: [B, (H/p)(W/p), p*p*C] -> [B, H, W, C]."""
    b, _, d = tokens.shape
    c = d // (p * p)
    x = tokens.reshape(b, height // p, width // p, p, p, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, height, width, c)


def sincos_1d(dim: int, positions: np.ndarray) -> np.ndarray:
    """[sin(pos w_i), cos(pos w_i)], w_i = 10000^(-i / (dim/2)), i < dim/2.  -> [N, dim]."""
    omega = 1.0 / 10000.0 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
    args = positions.astype(np.float64)[:, None] * omega[None, :]
    return np.concatenate([np.sin(args), np.cos(args)], axis=1)


POS_EMBED_LAYOUTS = ("row_col", "col_row")


def sincos_2d(dim: int, grid_h: int, grid_w: int, layout: str = "row_col") -> np.ndarray:
    """Fixed 2-D position embedding: half the channels encode the patch's row, half its
    column, each with `sincos_1d`; `layout="col_row"` puts the column first (the reference
    DiT / MAE code and diffusers). dim % 4 == 0.  -> [grid_h * grid_w, dim] float32,
    row-major like `patchify`."""
    rows, cols = np.meshgrid(np.arange(grid_h), np.arange(grid_w), indexing="ij")
    emb = [sincos_1d(dim // 2, rows.reshape(-1)), sincos_1d(dim // 2, cols.reshape(-1))]
    if layout == "col_row":
        emb = emb[::-1]
    return np.concatenate(emb, axis=1).astype(np.float32)


def _modulate(x: Array, shift: Array, scale: Array) -> Array:
    """x * (1 + scale) + shift, per example.  x: [B, T, D], shift/scale: [B, D]."""
    return x * (1.0 + scale[:, None, :]) + shift[:, None, :]


class DiTBlock(nn.Module):
    """Pre-LN transformer block with adaLN-Zero (DiT, fig. 3):

    (shift1, scale1, gate1, shift2, scale2, gate2) = dense(silu(c)), zero-initialised;
    x = x + gate1 * attn(modulate(LN(x), shift1, scale1));
    x = x + gate2 * mlp(modulate(LN(x), shift2, scale2)),
    and with a context, x = x + cross_attention(LN(x), context) between the two (PixArt-alpha).

    x: [B, T, D], c: [B, D], context: [B, L, D'] with mask [B, L] bool, or None.
    Returns [B, T, D] in `dtype`.
    """

    num_heads: int
    mlp_ratio: float = 4.0
    dropout: float = 0.0
    mlp_norm_eps: float = 1e-6
    deterministic: bool = True
    dtype: DTypeLike = jnp.float32
    param_dtype: DTypeLike = jnp.float32

    def _dense(self, features: int, name: str, init=_xavier) -> nn.Dense:
        return nn.Dense(
            features,
            kernel_init=init,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name=name,
        )

    def _norm(self, name: str, epsilon: float = 1e-6) -> nn.LayerNorm:
        return nn.LayerNorm(epsilon, use_bias=False, use_scale=False, dtype=self.dtype, name=name)

    @nn.compact
    def __call__(
        self, x: Array, c: Array, context: Array | None = None, mask: Array | None = None
    ) -> Array:
        b, n, d = x.shape
        mod = self._dense(6 * d, "adaLN_modulation", nn.initializers.zeros)(nn.silu(c))
        shift1, scale1, gate1, shift2, scale2, gate2 = jnp.split(mod, 6, axis=-1)

        h = _modulate(self._norm("norm1")(x), shift1, scale1)
        qkv = self._dense(3 * d, "qkv")(h).reshape(b, n, 3, self.num_heads, d // self.num_heads)
        h = jax.nn.dot_product_attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2])
        h = self._dense(d, "proj")(h.reshape(b, n, d))
        x = x + gate1[:, None, :] * h
        if context is not None:
            x = x + CrossAttention(
                self.num_heads,
                _xavier,
                dtype=self.dtype,
                param_dtype=self.param_dtype,
                name="cross_attn",
            )(self._norm("norm_cross")(x), context, mask)

        h = _modulate(self._norm("norm2", self.mlp_norm_eps)(x), shift2, scale2)
        h = nn.gelu(self._dense(int(d * self.mlp_ratio), "mlp_in")(h), approximate=True)
        h = nn.Dropout(self.dropout, deterministic=self.deterministic)(h)
        h = self._dense(d, "mlp_out")(h)
        return x + gate2[:, None, :] * h


class DiT(nn.Module):
    """Denoiser eps/x0/v = f(x_t, t[, label]) as a transformer on p x p patches.

    Fields mirror `config.model` (see `ddpm/config/schema.py`); `out_channels` is the input's
    channel count (doubled when `learn_sigma`).
    """

    out_channels: int
    patch_size: int = 2
    hidden_size: int = 384
    depth: int = 12
    num_heads: int = 6
    mlp_ratio: float = 4.0
    dropout: float = 0.0
    mlp_norm_eps: float = 1e-6  # the LayerNorm before each MLP (all others: 1e-6)
    pos_embed_layout: str = "row_col"
    num_classes: int | None = None
    time_embed_freqs: int | None = None
    time_embed_max_period: float = 10000.0
    time_embed_order: str = "cos_sin"
    time_embed_freq_shift: float = 0.0
    dtype: DTypeLike = jnp.float32
    param_dtype: DTypeLike = jnp.float32
    remat: bool = False
    context_spec: ContextSpec | None = None  # cross-attention on a token sequence (text)
    guidance_embed: bool = False  # takes the guidance scale as an input (guided distillation)

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
        """x: [B, H, W, C] float, t: [B] int or float, labels: [B] int in [0, num_classes]
        (num_classes = the null label) or None (= all null; ignored when unconditional).
        tokens / context / context_mask: as the U-Net's (`ddpm.models.context`); every block
        then cross-attends to the context.
        guidance: [B] float, the guidance scale of a `guidance_embed` network (None = 1).
        `train=True` enables dropout and then needs `rngs={"dropout": key}`.
        Returns [B, H, W, out_channels] float32.
        """
        x = jnp.asarray(x)
        labels, tokens, context, context_mask, guidance = cond_arguments(
            labels, tokens, context, context_mask, guidance
        )
        p = self.patch_size
        if x.ndim != 4 or x.shape[1] % p or x.shape[2] % p:
            raise ValueError(
                f"DiT input of shape {x.shape}: expected [B, H, W, C] with H and W divisible "
                f"by patch_size={p}"
            )
        _, height, width, _ = x.shape
        common = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        d = self.hidden_size

        h = nn.Dense(d, kernel_init=_xavier, name="patch_embed", **common)(
            patchify(x.astype(self.dtype), p)
        )
        pos = sincos_2d(d, height // p, width // p, self.pos_embed_layout)
        h = h + jnp.asarray(pos, self.dtype)[None]
        c = self._embed(t, labels, guidance)
        ctx = ()
        if self.context_spec is not None:
            ctx = ContextEncoder(self.context_spec, name="context", **common)(
                x.shape[0], tokens, context, context_mask
            )

        block = nn.remat(DiTBlock) if self.remat else DiTBlock
        for i in range(self.depth):
            h = block(
                self.num_heads,
                self.mlp_ratio,
                self.dropout,
                self.mlp_norm_eps,
                deterministic=not train,
                name=f"block{i}",
                **common,
            )(h, c, *ctx)

        mod = nn.Dense(2 * d, kernel_init=nn.initializers.zeros, name="final_modulation", **common)
        shift, scale = jnp.split(mod(nn.silu(c)), 2, axis=-1)
        norm = nn.LayerNorm(1e-6, use_bias=False, use_scale=False, dtype=self.dtype)
        h = _modulate(norm(h), shift, scale)
        h = nn.Dense(
            p * p * self.out_channels,
            kernel_init=nn.initializers.zeros,
            name="final_linear",
            **common,
        )(h)
        return unpatchify(h, p, height, width).astype(jnp.float32)

    def _embed(self, t: ArrayLike, labels: ArrayLike | None, guidance: ArrayLike | None) -> Array:
        """c = MLP(sin-cos(t)) (+ label embedding, + guidance embedding). t: [B], labels: [B]
        or None, guidance: [B] or None. -> [B, D]."""
        common = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        d = self.hidden_size
        freqs = self.time_embed_freqs or 128  # DiT: a 256-dim frequency embedding
        emb = timestep_embedding(
            t,
            2 * freqs,
            self.time_embed_max_period,
            order=self.time_embed_order,
            freq_shift=self.time_embed_freq_shift,
        ).astype(self.dtype)
        emb = nn.Dense(d, kernel_init=_normal, name="time_dense1", **common)(emb)
        emb = nn.Dense(d, kernel_init=_normal, name="time_dense2", **common)(nn.silu(emb))
        if self.num_classes is not None:
            if labels is None:
                labels = jnp.full(emb.shape[:1], self.num_classes, jnp.int32)
            emb = emb + nn.Embed(
                self.num_classes + 1, d, embedding_init=_normal, name="label_embed", **common
            )(jnp.asarray(labels, jnp.int32))
        if self.guidance_embed:
            emb = emb + GuidanceEmbed(d, freqs, name="guidance_embed", **common)(
                guidance, emb.shape[0]
            )
        return emb


def dit_from_config(config: ml_collections.ConfigDict, input_shape: tuple[int, ...]) -> DiT:
    """The DiT of `config.model` (validated by `ddpm.config.validation`) for inputs of
    `input_shape` = (H, W, C)."""
    m = config.model
    return DiT(
        out_channels=input_shape[-1] * (2 if m.learn_sigma else 1),
        patch_size=m.patch_size,
        hidden_size=m.hidden_size,
        depth=m.depth,
        num_heads=m.num_heads,
        mlp_ratio=float(m.mlp_ratio),
        dropout=m.dropout,
        mlp_norm_eps=m.mlp_norm_eps,
        pos_embed_layout=m.pos_embed_layout,
        num_classes=m.num_classes,
        time_embed_freqs=m.time_embed_freqs,
        time_embed_max_period=m.time_embed_max_period,
        time_embed_order=m.time_embed_order,
        time_embed_freq_shift=m.time_embed_freq_shift,
        dtype=jnp.dtype(m.dtype),
        param_dtype=jnp.dtype(m.param_dtype),
        remat=m.remat,
        context_spec=context_spec(config),
        guidance_embed=m.guidance_embed,
    )
