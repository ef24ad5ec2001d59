"""Autoguidance (Karras et al., "Guiding a Diffusion Model with a Bad Version of Itself",
NeurIPS 2024): the weaker model that config.sample.guide names, loaded for the samplers.

    config.sample.guide = "step:300"        checkpoint 300 of the run itself (kept on disk)
    config.sample.guide = "runs/mnist_small" another diffusion run: the same process, data and
                                            conditioning, any network (smaller, shorter)

The sampler then forms D_guide + s (D_main - D_guide) with s = config.sample.guidance_scale
(`ddpm.samplers.sample`'s guide_fn), for class-conditional and unconditional models alike.
"""

import jax
import ml_collections

from ddpm import build, runtime
from ddpm.config import runs
from ddpm.errors import UserError

STEP_PREFIX = "step:"


def guide_step(spec: str) -> int | None:
    """The checkpoint step of a "step:N" guide (a UserError if N is not a positive integer);
    None for a workdir path."""
    if not spec.startswith(STEP_PREFIX):
        return None
    text = spec[len(STEP_PREFIX) :]
    if not text.isdigit() or int(text) < 1:
        raise UserError(
            f"config.sample.guide={spec!r}: 'step:N' names a checkpoint step N >= 1 of this "
            "run; otherwise give another run's workdir"
        )
    return int(text)


def _check_compatible(spec: str, guide: ml_collections.ConfigDict, config) -> None:
    """The guide must denoise the same data under the same process and conditioning."""
    if guide.objective != "diffusion":
        raise UserError(
            f"config.sample.guide={spec!r} holds a {guide.objective!r} run; the guide must be "
            "a diffusion run"
        )
    pairs = [
        ("diffusion", guide.diffusion.to_dict(), config.diffusion.to_dict()),
        ("model.num_classes", guide.model.get("num_classes"), config.model.get("num_classes")),
        ("text.source", guide.text.source, config.text.source),
        ("input shape", runs.input_shape(guide), runs.input_shape(config)),
    ]
    for field, theirs, ours in pairs:
        if theirs != ours:
            raise UserError(
                f"config.sample.guide={spec!r}: its {field} is {theirs!r}, this run's {ours!r}; "
                "the guide must be trained on the same process, data and conditioning"
            )


def load(config: ml_collections.ConfigDict, workdir: str, mesh: jax.sharding.Mesh) -> build.Guide:
    """The guide of config.sample.guide for the run in `workdir` (`build.Guide`), its EMA
    parameters laid out like the run's on `mesh`. Bad names or runs: a UserError."""
    spec = config.sample.guide
    step = guide_step(spec)
    if step is not None:
        path, guide_config = workdir, config.copy_and_resolve_references()
    else:
        path, guide_config = spec, runs.load_config(spec)
        _check_compatible(spec, guide_config, config)
    guide_config.phema.sigma_rel = None  # the guide's own EMA, not this run's post-hoc one
    net = build.model(guide_config)
    params, step = build.restore_ema(
        guide_config, path, net, runs.input_shape(guide_config), mesh, step=step
    )
    print(f"Autoguidance by the EMA parameters of step {step} of {path}", flush=True)
    apply = runtime.wrap(net.apply, build.run_runtime(guide_config))
    return build.Guide(apply=apply, process=build.process(guide_config), params=params)
