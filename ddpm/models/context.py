"""Sequence conditioning shared by the U-Net and the DiT: a small text encoder trained with
the denoiser, and the learned null context of classifier-free guidance.

A denoiser with a `ContextSpec` takes, besides x and t, either `tokens` [B, L] int (encoded
here; PAD = 0) or a precomputed `context` [B, L, D] with `context_mask` [B, L] bool. A row
with no unmasked position (all padding), and a call with neither, means "no text": that row
becomes the learned null sequence. So the null condition of guidance and label dropout is
simply tokens = PAD (or mask = False), and it equals calling the model without context.
"""

from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
from jax.typing import DTypeLike

from ddpm.models.layers import CrossAttention

Array = jax.Array
_normal = nn.initializers.normal(0.02)


class ContextSpec(NamedTuple):
    """length L and width D of the context; vocab_size: the built-in text encoder's (None =
    precomputed embeddings are passed); depth and num_heads of the text encoder."""

    length: int
    dim: int
    vocab_size: int | None = None
    depth: int = 2
    num_heads: int = 4


def context_spec(config: ml_collections.ConfigDict) -> ContextSpec | None:
    """The `ContextSpec` of `config.text` (validated by `ddpm.config.validation`); None when
    config.text.source is None."""
    from ddpm import text  # the vocabulary (no model knowledge flows back)

    t = config.text
    if t.source is None:
        return None
    vocab = len(text.VOCAB) if t.source == "captions" else None
    return ContextSpec(t.max_length, t.width, vocab, t.depth, t.num_heads)


def null_context(spec: ContextSpec) -> dict[str, int | bool]:
    """Fill values of the conditioning pytree that mean "no text" (for guidance / dropout)."""
    if spec.vocab_size is not None:
        return {"tokens": 0}
    return {"context": 0.0, "context_mask": False}


def init_context(spec: ContextSpec, batch: int = 1) -> dict[str, Array]:
    """A conditioning pytree of zeros for `model.init` (tokens or context + mask)."""
    if spec.vocab_size is not None:
        return {"tokens": jnp.zeros((batch, spec.length), jnp.int32)}
    return {
        "context": jnp.zeros((batch, spec.length, spec.dim), jnp.float32),
        "context_mask": jnp.zeros((batch, spec.length), bool),
    }


CONDITIONING_KEYS = ("labels", "tokens", "context", "context_mask", "guidance")


def cond_arguments(labels, tokens, context, context_mask, guidance) -> tuple:
    """(labels, tokens, context, context_mask, guidance) of a denoiser call, whose `labels`
    argument may also be a conditioning dict with any of these keys (as the run layer passes
    it)."""
    if isinstance(labels, dict):
        unknown = set(labels) - set(CONDITIONING_KEYS)
        if unknown:
            raise ValueError(f"unknown conditioning key(s) {sorted(unknown)}")
        return tuple(labels.get(k) for k in CONDITIONING_KEYS)
    return labels, tokens, context, context_mask, guidance


ACTIVATIONS = {
    "gelu_tanh": lambda x: nn.gelu(x, approximate=True),
    "gelu": lambda x: nn.gelu(x, approximate=False),
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),  # CLIP ViT-L/14's (SD 1.x)
}


