"""Our CPU train step (or a sampler: ddim50@64) under each `config.runtime.cpu_kernels` and
`conv_grad_chunk` setting, side by side: the measurement behind `cpu_kernels="auto"`.

    python -m bench.cpu_kernels --config=configs.mnist --cases=train@64,train@256 --rounds=2

Each (case, setting) is built in its own process, as `bench.vs_diffusers`' JAX worker builds
it (fp32), warmed up, then timed for --steps calls, --rounds times; the settings take turns
(reversed every round), so a slow minute of a shared machine hits them alike. One JSON line
per (case, setting): images/s of every process and round, and the CPU's model and AVX-512 flag.
"""

import argparse
import json
import os
import subprocess
import sys
import time

SETTINGS = {
    "ynnpack-chunk16": {"cpu_kernels": "ynnpack", "conv_grad_chunk": 16},
    "ynnpack-chunk0": {"cpu_kernels": "ynnpack", "conv_grad_chunk": 0},
    "xla-chunk16": {"cpu_kernels": "xla", "conv_grad_chunk": 16},
    "xla-chunk0": {"cpu_kernels": "xla", "conv_grad_chunk": 0},
}


def measure(ns) -> None:
    """The worker: time one case under one setting; print one JSON line."""
    import jax

    from bench import vs_diffusers

    case = vs_diffusers.parse_case(ns.case)
    args = argparse.Namespace(config=ns.config, precision="fp32", breakdown=False, device="cpu")
    parts, info = vs_diffusers.ours_worker(args, case, runtime=SETTINGS[ns.setting])
    (call,) = parts.values()
    for _ in range(2):
        jax.block_until_ready(call())
    start = time.perf_counter()
    for _ in range(ns.steps):
        out = call()
    jax.block_until_ready(out)
    images = ns.steps * case["batch"] / (time.perf_counter() - start)
    print(json.dumps(dict(images_s=round(images, 2), compile_s=info["compile_s"])))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs.mnist")
    parser.add_argument("--cases", default="train@64,train@256")
    parser.add_argument("--settings", default=",".join(SETTINGS))
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=8, help="timed calls per process")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--case", help=argparse.SUPPRESS)
    parser.add_argument("--setting", help=argparse.SUPPRESS)
    ns = parser.parse_args()
    if ns.worker:
        measure(ns)
        return
    from bench import vs_diffusers
    from ddpm import runtime

    settings = ns.settings.split(",")
    unknown = sorted(set(settings) - set(SETTINGS))
    if unknown:
        sys.exit(f"--settings: {unknown} not among {sorted(SETTINGS)}")
    for case in ns.cases.split(","):
        results: dict[str, list[float]] = {s: [] for s in settings}
        for round_ in range(ns.rounds):
            for setting in settings if round_ % 2 == 0 else settings[::-1]:
                command = [sys.executable, "-m", "bench.cpu_kernels", "--worker"]
                command += [f"--config={ns.config}", f"--case={case}", f"--setting={setting}"]
                command += [f"--steps={ns.steps}"]
                out = subprocess.run(command, capture_output=True, text=True, timeout=1800)
                if out.returncode:
                    sys.exit(f"{case} {setting} failed:\n{out.stderr[-2000:]}")
                results[setting].append(json.loads(out.stdout.splitlines()[-1])["images_s"])
        for setting, figures in results.items():
            line = dict(
                case=case,
                setting=setting,
                images_s=figures,
                **vs_diffusers.machine(),
                avx512=runtime.host_has_avx512(),
                load_1m=round(os.getloadavg()[0], 2),
            )
            print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
