"""The installed package: `pip install .` into a fresh virtual environment, then the `ddpm`
console script trains, samples, inpaints and edits (img2img) from a folder outside the
checkout, with a recipe copied out of configs/ (recipes import only from the package)."""

import json
import os
import shutil
import site
import subprocess
import venv

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(args: list[str], cwd, env, timeout: float) -> str:
    proc = subprocess.run(
        args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(bin dir, environment) of a fresh venv holding the built package. Its dependencies come
    from this interpreter's site-packages through a .pth file (a second copy of jax would
    cost minutes of downloads); the checkout itself is not on its path."""
    home = tmp_path_factory.mktemp("venv")
    venv.create(home, with_pip=True)
    bin_dir = home / "bin"
    python = bin_dir / "python"
    purelib = _run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        home,
        None,
        60,
    ).strip()
    with open(os.path.join(purelib, "outer.pth"), "w") as f:
        f.write("\n".join(site.getsitepackages()) + "\n")
    build = tmp_path_factory.mktemp("build")
    # Build from a copy so no build artefacts land in the checkout.
    source = build / "src"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(".git", "runs", "*.egg-info"))
    _run(
        [str(python), "-m", "pip", "install", "--quiet", "--no-deps", "."],
        source,
        None,
        600,
    )
    shutil.rmtree(source)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PATH"] = f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"
    return bin_dir, env


def test_console_script_trains_and_samples_outside_the_checkout(installed, tmp_path):
    bin_dir, env = installed
    out = _run(
        [str(bin_dir / "python"), "-c", "import ddpm; print(ddpm.__file__)"], tmp_path, env, 60
    )
    assert "site-packages" in out and not out.strip().startswith(ROOT), out
    shutil.copy(os.path.join(ROOT, "configs", "mnist.py"), tmp_path / "recipe.py")
    tiny = [
        "--config=recipe.py",
        "--workdir=run",
        "--config.data.image_size=16",
        "--config.model.ch=8",
        "--config.model.ch_mult=(1,2)",
        "--config.model.num_groups=4",
        "--config.training.num_steps=3",
        "--config.training.batch_size=8",
        "--config.training.log_every=3",
        "--config.sample.num_steps=2",
        "--config.sample.num_samples=10",
    ]
    ddpm = str(bin_dir / "ddpm")
    _run([ddpm, *tiny], tmp_path, env, 600)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    assert [r["step"] for r in records] == [3] and np.isfinite(records[0]["loss"])
    assert (tmp_path / "run" / "samples" / "step_0000003.png").exists()
    _run([ddpm, *tiny, "--mode=sample"], tmp_path, env, 600)
    images = np.load(tmp_path / "run" / "samples" / "dpm++2m_2.npz")["images"]
    assert images.shape == (10, 16, 16, 1)
    # An editing mode on the image run: img2img of test image 0 (inpainting through the same
    # entry point: tests/test_processes.py).
    edit = ["--config.edit.num_samples=2", "--config.edit.strength=0.5"]
    _run([ddpm, *tiny, *edit, "--mode=img2img"], tmp_path, env, 600)
    row = np.load(tmp_path / "run" / "samples" / "img2img_dpm++2m_2.npz")["images"]
    assert row.shape == (3, 16, 16, 1)  # the input, then 2 results
    assert all(np.abs(r.astype(int) - row[0]).max() > 0 for r in row[1:])
    # A user error through the console script: one line, exit status 2.
    bad = subprocess.run(
        [ddpm, *tiny, "--config.sample.method=ddmi", "--mode=sample"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert bad.returncode == 2, bad.stderr
    assert bad.stderr.strip().splitlines()[-1].startswith("error: config.sample.method='ddmi'")
    assert "Traceback" not in bad.stderr
