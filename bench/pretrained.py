"""Importing diffusers checkpoints (ddpm.pretrained): agreement with diffusers on the golden
models, and the wall time of `--mode=import` for the real releases' full-size configs.

python -m bench.pretrained [--releases=google/ddpm-cifar10-32,...]

One JSON line per figure. Golden models (tests/assets/diffusers): max |ours - diffusers| of
the outputs recorded from diffusers. Full size: a diffusers directory with the release's
config.json and a safetensors file of zero weights of the recorded state-dict shapes is
written to a temporary folder, then imported end to end (read, convert, write the orbax
checkpoint), as `python main.py --mode=import` does after interpreter start-up.
"""

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time

import jax
import numpy as np
from safetensors.numpy import save_file

from ddpm import pretrained

ASSETS = os.path.join(os.path.dirname(os.path.dirname(__file__)), "tests", "assets", "diffusers")


def emit(**record) -> None:
    print(json.dumps(record), flush=True)


def golden_errors(name: str) -> dict[str, float]:
    """max |ours - diffusers| per recorded output of the golden model `name`."""
    folder = os.path.join(ASSETS, name)
    converted = pretrained.load(folder)
    config, net = converted.config, converted.net
    variables = {"params": converted.params}
    golden = np.load(os.path.join(folder, "golden.npz"))
    if config.objective == "autoencoder":
        mean, logvar = net.apply(variables, golden["x"], method="encode")
        ours = {"mean": mean, "logvar": logvar}
        ours["decoded"] = net.apply(variables, golden["z"], method="decode")
    else:
        ours = {"out": net.apply(variables, golden["x"], golden["t"], golden.get("labels"))}
    count = sum(p.size for p in jax.tree.leaves(variables))
    errors = {k: float(np.abs(np.asarray(v) - golden[k]).max()) for k, v in ours.items()}
    return {"family": converted.model_files.class_name, "parameters": count, **errors}


def import_full_size(repo: str, release: dict, root: str) -> dict:
    folder = os.path.join(root, repo.replace("/", "_").replace(" ", "_"))
    os.makedirs(folder)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(release["config"], f)
    weights = {k: np.zeros(s, np.float32) for k, s in release["shapes"].items()}
    path = os.path.join(folder, "diffusion_pytorch_model.safetensors")
    save_file(weights, path)
    del weights
    start = time.perf_counter()
    with contextlib.redirect_stdout(sys.stderr):  # stdout: the JSON lines alone
        pretrained.import_weights(pretrained.config_for(folder), folder + "_run")
    return {
        "family": release["config"]["_class_name"],
        "parameters": release["unique_parameters"],
        "file_mb": round(os.path.getsize(path) / 2**20),
        "import_s": round(time.perf_counter() - start, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--releases", default="", help="comma-separated; default: all")
    args = parser.parse_args()
    for name in ("unet_ddpm", "unet_class_cond", "vae_kl", "dit"):
        emit(figure="golden_max_abs_error", model=name, **golden_errors(name))
    with open(os.path.join(ASSETS, "full_size_shapes.json")) as f:
        releases = json.load(f)
    wanted = [r for r in args.releases.split(",") if r] or list(releases)
    with tempfile.TemporaryDirectory() as root:
        for repo in wanted:
            emit(
                figure="full_size_import", repo=repo, **import_full_size(repo, releases[repo], root)
            )


if __name__ == "__main__":
    main()
