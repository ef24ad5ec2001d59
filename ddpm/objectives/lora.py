"""LoRA fine-tuning (`config.lora.rank`): the objective of an imported Stable Diffusion
pipeline's run with the U-Net's weights frozen and low-rank adapters the only trained
parameters (Hu et al., 2021; diffusers' `train_text_to_image_lora.py`).

The trained parameters are the adapters in diffusers' PEFT layout, one
{"lora_A": [r, in], "lora_B": [out, r]} float32 pair per adapted module (its dotted name
split into nested keys), so the checkpoints hold only them and the export
(`pytorch_lora_weights.safetensors`, rewritten at every checkpoint from the EMA adapters) is
a rename. A is drawn as PEFT draws it (uniform in +-1/sqrt(in)), B is zero, so training starts
at the base model exactly.

Each step merges W + (alpha / r) B A into the adapted kernels (`ddpm.pretrained.lora.merge`,
traced) and takes the wrapped objective's loss. The network is unchanged; the price is that
the backward pass forms the full gradient of each adapted kernel (as full fine-tuning does
for those layers only) before the adapters'. The optimizer's moments are the adapters'.
"""

import dataclasses
import os
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from ddpm import sharding
from ddpm.errors import UserError
from ddpm.objectives.base import Array, Batch, Objective
from ddpm.pretrained import lora
from ddpm.pretrained.layout import Rule

EXPORT_FILE = "pytorch_lora_weights.safetensors"


def adapted_modules(table: list[Rule], targets: tuple[str, ...]) -> tuple[str, ...]:
    """The diffusers modules of the converter's dense layers (`table`) whose names end in one
    of `targets` ("to_q" matches "...attn1.to_q"), sorted. UserError for a target that
    matches none."""
    owners = lora.owners(table)
    chosen = []
    for target in targets:
        found = [m for m in owners if m == target or m.endswith("." + target)]
        if not found:
            raise UserError(
                f"config.lora.targets names {target!r}, which no dense layer of this U-Net "
                f"ends in (e.g. to_q, to_k, to_v, to_out.0, proj_in, ff.net.2)"
            )
        chosen += found
    return tuple(sorted(set(chosen)))


def nest(adapters: lora.Adapters) -> dict:
    """{module: pair} -> the parameter tree (module names split at dots)."""
    return traverse_util.unflatten_dict(
        {(*m.split("."), leaf): v for m, pair in adapters.items() for leaf, v in pair.items()}
    )


def flatten(tree: Any) -> lora.Adapters:
    """The parameter tree -> {module: {"lora_A", "lora_B"}} (`nest`'s inverse)."""
    adapters: lora.Adapters = {}
    for path, value in traverse_util.flatten_dict(tree).items():
        adapters.setdefault(".".join(path[:-1]), {})[path[-1]] = value
    return adapters


@dataclasses.dataclass(frozen=True, kw_only=True)
class LoRA(Objective):
    """inner: the pipeline run's objective (latent diffusion); frozen: {"base": the U-Net's
    weights, "inner": what `inner` keeps frozen}; table: the converter's rules of the U-Net;
    modules: the adapted diffusers modules."""

    inner: Objective
    table: list[Rule]
    modules: tuple[str, ...]

    @property
    def alpha(self) -> float:
        """config.lora.alpha, which defaults to the rank."""
        return self.config.lora.alpha or self.config.lora.rank

    @property
    def scale(self) -> float:
        """alpha / rank, the factor of B A."""
        return self.alpha / self.config.lora.rank

    def merged(self, params: Any, base: Any) -> Any:
        """The U-Net's weights `base` with the adapters `params` merged (traceable)."""
        return lora.merge(base, flatten(params), self.scale, self.table)

    def init_params(self, rng: Array) -> Any:
        """A ~ U(-1/sqrt(in), 1/sqrt(in)) [r, in], B = 0 [out, r], per adapted module."""
        rank = self.config.lora.rank
        base = traverse_util.flatten_dict(self.frozen["base"], sep="/")
        owners = lora.owners(self.table)
        adapters = {}
        for i, module in enumerate(self.modules):
            path, _, parts = owners[module]
            fan_in, width = base[path].shape[0], base[path].shape[-1] // parts
            bound = 1.0 / np.sqrt(fan_in)
            a = jax.random.uniform(
                jax.random.fold_in(rng, i), (rank, fan_in), jnp.float32, -bound, bound
            )
            adapters[module] = {"lora_A": a, "lora_B": jnp.zeros((width, rank), jnp.float32)}
        return nest(adapters)

    def loss(
        self, params: Any, frozen: Any, batch: Batch, rng: Array, carry: Any = None
    ) -> tuple[Array, dict]:
        del carry
        return self.inner.loss(self.merged(params, frozen["base"]), frozen["inner"], batch, rng)

    def training_grid(self, rng: Array) -> tuple[Callable[[Any, int], Array], int]:
        draw, cols = self.inner.training_grid(rng)
        merge = jax.jit(self.merged)
        return (lambda params, step: draw(merge(params, self.frozen["base"]), step)), cols

    def sampler(self, num: int, **edit: Any) -> Callable[..., Array]:
        """The wrapped objective's sampler: it takes the merged weights (`restore_ema`)."""
        return self.inner.sampler(num, **edit)

    def placed_params(self, mesh: jax.sharding.Mesh) -> Any:
        shapes = jax.eval_shape(self.init_params, jax.random.key(0))
        where = sharding.replicated(mesh)
        return jax.tree.map(
            lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=where), shapes
        )

    def restore_ema(self, workdir: str, mesh: jax.sharding.Mesh) -> tuple[Any, int]:
        adapters, step = super().restore_ema(workdir, mesh)
        return jax.jit(self.merged)(adapters, self.frozen["base"]), step

    def export(self, workdir: str, ema_params: Any) -> None:
        """`pytorch_lora_weights.safetensors` of the EMA adapters (written, then renamed);
        they are replicated, so this process's copy is all of them."""
        path = os.path.join(workdir, EXPORT_FILE)
        adapters = jax.tree.map(lambda a: np.asarray(a.addressable_data(0)), flatten(ema_params))
        lora.write(path + ".tmp", adapters, self.alpha)
        os.replace(path + ".tmp", path)


def create(inner: Objective, mesh: jax.sharding.Mesh) -> LoRA:
    """`inner` (the objective of a Stable Diffusion pipeline's run) with its U-Net frozen at
    the weights of config.pretrained.path (converted, in config.lora.base_dtype, replicated
    on `mesh`) and adapters on config.lora.targets."""
    from ddpm import pretrained  # (imports the objectives' modules)

    config = inner.config
    lo = config.lora
    table = lora.unet_table(config)
    modules = adapted_modules(table, tuple(lo.targets))
    base = pretrained.load(config.pretrained.path).params
    base = jax.tree.map(lambda w: w.astype(jnp.dtype(lo.base_dtype)), base)
    frozen = jax.device_put({"base": base, "inner": inner.frozen}, sharding.replicated(mesh))
    objective = LoRA(
        config=config,
        model=inner.model,
        input_shape=inner.input_shape,
        speed=inner.speed,
        frozen=frozen,
        mesh=mesh,
        inner=inner,
        table=table,
        modules=modules,
    )
    shapes = jax.eval_shape(objective.init_params, jax.random.key(0))
    print(
        f"LoRA: rank {lo.rank}, {sum(s.size for s in jax.tree.leaves(shapes)):,} parameters on "
        f"{len(modules)} modules of the U-Net of {config.pretrained.path} (frozen, "
        f"{lo.base_dtype})",
        flush=True,
    )
    return objective