class TextEncoder(nn.Module):
    """Token embedding + learned positions -> `depth` pre-LN transformer layers (self-attention,
    an MLP) -> LayerNorm: the small text encoder trained with a denoiser (`ContextSpec`'s
    fields, the other defaults) and, with CLIP's options (`causal`, `activation`, `mlp_dim`,
    `norm_eps`), the CLIP text model of Stable Diffusion (`ddpm.pretrained.clip_text`).

    tokens: [B, L] int32 (L <= length); mask: [B, L] bool, keys a position may attend to
    (None: all). `skip_last` > 0 returns layer depth - skip_last's output through the final
    norm (diffusers' clip_skip; the later layers are computed for nothing and compiled away).
    Returns [B, L, width] in `dtype`.
    """

    vocab_size: int
    width: int
    length: int
    depth: int = 2
    num_heads: int = 4
    mlp_dim: int | None = None  # None: 4 * width
    activation: str = "gelu_tanh"  # a key of ACTIVATIONS
    causal: bool = False
    norm_eps: float = 1e-6
    skip_last: int = 0
    dtype: DTypeLike = jnp.float32
    param_dtype: DTypeLike = jnp.float32

    @nn.compact
    def __call__(self, tokens: Array, mask: Array | None = None) -> Array:
        d, common = self.width, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        norm = lambda name: nn.LayerNorm(epsilon=self.norm_eps, name=name, **common)
        act = ACTIVATIONS[self.activation]
        h = nn.Embed(self.vocab_size, d, embedding_init=_normal, name="embed", **common)(tokens)
        pos = self.param("pos_embed", _normal, (self.length, d), self.param_dtype)
        h = h + pos[: tokens.shape[1]].astype(self.dtype)
        if mask is None:
            mask = jnp.ones(tokens.shape, bool)
        # Rows without tokens attend to themselves (any output; the null context replaces them).
        keys = mask | ~jnp.any(mask, axis=-1, keepdims=True)
        hidden = [h]
        for i in range(self.depth):
            attn = CrossAttention(
                self.num_heads, causal=self.causal, name=f"layer{i}_attn", **common
            )
            y = norm(f"layer{i}_norm1")(h)
            h = h + attn(y, y, keys)
            y = norm(f"layer{i}_norm2")(h)
            y = act(nn.Dense(self.mlp_dim or 4 * d, name=f"layer{i}_mlp_in", **common)(y))
            h = h + nn.Dense(d, name=f"layer{i}_mlp_out", **common)(y)
            hidden.append(h)
        return norm("norm_out")(hidden[self.depth - self.skip_last])


class ContextEncoder(nn.Module):
    """(context [B, L, D], mask [B, L] bool) for cross-attention from tokens, a precomputed
    context, or nothing; rows without any unmasked position become the learned null sequence
    (all positions unmasked)."""

    spec: ContextSpec
    dtype: DTypeLike = jnp.float32
    param_dtype: DTypeLike = jnp.float32

    @nn.compact
    def __call__(
        self,
        batch: int,
        tokens: Array | None = None,
        context: Array | None = None,
        context_mask: Array | None = None,
    ) -> tuple[Array, Array]:
        """tokens: [B, L] int; context: [B, L, D] float with context_mask [B, L] bool (None =
        all valid). With neither, every row is the null sequence."""
        spec = self.spec
        if tokens is not None:
            mask = jnp.asarray(tokens) != 0
            encoder = TextEncoder(
                spec.vocab_size,
                spec.dim,
                spec.length,
                spec.depth,
                spec.num_heads,
                dtype=self.dtype,
                param_dtype=self.param_dtype,
                name="text_encoder",
            )
            context = encoder(jnp.asarray(tokens, jnp.int32), mask)
        elif context is not None:
            context = jnp.asarray(context).astype(self.dtype)
            mask = (
                jnp.ones(context.shape[:2], bool)
                if context_mask is None
                else jnp.asarray(context_mask, bool)
            )
        else:
            context = jnp.zeros((batch, spec.length, spec.dim), self.dtype)
            mask = jnp.zeros((batch, spec.length), bool)
        if context.shape[1:] != (spec.length, spec.dim):
            raise ValueError(
                f"context of shape {context.shape}: expected [B, {spec.length}, {spec.dim}] "
                "(config.text.max_length, config.text.width)"
            )
        null = self.param("null_context", _normal, (spec.length, spec.dim), self.param_dtype)
        empty = ~jnp.any(mask, axis=-1)
        context = jnp.where(empty[:, None, None], null.astype(self.dtype)[None], context)
        return context, mask | empty[:, None]
