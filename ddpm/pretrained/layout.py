"""PyTorch state dicts -> flax parameter trees, by a table of module correspondences.

A family's converter lists `Rule`s: which of our modules (a path in the flax tree) takes the
weights of which of theirs (a state-dict prefix), and what kind of module both are. The kind
decides the leaves and their layout, once, here:

  conv   weight [out, in, *k] -> kernel [*k, in, out];  bias
  dense  weight [out, in] (or [out, in, 1, 1]) -> kernel [in, out];  bias
  norm   weight -> scale;  bias (GroupNorm / LayerNorm)
  patch_conv  weight [out, in, p, p] -> kernel [p * p * in, out] (a patch embedding);  bias
  embed  weight [n, d] -> embedding [n, d]
  label_embed  like embed, plus a zero row for our null label (classifier-free guidance)
  param  weight -> the parameter `ours` itself (a module's raw parameter: a position table)

A rule with several prefixes concatenates their converted leaves along the output axis (our
fused q/k/v projection from diffusers' to_q, to_k, to_v). `convert` checks the result against
the network's own parameter shapes: every parameter filled, every tensor used, shapes equal.
"""

import dataclasses
from typing import Any

import jax
import numpy as np
from flax import traverse_util

from ddpm.errors import UserError

Tensors = dict[str, np.ndarray]


@dataclasses.dataclass(frozen=True)
class Rule:
    """ours: a module path ("down0_res1/conv1"); theirs: state-dict prefixes
    ("down_blocks.0.resnets.1.conv1"); kind: one of `KINDS`."""

    ours: str
    theirs: tuple[str, ...]
    kind: str


def rule(ours: str, theirs: str | tuple[str, ...], kind: str) -> Rule:
    return Rule(ours, (theirs,) if isinstance(theirs, str) else tuple(theirs), kind)


def _conv_kernel(w: np.ndarray) -> np.ndarray:
    return np.transpose(w, (*range(2, w.ndim), 1, 0))


def _dense_kernel(w: np.ndarray) -> np.ndarray:
    if w.ndim == 4 and w.shape[2:] == (1, 1):  # a 1x1 convolution used as a linear map
        w = w[:, :, 0, 0]
    return w.T


def _patch_kernel(w: np.ndarray) -> np.ndarray:
    """A p x p stride-p patch convolution [out, in, p, p] as a dense kernel on flattened
    (p_h, p_w, in) patches: [p * p * in, out]."""
    return _conv_kernel(w).reshape(-1, w.shape[0])


def _same(w: np.ndarray) -> np.ndarray:
    return w


def _with_null_row(w: np.ndarray) -> np.ndarray:
    return np.concatenate([w, np.zeros_like(w[:1])], axis=0)


# kind -> {our leaf: (their leaf, layout)}
KINDS = {
    "conv": {"kernel": ("weight", _conv_kernel), "bias": ("bias", _same)},
    "dense": {"kernel": ("weight", _dense_kernel), "bias": ("bias", _same)},
    "patch_conv": {"kernel": ("weight", _patch_kernel), "bias": ("bias", _same)},
    "norm": {"scale": ("weight", _same), "bias": ("bias", _same)},
    "embed": {"embedding": ("weight", _same)},
    "label_embed": {"embedding": ("weight", _with_null_row)},
    "param": {"": ("weight", _same)},
}


def convert(tensors: Tensors, rules: list[Rule], target: Any, source: str) -> dict:
    """The flax parameter tree `target` (a pytree of arrays or ShapeDtypeStructs, our
    network's) filled from `tensors` (their state dict) by `rules`, as float32 NumPy arrays.

    A UserError names the first tensor that is missing, left over or of the wrong shape
    (`source` names the file in messages).
    """
    wanted = {"/".join(k): v.shape for k, v in traverse_util.flatten_dict(target).items()}
    out: dict[str, np.ndarray] = {}
    used: set[str] = set()
    for r in rules:
        for leaf, (their_leaf, layout) in KINDS[r.kind].items():
            path = f"{r.ours}/{leaf}" if leaf else r.ours
            if (
                path not in wanted
                and leaf == "bias"
                and all(f"{p}.bias" not in tensors for p in r.theirs)
            ):
                continue  # a bias-free layer on both sides
            parts = []
            for prefix in r.theirs:
                key = f"{prefix}.{their_leaf}"
                if key not in tensors:
                    raise UserError(f"{source}: no tensor {key!r} (expected for our {path})")
                parts.append(layout(np.asarray(tensors[key], np.float32)))
                used.add(key)
            out[path] = parts[0] if len(parts) == 1 else np.concatenate(parts, axis=-1)
    for path, shape in wanted.items():
        if path not in out:
            raise UserError(f"{source}: nothing in the checkpoint maps to our parameter {path}")
        if out[path].shape != tuple(shape):
            raise UserError(
                f"{source}: our parameter {path} has shape {tuple(shape)}, the checkpoint gives "
                f"{out[path].shape}; the config.json does not describe these weights"
            )
    extra = sorted(set(out) - set(wanted))
    if extra:
        raise UserError(f"{source}: converted weights {extra[:3]} have no place in our network")
    left = sorted(set(tensors) - used)
    if left:
        raise UserError(
            f"{source}: {len(left)} tensors are not used by the conversion (first: {left[:3]}); "
            "the checkpoint has layers our network does not"
        )
    flat = {tuple(p.split("/")): v for p, v in out.items()}
    return jax.tree.map(np.asarray, traverse_util.unflatten_dict(flat))


# Attention names of checkpoints saved before diffusers 0.14 (the DDPM releases among them).
_DEPRECATED_ATTENTION = {
    "query": "to_q",
    "key": "to_k",
    "value": "to_v",
    "proj_attn": "to_out.0",
}


def rename_deprecated_attention(tensors: Tensors, source: str = "") -> Tensors:
    """`tensors` with attention layers' old names (`attentions.0.query.weight`) replaced by
    today's (`attentions.0.to_q.weight`), as diffusers itself does when loading them.
    (`source` is unused: the signature of a family's `prepare`.)"""
    del source
    renamed = {}
    for key, value in tensors.items():
        parts = key.split(".")
        if "attentions" in parts and len(parts) >= 2 and parts[-2] in _DEPRECATED_ATTENTION:
            parts[-2] = _DEPRECATED_ATTENTION[parts[-2]]
        renamed[".".join(parts)] = value
    return renamed
