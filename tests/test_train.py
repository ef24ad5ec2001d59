"""Training end to end on tiny configs: exact resume, signals, devices, errors (learning and
compile-once of the default process: tests/test_processes.py)."""

import glob
import json
import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from ddpm import generate, sharding, train
from ddpm.errors import UserError
from tests.tiny import step_parts, tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run_tiny(workdir, overrides, *, slow=False) -> subprocess.Popen:
    """`python main.py --config=tests/run_tiny.py --workdir=WORKDIR --config.K=V` for each
    K: V of `overrides` (tests/run_tiny.py), slowed down if `slow`."""
    fields = [f"--config.{k}={v}" for k, v in overrides.items()]
    args = ["-m", "tests.run_tiny", "--config=tests/run_tiny.py", f"--workdir={workdir}", *fields]
    return subprocess.Popen(
        [sys.executable, *args, *(["--slow"] if slow else [])],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": ROOT},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _finish(proc: subprocess.Popen, timeout: float = 300) -> str:
    try:
        out, _ = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:  # timed out: no child outlives the test
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, out
    return out


def _steps(workdir) -> list[int]:
    """Steps of the finished checkpoints (orbax renames `<step>.orbax-checkpoint-tmp` when done)."""
    names = (os.path.basename(p) for p in glob.glob(os.path.join(workdir, "checkpoints", "*")))
    return sorted(int(name) for name in names if name.isdigit())


def _wait_for_checkpoint(workdir, proc, minimum_step: int, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if any(s >= minimum_step for s in _steps(workdir)):
            return
        assert proc.poll() is None, proc.communicate()[0]
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    raise TimeoutError(f"no checkpoint >= {minimum_step} in {workdir}")


def _saved_state(workdir, step: int):
    return ocp.StandardCheckpointer().restore(
        os.path.join(workdir, "checkpoints", str(step), "state")
    )


def test_exact_resume_after_sigkill_and_ctrl_c(tmp_path):
    """`python main.py` on the tiny config, killed (SIGKILL) after a checkpoint, then run
    again and interrupted with Ctrl-C (SIGINT): it saves a checkpoint at the step it reached
    and exits 0 (a single process handles Ctrl-C as a preemption; SIGTERM to a process of a
    2-process job: test_multihost). The same command then resumes from exactly that step, and
    the finished run is bitwise the uninterrupted one, its post-hoc EMA snapshots (every 5
    steps, between checkpoints) included."""
    overrides = {
        "training.num_steps": 40,
        "training.checkpoint_every": 10,
        "phema.track": "(0.05,)",
        "phema.snapshot_every": 5,
    }
    reference, resumed = tmp_path / "reference", tmp_path / "resumed"
    killed = _run_tiny(resumed, overrides, slow=True)
    _wait_for_checkpoint(resumed, killed, 10)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert max(_steps(resumed)) < 40
    # Started once the killed run compiled: the other runs read its programs from the suite's
    # compilation cache instead of compiling them at the same time.
    uninterrupted = _run_tiny(reference, overrides)

    # Signal only once this run wrote a checkpoint of its own (its handler is in place then;
    # the killed run may have written more than step 10 before the kill landed).
    first = max(_steps(resumed)) + 10
    interrupted = _run_tiny(resumed, overrides, slow=True)
    _wait_for_checkpoint(resumed, interrupted, first)
    interrupted.send_signal(signal.SIGINT)
    out = _finish(interrupted)
    assert "SIGINT: saved checkpoint at step" in out, out
    saved_at = int(out.split("SIGINT: saved checkpoint at step ")[1].split(";")[0])
    assert first <= saved_at < 40 and saved_at in _steps(resumed)

    out = _finish(_run_tiny(resumed, overrides))
    assert f"Resumed from checkpoint at step {saved_at}" in out, out
    # metrics.jsonl holds each logged step once although the killed run logged past its last
    # checkpoint and the resumed runs logged those steps again.
    records = [json.loads(line) for line in (resumed / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(5, 41, 5)), records
    _finish(uninterrupted)
    a, b = _saved_state(reference, 40), _saved_state(resumed, 40)
    assert int(b["step"]) == 40 and len(b["phema"]) == 1
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(x, y)  # bitwise identical on CPU
    snapshots = [os.path.join(run, "phema", "snapshots") for run in (reference, resumed)]
    steps = sorted(os.listdir(snapshots[1]), key=int)
    assert steps == [str(s) for s in range(5, 41, 5)] == sorted(os.listdir(snapshots[0]), key=int)
    for step in steps:
        x, y = (
            ocp.StandardCheckpointer().restore(os.path.join(d, step, "default")) for d in snapshots
        )
        for u, v in zip(jax.tree.leaves(x), jax.tree.leaves(y), strict=True):
            np.testing.assert_array_equal(u, v)


def test_four_devices_match_one_device_in_training_and_sampling():
    out = subprocess.run(
        [sys.executable, "-m", "tests.four_devices"],
        cwd=ROOT,
        env={
            **os.environ,
            "PYTHONPATH": ROOT,
            "XLA_FLAGS": f"{os.environ['XLA_FLAGS']} --xla_force_host_platform_device_count=4",
        },
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    # Same global batch, 3 Adam steps at lr <= 1e-3 (warmup): only the order of the gradient
    # all-reduce differs, so parameters agree to float32 rounding, well under 1e-5.
    maxdiff = float(out.stdout.split("maxdiff ")[1].split()[0])
    assert maxdiff < 1e-5, out.stdout
    assert "state on devices: 1" in out.stdout and "state on devices: 4" in out.stdout
    # The sampler on 4 devices: each draws 2 of the 8 samples (every activation has a quarter
    # of the rows it has on one device), and the samples are the one-device ones to float32
    # rounding (the same noise, threefry being partitionable; per-example convolutions and
    # norms). Unclipped, 3 steps from initialisation: the values reach thousands.
    rows = out.stdout.split("sampler rows per device: one ")[1].split()
    assert int(rows[0]) == 4 * int(rows[2]), out.stdout
    sample_diff, scale = (
        float(out.stdout.split(k)[1].split()[0]) for k in ("sample maxdiff", "scale")
    )
    assert sample_diff < 1e-6 * scale, out.stdout
    assert (
        "config.training.batch_size=6 must be a positive multiple of the device count (4"
        in out.stdout
    )


def test_non_finite_loss_stops_without_saving_it(tmp_path):
    config = tiny_config(num_steps=20, learning_rate=1e30, warmup_steps=0, checkpoint_every=1)
    with pytest.raises(
        train.NonFiniteError, match=r"Non-finite loss or gradient at step \d+"
    ) as err:
        train.train_and_evaluate(config, str(tmp_path))
    bad_step = int(str(err.value).split("at step ")[1].split()[0])
    saved = _steps(tmp_path)
    assert saved and max(saved) == bad_step - 1
    for step in saved:
        assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(_saved_state(tmp_path, step)))


def test_runtime_and_free_fields_resume_shape_fields_refuse(tmp_path):
    """The resume check compares what changes parameter shapes or the network's function:
    config.runtime and dropout/dtype/remat may change (a refused run is an error, never an
    overwrite), and a workdir written before the
    per-family model sections (a flat config.model with DiT fields and conv_grad_chunk)
    resumes; a shape field is refused, naming it."""
    train.train_and_evaluate(tiny_config(num_steps=2), str(tmp_path))
    saved = json.loads((tmp_path / "config.json").read_text())
    saved["model"].update(patch_size=2, depth=12, mlp_ratio=4.0, conv_grad_chunk=16)
    del saved["objective"], saved["runtime"]
    (tmp_path / "config.json").write_text(json.dumps(saved))
    resumed = tiny_config(num_steps=4)
    resumed.runtime.conv_grad_chunk, resumed.runtime.group_norm = 2, "flax"
    resumed.model.remat, resumed.model.dropout = True, 0.0
    train.train_and_evaluate(resumed, str(tmp_path))
    assert _steps(tmp_path)[-1] == 4
    for field, value in (
        ("ch", 16),
        ("ch_mult", (1, 1)),
        ("num_classes", None),
        ("learn_sigma", True),
    ):
        refused = tiny_config(num_steps=6)
        refused.model[field] = value
        with pytest.raises(UserError, match=rf"config\.model\.{field}: workdir has"):
            train.train_and_evaluate(refused, str(tmp_path))
    assert _steps(tmp_path)[-1] == 4


def test_sampling_restores_ema_whatever_the_optimizer_section(tmp_path):
    """A run trained with Adam and gradient accumulation samples with another optimizer
    section (AdamW, no accumulation, another FSDP threshold): only the EMA subtree is read,
    and it equals the checkpoint's."""
    config = tiny_config(num_steps=4, optimizer="adam", grad_accum_steps=2, checkpoint_every=4)
    train.train_and_evaluate(config, str(tmp_path))
    other = tiny_config(optimizer="adamw", grad_accum_steps=1, weight_decay=0.1)
    other.training.fsdp_min_size = 1
    objective, mesh = generate.prepare(other, str(tmp_path))
    params, step = generate.restore(objective, str(tmp_path), mesh)
    assert step == 4
    saved = _saved_state(tmp_path, 4)["ema_params"]
    for a, b in zip(jax.tree.leaves(saved), jax.tree.leaves(params), strict=True):
        np.testing.assert_array_equal(a, b)
    # The same samples as with the training config's own optimizer section.
    samples = []
    for sampling_config in (config, other):
        png = generate.sample_from_workdir(sampling_config, str(tmp_path))
        samples.append(np.load(png.replace(".png", ".npz"))["images"])
    assert samples[0].shape == (20, 16, 16, 1)
    np.testing.assert_array_equal(samples[0], samples[1])


def test_sample_mode_writes_grid_and_npz(tmp_path):
    config = tiny_config(num_steps=3)
    train.train_and_evaluate(config, str(tmp_path))
    config.sample.num_samples, config.sample.batch_size = 12, 8  # two batches, one padded
    png = generate.sample_from_workdir(config, str(tmp_path))
    assert png.endswith("samples/ddim_5.png") and os.path.getsize(png) > 0
    saved = np.load(png.replace(".png", ".npz"))
    assert saved["images"].shape == (12, 16, 16, 1) and saved["images"].dtype == np.uint8
    np.testing.assert_array_equal(saved["labels"], [0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5])


def test_sample_mode_without_checkpoint_fails_clearly(tmp_path):
    with pytest.raises(UserError, match="no checkpoint in"):
        generate.sample_from_workdir(tiny_config(), str(tmp_path))


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("training.optimizer", "sgd", "config.training.optimizer='sgd' is not one of adam, adamw"),
        (
            "diffusion.prediction",
            "score",
            "config.diffusion.prediction='score' is not one of eps, x0, v",
        ),
        (
            "training.ema_decay",
            1.0,
            "config.training.ema_decay=1.0 must be a number >= 0 and < 1",
        ),
        ("training.num_steps", 0, "config.training.num_steps=0 must be an int >= 1"),
        ("diffusion.zero_terminal_snr", True, "needs config.diffusion.prediction='v'"),
    ],
)
def test_invalid_config_fields_fail_at_start(tmp_path, field, value, message):
    config = tiny_config()
    section, key = field.split(".")
    config[section][key] = value
    with pytest.raises(
        UserError, match=message.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")
    ):
        train.train_and_evaluate(config, str(tmp_path))
    assert not os.path.exists(tmp_path / "checkpoints")


def test_unknown_config_field_fails(tmp_path):
    config = tiny_config()
    config.training.learning_rat = 1e-3
    with pytest.raises(
        ValueError, match=r"unknown config field\(s\): config.training.learning_rat"
    ):
        train.train_and_evaluate(config, str(tmp_path))


def test_gradient_accumulation_updates_every_k_steps():
    config = tiny_config(
        grad_accum_steps=2, ema_decay=0.5, ema_warmup=False, warmup_steps=0, lr_schedule="constant"
    )
    objective, step_fn, state, mesh = step_parts(config)
    batch = {
        "image": jax.random.uniform(jax.random.key(1), (8, 16, 16, 1), minval=-1, maxval=1),
        "label": jnp.arange(8, dtype=jnp.int32),
    }
    initial = jax.device_get(state)
    after_one, _ = step_fn(state, sharding.global_batch(batch, mesh), objective.frozen)
    after_one = jax.device_get(after_one)
    # The first micro-step only accumulates: parameters and their EMA are unchanged.
    for tree in ("params", "ema_params"):
        for a, b in zip(
            jax.tree.leaves(getattr(initial, tree)),
            jax.tree.leaves(getattr(after_one, tree)),
            strict=True,
        ):
            np.testing.assert_array_equal(a, b)
    after_two, _ = step_fn(
        jax.device_put(after_one, sharding.replicated(mesh)),
        sharding.global_batch(batch, mesh),
        objective.frozen,
    )
    # conv_out: the only layer with a gradient at init, as it is zero-initialised.
    kernel = lambda s: np.asarray(s.params["conv_out"]["kernel"])  # noqa: E731
    assert not np.array_equal(kernel(after_one), kernel(after_two))
    # EMA with decay 0.5 moves half-way to the new parameters on the real update.
    np.testing.assert_allclose(
        after_two.ema_params["conv_out"]["kernel"],
        0.5 * kernel(after_one) + 0.5 * kernel(after_two),
        rtol=1e-5,
        atol=1e-7,
    )
