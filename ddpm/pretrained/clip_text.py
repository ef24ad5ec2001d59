"""transformers' `CLIPTextModel` (Stable Diffusion's text encoder: SD 1.x's CLIP ViT-L/14,
SD 2.x's OpenCLIP ViT-H/14 with its last layer dropped) as our `TextEncoder` with CLIP's
options: causal self-attention, quick-GELU or GELU, the checkpoint's LayerNorm epsilon.

Reads a `text_encoder/` folder (config.json + model.safetensors), with the keys either under
`text_model.` (the releases, saved by transformers 4, with a `position_ids` buffer) or not
(transformers 5). What our encoder cannot express is refused, naming the config.json field.
"""

import functools
import os
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from ddpm.models.context import TextEncoder
from ddpm.pretrained import files, layout
from ddpm.pretrained.clip_tokenizer import ClipTokenizer
from ddpm.pretrained.files import refuse
from ddpm.pretrained.layout import Rule, rule

WEIGHTS = "model.safetensors"
_ACTIVATIONS = ("quick_gelu", "gelu")  # hidden_act values, our TextEncoder's names too


def encoder(cfg: dict, source: str, skip_last: int = 0) -> TextEncoder:
    """Our text encoder of a CLIPTextModel config.json (`cfg`; `source` names it in errors);
    `skip_last` final layers skipped (diffusers' clip_skip)."""
    act = cfg.get("hidden_act", "quick_gelu")
    if act not in _ACTIVATIONS:
        raise refuse(source, "hidden_act", act, f"is not one of {', '.join(_ACTIVATIONS)}")
    width, heads = cfg.get("hidden_size", 512), cfg.get("num_attention_heads", 8)
    if width % heads:
        raise refuse(source, "num_attention_heads", heads, f"must divide hidden_size={width}")
    depth = cfg.get("num_hidden_layers", 12)
    if not 0 <= skip_last < depth:
        raise refuse(
            source, "num_hidden_layers", depth, f"leaves nothing after {skip_last} skipped"
        )
    return TextEncoder(
        vocab_size=cfg.get("vocab_size", 49408),
        width=width,
        length=cfg.get("max_position_embeddings", 77),
        depth=depth,
        num_heads=heads,
        mlp_dim=cfg.get("intermediate_size", 2048),
        activation=act,
        causal=True,
        norm_eps=float(cfg.get("layer_norm_eps", 1e-5)),
        skip_last=skip_last,
    )


def prepare(tensors: layout.Tensors) -> layout.Tensors:
    """The state dict without the `text_model.` prefix and the `position_ids` buffer."""
    stripped = {k.removeprefix("text_model."): v for k, v in tensors.items()}
    stripped.pop("embeddings.position_ids", None)
    return stripped


def rules(depth: int) -> list[Rule]:
    """The module table of our `TextEncoder` against a CLIPTextModel's state dict."""
    table = [
        rule("embed", "embeddings.token_embedding", "embed"),
        rule("pos_embed", "embeddings.position_embedding", "param"),
        rule("norm_out", "final_layer_norm", "norm"),
    ]
    for i in range(depth):
        theirs = f"encoder.layers.{i}"
        table += [
            rule(f"layer{i}_norm1", f"{theirs}.layer_norm1", "norm"),
            rule(f"layer{i}_attn/q", f"{theirs}.self_attn.q_proj", "dense"),
            rule(
                f"layer{i}_attn/kv",
                (f"{theirs}.self_attn.k_proj", f"{theirs}.self_attn.v_proj"),
                "dense",
            ),
            rule(f"layer{i}_attn/proj", f"{theirs}.self_attn.out_proj", "dense"),
            rule(f"layer{i}_norm2", f"{theirs}.layer_norm2", "norm"),
            rule(f"layer{i}_mlp_in", f"{theirs}.mlp.fc1", "dense"),
            rule(f"layer{i}_mlp_out", f"{theirs}.mlp.fc2", "dense"),
        ]
    return table


def load(folder: str, skip_last: int = 0) -> tuple[TextEncoder, dict]:
    """(our text encoder, its parameters as float32 NumPy arrays) of the CLIPTextModel in
    `folder` (a pipeline's `text_encoder/`); UserError for a missing, corrupt or
    inexpressible checkpoint."""
    source = os.path.join(folder, "config.json")
    cfg = files.read_json(source)
    weights = os.path.join(folder, WEIGHTS)
    if not os.path.isfile(weights):
        raise files.missing_weights(folder, weights)
    net = encoder(cfg, source, skip_last)
    tokens = jnp.zeros((1, net.length), jnp.int32)
    target = jax.eval_shape(lambda: net.init(jax.random.key(0), tokens))["params"]
    params = layout.convert(
        prepare(files.read_safetensors(weights)), rules(net.depth), target, weights
    )
    return net, jax.tree.map(np.asarray, params)


@functools.cache
def _prompt_encoder(pipeline: str) -> Callable[[list[str]], np.ndarray]:
    tokenizer = ClipTokenizer(os.path.join(pipeline, "tokenizer"))
    net, params = load(os.path.join(pipeline, "text_encoder"))
    apply = jax.jit(lambda ids: net.apply({"params": params}, ids))
    return lambda prompts: np.asarray(apply(jnp.asarray(tokenizer(prompts))), np.float32)


def encode_prompts(pipeline: str, prompts: list[str]) -> np.ndarray:
    """The last hidden state [N, 77, D] float32 of `prompts` by the tokenizer and text encoder
    of the Stable Diffusion pipeline directory `pipeline` (loaded once per process)."""
    return _prompt_encoder(os.path.abspath(pipeline))(list(prompts))
