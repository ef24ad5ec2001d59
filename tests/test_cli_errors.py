"""User errors through the real CLI: each bad input exits non-zero within seconds, before any
compile, with one line naming the field or file and no traceback.

The cases run `ddpm.cli.run()` (all that main.py calls) in children forked from one process
with the package imported; one case also runs as a user meets it, in a fresh interpreter."""

import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIME_LIMIT = 30.0  # seconds for a bad input, interpreter start and JAX import included
CASE_LIMIT = 10.0  # seconds for a bad input once the package is imported


def _cases(tmp) -> dict[str, tuple[list[str], str]]:
    """name -> (CLI arguments after main.py, text the error must contain)."""
    w = str(tmp / "w")
    (tmp / "a_file").write_text("not a directory")
    (tmp / "corrupt.npz").write_bytes(b"PK\x03\x04 this is not a zip archive")
    (tmp / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    os.makedirs(tmp / "other_run")
    (tmp / "other_run" / "config.json").write_text(json.dumps({"model": {"name": "unet", "ch": 7}}))
    os.makedirs(tmp / "bad_json")
    (tmp / "bad_json" / "config.json").write_text("{ not json")
    os.makedirs(tmp / "empty")
    os.makedirs(tmp / "images" / "digit")
    (tmp / "images" / "digit" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    truncated = tmp / "pretrained"
    shutil.copytree(os.path.join(ROOT, "tests", "assets", "diffusers", "unet_ddpm"), truncated)
    with open(truncated / "diffusion_pytorch_model.safetensors", "r+b") as f:
        f.truncate(1000)
    sd = os.path.join(ROOT, "tests", "assets", "sd", "sd15")
    for name in ("plain", "captioned"):
        os.makedirs(tmp / name)
        Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(tmp / name / "0.png")
    (tmp / "captioned" / "0.txt").write_text("a black square")
    base = ["--config=configs/mnist.py", f"--workdir={w}"]
    return {
        "schedule": (
            [*base, "--config.diffusion.schedule=cosinus"],
            "config.diffusion.schedule='cosinus' is not one of linear",
        ),
        "process": (
            [*base, "--config.diffusion.process=rectified"],
            "config.diffusion.process='rectified' is not one of ddpm, edm, flow, vpsde",
        ),
        "process_field": (
            [*base, "--config.diffusion.process=vpsde", "--config.diffusion.vpsde.beta_max=0.05"],
            "config.diffusion.vpsde.beta_max=0.05 must be a number > 0.1",
        ),
        "bpd_divergence": (
            [*base, "--mode=eval", "--config.eval.bpd_ode_divergence=hutch"],
            "config.eval.bpd_ode_divergence='hutch' is not one of hutchinson, exact",
        ),
        "method": (
            [*base, "--mode=sample", "--config.sample.method=ddmi"],
            "config.sample.method='ddmi' is not one of ddpm, ddim",
        ),
        "spacing": (
            [*base, "--config.sample.spacing=even"],
            "config.sample.spacing='even' is not one of trailing",
        ),
        "groups": (
            [*base, "--config.model.num_groups=3"],
            "config.model.num_groups=3 does not divide the channel count 16",
        ),
        "batch": ([*base, "--config.training.batch_size=0"], "config.training.batch_size=0"),
        "runtime": (
            [*base, "--config.runtime.group_norm=fastest"],
            "config.runtime.group_norm='fastest' is not one of auto, fast, flax",
        ),
        "text": ([*base, "--config.text.source=clip"], "config.text.source='clip'"),
        "unknown_field": (
            [*base, "--config.model.patch_size=4"],
            "patch_size",
        ),
        "config_file": (["--config=configs/nope.py", f"--workdir={w}"], "configs/nope.py"),
        "folder": (
            [*base, f"--config.data.source=folder:{tmp}/missing"],
            f"config.data.source='folder:{tmp}/missing': no such directory",
        ),
        "corrupt_image": (
            [*base, f"--config.data.source=folder:{tmp}/images"],
            "broken.png",
        ),
        "npz_missing": (
            [*base, f"--config.data.source=npz:{tmp}/none.npz"],
            f"config.data.source='npz:{tmp}/none.npz': no such file",
        ),
        "npz_corrupt": ([*base, f"--config.data.source=npz:{tmp}/corrupt.npz"], "corrupt.npz"),
        "workdir_file": (
            ["--config=configs/mnist.py", f"--workdir={tmp}/a_file"],
            f"--workdir='{tmp}/a_file' is a file",
        ),
        "other_run": (
            ["--config=configs/mnist.py", f"--workdir={tmp}/other_run"],
            "config.model.ch: workdir has 7, new config 16",
        ),
        "corrupt_run_config": (
            ["--config=configs/mnist.py", f"--workdir={tmp}/bad_json", "--mode=sample"],
            f"{tmp}/bad_json/config.json is not a readable run config",
        ),
        "no_checkpoint": (
            ["--config=configs/mnist.py", f"--workdir={tmp}/empty", "--mode=sample"],
            f"no checkpoint in {tmp}/empty/checkpoints",
        ),
        "edit_input": (
            [*base, "--mode=img2img", "--config.edit.input=missing.png"],
            "config.edit.input='missing.png' is neither a test-set index",
        ),
        "edit_mask": (
            [*base, "--mode=inpaint", f"--config.edit.mask={tmp}/corrupt.png"],
            f"config.edit.mask='{tmp}/corrupt.png' is not a readable image",
        ),
        "inception_weights": (
            [*base, "--mode=eval", "--config.eval.metrics=fid"],
            "config.eval.inception_weights=None is not a file",
        ),
        "stage1": (
            [
                *base,
                "--config.objective=latent",
                f"--config.latent.autoencoder_workdir={tmp}/empty",
                "--config.sample.clip_x0=False",
            ],
            f"config.latent.autoencoder_workdir='{tmp}/empty' holds no autoencoder run",
        ),
        "pretrained_dir": (
            ["--mode=import", f"--config=configs/pretrained.py:{tmp}/none", f"--workdir={w}"],
            f"config.pretrained.path='{tmp}/none' is not a directory",
        ),
        "pretrained_weights": (
            ["--mode=import", f"--config=configs/pretrained.py:{truncated}", f"--workdir={w}"],
            "diffusion_pytorch_model.safetensors is not a readable safetensors file",
        ),
        "lora_rank": (
            [*base, "--config.lora.rank=4"],
            "config.lora.rank=4: LoRA adapts the U-Net of a Stable Diffusion pipeline",
        ),
        "uncaptioned": (
            [
                f"--config=configs/pretrained.py:{sd}",
                f"--workdir={w}",
                f"--config.data.source=folder:{tmp}/plain",
            ],
            f"config.data.source='folder:{tmp}/plain' has no captions",
        ),
        "lora_target": (
            [
                f"--config=configs/sd_lora.py:{sd},{tmp}/captioned",
                f"--workdir={w}",
                "--config.lora.targets=('to_q','attn3')",
            ],
            "config.lora.targets names 'attn3'",
        ),
    }


def _run(args: list[str]) -> tuple[int, str, float]:
    """(exit status, stderr + stdout, seconds) of `python ARGS` in the checkout."""
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, *args],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": ROOT},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    return proc.returncode, proc.stderr + proc.stdout, time.perf_counter() - start


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """name -> (exit status, stderr + stdout, seconds, expected text): every case's
    `main.py ARGS` in a child forked from one process that imported the package
    (tests/forked_cli.py), so the seconds exclude the interpreter's start."""
    tmp = tmp_path_factory.mktemp("cli")
    cases = _cases(tmp)
    cases_path, results_path = tmp / "cases.json", tmp / "results.json"
    cases_path.write_text(json.dumps({name: args for name, (args, _) in cases.items()}))
    status, output, _ = _run(["-m", "tests.forked_cli", str(cases_path), str(results_path)])
    assert status == 0, output
    ran = json.loads(results_path.read_text())
    return {name: (*ran[name], cases[name][1]) for name in cases}


CASES = [
    "schedule",
    "method",
    "spacing",
    "groups",
    "batch",
    "runtime",
    "text",
    "unknown_field",
    "config_file",
    "folder",
    "corrupt_image",
    "npz_missing",
    "npz_corrupt",
    "workdir_file",
    "other_run",
    "corrupt_run_config",
    "no_checkpoint",
    "edit_input",
    "edit_mask",
    "inception_weights",
    "stage1",
    "pretrained_dir",
    "pretrained_weights",
    "process",
    "process_field",
    "bpd_divergence",
    "lora_rank",
    "uncaptioned",
    "lora_target",
]


def test_the_table_is_complete(tmp_path):
    assert sorted(_cases(tmp_path)) == sorted(CASES)


@pytest.mark.parametrize("name", CASES)
def test_bad_input_is_one_line_and_a_non_zero_exit(results, name):
    status, output, seconds, expected = results[name]
    print(f"{name}: exit {status} in {seconds:.1f} s: {output.strip().splitlines()[-1:]}")
    assert status != 0, output
    assert "Traceback" not in output, output
    assert expected in output, output
    assert seconds < CASE_LIMIT, seconds
    errors = [line for line in output.splitlines() if line.startswith("error: ")]
    assert status == 2 and len(errors) == 1, output


def test_a_fresh_interpreter_reports_within_the_time_limit(tmp_path):
    """One bad input as a user meets it: `python main.py ...` from a fresh interpreter (the
    start, JAX's import and the config's) exits within TIME_LIMIT, one line, status 2."""
    args, expected = _cases(tmp_path)["no_checkpoint"]
    status, output, seconds = _run(["main.py", *args])
    assert status == 2 and expected in output and "Traceback" not in output, output
    assert [line for line in output.splitlines() if line.startswith("error: ")], output
    assert seconds < TIME_LIMIT, seconds
