"""Input pipeline throughput: images/s of `ddpm.data.create_dataset` on this machine.

One JSON line per figure: the embedded MNIST-5k (padded to 32x32) and a generated folder of
32x32 RGB PNGs (3 classes), each with config.data.num_workers 0 and 2. Start-up (indexing,
worker processes, first batch) is reported apart from the steady-state rate.

    python -m bench.data [--batch_size 128] [--num_batches 200] [--num_files 2000]
"""

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from ddpm import data
from ddpm.config.schema import get_config


def make_folder(root: Path, num_files: int) -> None:
    """num_files random 32x32 RGB PNGs in 3 class folders."""
    rng = np.random.default_rng(0)
    for i in range(num_files):
        path = root / f"class{i % 3}" / f"{i:05d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(path)


def measure(source: str, channels: int, workers: int, batch_size: int, num_batches: int) -> dict:
    config = get_config()
    config.data.update(source=source, channels=channels, num_workers=workers)
    start = time.perf_counter()
    iterator = data.create_dataset(config, "train", batch_size=batch_size, seed=0)
    next(iterator)
    startup = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(num_batches):
        batch = next(iterator)
    elapsed = time.perf_counter() - start
    iterator.close()
    assert batch["image"].shape == (batch_size, 32, 32, channels)
    return {
        "figure": "data_pipeline_images_per_s",
        "source": source.split(":")[0],
        "num_workers": workers,
        "prefetch": config.data.prefetch,
        "batch_size": batch_size,
        "images_per_s": round(num_batches * batch_size / elapsed, 1),
        "startup_s": round(startup, 3),
        "cpus": os.cpu_count(),
        "machine": platform.machine(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument("--num_batches", type=int, default=200)
    parser.add_argument("--num_files", type=int, default=2000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        make_folder(Path(tmp), args.num_files)
        for source, channels in (("mnist5k", 1), (f"folder:{tmp}", 3)):
            for workers in (0, 2):
                result = measure(source, channels, workers, args.batch_size, args.num_batches)
                if source.startswith("folder"):
                    result["num_files"] = args.num_files
                print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
