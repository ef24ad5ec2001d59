"""LoRA adapters of a Stable Diffusion U-Net in diffusers' layout
(`pytorch_lora_weights.safetensors`: PEFT key names `unet.<module>.lora_A.weight` [r, in] and
`.lora_B.weight` [out, r], rank and alpha in the `lora_adapter_metadata` header), read,
written, and merged into our U-Net's weights: W' = W + (alpha / r) B A per adapted layer.

The modules are diffusers' names; which of our parameters each one is comes from the
converter's table (`ddpm.pretrained.unet2d_condition.rules`): a fused projection of ours (k
and v in one kernel) takes each part's update in its own columns.
"""

import json
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from ddpm.config import runs
from ddpm.errors import UserError
from ddpm.pretrained import files, unet2d_condition
from ddpm.pretrained.layout import Rule

PREFIX = "unet."
METADATA = "lora_adapter_metadata"
# module -> {"lora_A": [r, in], "lora_B": [out, r]} float32
Adapters = dict[str, dict[str, np.ndarray]]


def read(path: str) -> tuple[Adapters, float]:
    """(the U-Net's adapters, their scale alpha / r) of a diffusers LoRA file; without
    metadata alpha = r (diffusers' reading). UserError for another layout."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(path, framework="numpy") as f:
            metadata = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"{path} is not a readable safetensors file ({e})") from e
    tensors = files.read_safetensors(path)
    adapters: Adapters = {}
    for key, value in tensors.items():
        module, _, leaf = key.removeprefix(PREFIX).rpartition(".lora_")
        if not key.startswith(PREFIX) or leaf not in ("A.weight", "B.weight"):
            raise UserError(
                f"{path}: tensor {key!r} is not a U-Net LoRA weight in diffusers' PEFT layout "
                "(unet.<module>.lora_A.weight / lora_B.weight); text-encoder LoRAs and other "
                "layouts are not supported"
            )
        adapters.setdefault(module, {})[f"lora_{leaf[0]}"] = np.asarray(value, np.float32)
    ranks = set()
    for module, pair in adapters.items():
        if set(pair) != {"lora_A", "lora_B"} or pair["lora_A"].shape[0] != pair["lora_B"].shape[1]:
            raise UserError(f"{path}: {module} has no matching lora_A [r, in] / lora_B [out, r]")
        ranks.add(pair["lora_A"].shape[0])
    if len(ranks) != 1:
        raise UserError(f"{path}: adapters of several ranks {sorted(ranks)}; one rank expected")
    rank = ranks.pop()
    settings = json.loads(metadata.get(METADATA, "{}"))
    for field in ("rank_pattern", "alpha_pattern"):
        if settings.get(f"unet.{field}"):
            raise UserError(f"{path}: {METADATA} unet.{field} is not supported (empty)")
    if settings.get("unet.use_dora") or settings.get("unet.use_rslora"):
        raise UserError(f"{path}: DoRA / rsLoRA adapters are not supported")
    alpha = float(settings.get("unet.lora_alpha", rank))
    return adapters, alpha / rank


def write(path: str, adapters: Adapters, alpha: float) -> None:
    """A diffusers LoRA file of `adapters` with their rank and `alpha` in its metadata, as
    `StableDiffusionPipeline.save_lora_weights` writes one (diffusers and PEFT load it)."""
    from safetensors.numpy import save_file

    rank = next(iter(adapters.values()))["lora_A"].shape[0]
    # PEFT's target names: the module's last name, to_out.0 for the attention output
    targets = sorted(
        {"to_out.0" if m.endswith("to_out.0") else m.rpartition(".")[2] for m in adapters}
    )
    settings = {
        "unet.r": rank,
        "unet.lora_alpha": alpha,
        "unet.target_modules": targets,
        "unet.peft_type": "LORA",
    }
    tensors = {
        f"{PREFIX}{module}.{leaf}.weight": np.ascontiguousarray(pair[leaf], np.float32)
        for module, pair in adapters.items()
        for leaf in ("lora_A", "lora_B")
    }
    save_file(tensors, path, metadata={"format": "pt", METADATA: json.dumps(settings)})


def unet_table(config: Any) -> list[Rule]:
    """The converter's table (`unet2d_condition.rules`) of the Stable Diffusion U-Net that
    `config.model` describes: which of our parameters each diffusers module is."""
    return unet2d_condition.rules(config.model, runs.input_shape(config)[0], {})


def owners(table: list[Rule]) -> dict[str, tuple[str, int, int]]:
    """{diffusers module: (our kernel's path "a/b/kernel", its part of the columns, number of
    parts)} of the converter's dense layers (`table`); k and v share one kernel of ours."""
    found = {}
    for r in table:
        if r.kind == "dense":
            for i, theirs in enumerate(r.theirs):
                found[theirs] = (f"{r.ours}/kernel", i, len(r.theirs))
    return found


def merge(params: Any, adapters: Adapters, scale: float | jax.Array, table: list[Rule]) -> Any:
    """`params` (our U-Net's tree) with every adapted kernel W + scale (B A)^T in float32, by
    the converter's `table` of our modules against diffusers'. Traceable (adapters may be
    traced; the train step of `ddpm.objectives.lora` merges this way). UserError for an
    adapter on a module the table does not have, or of another shape."""
    merged = {"/".join(k): v for k, v in traverse_util.flatten_dict(params).items()}
    owner = owners(table)
    for module, pair in adapters.items():
        if module not in owner:
            raise UserError(
                f"LoRA adapter on {module!r}: no such dense layer in this U-Net (targets are "
                "attention projections to_q / to_k / to_v / to_out.0, ff, proj_in / proj_out)"
            )
        path, part, parts = owner[module]
        kernel = jnp.asarray(merged[path], jnp.float32)
        width = kernel.shape[-1] // parts
        b, a = jnp.asarray(pair["lora_B"], jnp.float32), jnp.asarray(pair["lora_A"], jnp.float32)
        update = scale * jnp.matmul(b, a, precision="highest").T  # [in, out]
        if update.shape != (kernel.shape[0], width):
            raise UserError(
                f"LoRA adapter on {module!r} is {update.shape[::-1]} (out, in); the layer is "
                f"{(width, kernel.shape[0])}"
            )
        merged[path] = kernel.at[:, part * width : (part + 1) * width].add(update)
    return traverse_util.unflatten_dict({tuple(k.split("/")): v for k, v in merged.items()})


def apply_to(config: Any, params: Any) -> Any:
    """`params` of the U-Net of `config` with `config.pretrained.lora` merged at
    `config.pretrained.lora_scale` times its own scale; unchanged without one."""
    path = config.pretrained.lora
    if path is None:
        return params
    if config.model.get("attention_type") != "transformer":
        raise UserError(
            f"config.pretrained.lora={path!r}: LoRA files adapt a Stable Diffusion U-Net "
            "(an imported pipeline)"
        )
    adapters, scale = read(path)
    host = jax.device_get(params)
    merged = merge(host, adapters, scale * config.pretrained.lora_scale, unet_table(config))
    shardings = jax.tree.map(lambda leaf: leaf.sharding, params)
    return jax.device_put(merged, shardings)
