"""Where a CPU train step spends its time: ours (XLA:CPU, from a `jax.profiler` trace of the
compiled step's thunks) and diffusers' U-Net in eager torch (`torch.profiler`), side by side,
per kind of operation, at each batch size.

    python -m bench.profile_cpu --config=configs.mnist --batches=64,256

Both sides build the train step exactly as `bench.vs_diffusers` does (same network, loss,
optimizer and EMA; fp32; torch on --torch-threads threads). Each step is warmed up, then
--steps steps are traced. One JSON line per (side, batch, kind): ms per step and its share of
the step; then a Markdown table. Kinds: convolution forward, convolution gradients (input
and kernel), matmuls (attention, dense), normalisation, elementwise / fusions, data movement
(copy, transpose, pad, slice), optimizer + EMA, other. XLA fuses elementwise work into its
convolutions and matmuls where it can; torch runs it as separate kernels.
"""

import argparse
import collections
import glob
import gzip
import json
import os
import re
import tempfile
import time
from typing import Any

from bench import vs_diffusers

# Kind of an XLA:CPU thunk, by its HLO instruction name (the trace's event names).
XLA_KINDS = (
    ("conv gradients", re.compile(r"^(convolution|conv).*(bwd|grad|backward|transpose)", re.I)),
    ("convolution", re.compile(r"^(convolution|conv|.*convolution)", re.I)),
    ("matmul", re.compile(r"^(dot|.*dot|gemm|.*matmul|custom-call.*(gemm|matmul))", re.I)),
    ("data movement", re.compile(r"^(copy|transpose|pad|slice|concatenate|dynamic|gather|scatter|broadcast|reshape|bitcast)", re.I)),
    ("reduction", re.compile(r"^(reduce|.*reduce)", re.I)),
    ("elementwise / fusion", re.compile(r"^(fusion|loop_|input_|.*fusion|add|multiply|subtract|divide|exp|select|compare|maximum|minimum|rsqrt|sqrt|negate|log|tanh|logistic|convert)", re.I)),
)
TORCH_KINDS = (
    ("conv gradients", re.compile(r"convolution_backward")),
    ("convolution", re.compile(r"(conv2d|convolution|_convolution|mkldnn_convolution)")),
    ("matmul", re.compile(r"(addmm|^aten::mm$|bmm|matmul|linear|baddbmm|scaled_dot_product|_flash_attention)")),
    ("normalisation", re.compile(r"(group_norm|layer_norm|batch_norm)")),
    ("optimizer + EMA", re.compile(r"(_foreach|adam|lerp|clip_grad|norm$|_amp)")),
    ("data movement", re.compile(r"(copy_|contiguous|permute|transpose|cat|pad|slice|index|view|reshape|to$|clone|empty|zeros|fill_)")),
    ("elementwise / fusion", re.compile(r"(silu|add|mul|sub|div|exp|sqrt|rsqrt|sin|cos|pow|neg|where|sum|mean|sigmoid|softmax|randn|rand|normal|uniform|gelu)")),
)


def kind_of(name: str, kinds) -> str:
    for kind, pattern in kinds:
        if pattern.search(name):
            return kind
    return "other"


def _args(ns, batch: int):
    return argparse.Namespace(
        device="cpu",
        precision="fp32",
        config=ns.config,
        breakdown=False,
        torch_threads=ns.torch_threads,
        batch=batch,
    )


def profile_ours(ns, batch: int) -> tuple[dict[str, float], float, dict[str, float]]:
    """({kind: ms per step}, wall ms per step, {op: ms per step}) of our train step."""
    import jax

    parts, _ = vs_diffusers.ours_worker(_args(ns, batch), {"kind": "train", "batch": batch})
    step = parts["step"]
    for _ in range(2):
        jax.block_until_ready(step())
    with tempfile.TemporaryDirectory() as logdir:
        start = time.perf_counter()
        with jax.profiler.trace(logdir, create_perfetto_trace=True):
            for _ in range(ns.steps):
                jax.block_until_ready(step())
        wall = (time.perf_counter() - start) * 1e3 / ns.steps
        (path,) = glob.glob(os.path.join(logdir, "**", "*perfetto_trace.json.gz"), recursive=True)
        with gzip.open(path) as f:
            trace = json.load(f)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    per_op: dict[str, float] = collections.defaultdict(float)
    for e in events:
        if e.get("ph") != "X" or "dur" not in e:
            continue
        name = e.get("name", "")
        args = e.get("args", {}) or {}
        # XLA:CPU's thunks are the leaf events of the step; the executable's own span and
        # Python's are skipped.
        if "hlo_op" in args or "long_name" in args or _is_thunk(name):
            per_op[args.get("hlo_op", name)] += e["dur"] / 1e3 / ns.steps
    kinds: dict[str, float] = collections.defaultdict(float)
    for op, ms in per_op.items():
        kinds[kind_of(op, XLA_KINDS)] += ms
    return dict(kinds), wall, dict(per_op)


def _is_thunk(name: str) -> bool:
    return bool(re.match(r"^[a-z][a-z0-9_\-.]*\.\d+$|^(fusion|convolution|dot|copy|transpose)", name))


def profile_torch(ns, batch: int) -> tuple[dict[str, float], float, dict[str, float]]:
    """({kind: ms per step}, wall ms per step, {op: ms per step}) of torch's eager step."""
    import torch

    parts, _ = vs_diffusers.torch_worker(_args(ns, batch), {"kind": "train", "batch": batch}, "eager")
    step = parts["step"]
    for _ in range(2):
        step()
    activities = [torch.profiler.ProfilerActivity.CPU]
    start = time.perf_counter()
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(ns.steps):
            step()
    wall = (time.perf_counter() - start) * 1e3 / ns.steps
    per_op = {
        a.key: a.self_cpu_time_total / 1e3 / ns.steps for a in prof.key_averages() if a.self_cpu_time_total
    }
    kinds: dict[str, float] = collections.defaultdict(float)
    for op, ms in per_op.items():
        kinds[kind_of(op, TORCH_KINDS)] += ms
    return dict(kinds), wall, per_op


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs.mnist")
    parser.add_argument("--batches", default="64,256")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--torch-threads", type=int, default=os.cpu_count())
    parser.add_argument("--top", type=int, default=12, help="ops listed per side and batch")
    ns = parser.parse_args()
    rows: list[dict[str, Any]] = []
    for batch in map(int, ns.batches.split(",")):
        for side, fn in (("ours", profile_ours), ("torch", profile_torch)):
            kinds, wall, per_op = fn(ns, batch)
            traced = sum(kinds.values())
            for kind, ms in sorted(kinds.items(), key=lambda kv: -kv[1]):
                row = dict(side=side, batch=batch, kind=kind, ms_per_step=round(ms, 2),
                           share=round(ms / traced, 3), step_ms=round(wall, 1))
                rows.append(row)
                print(json.dumps(row), flush=True)
            top = sorted(per_op.items(), key=lambda kv: -kv[1])[: ns.top]
            print(json.dumps(dict(side=side, batch=batch, top_ops={k: round(v, 2) for k, v in top})), flush=True)
    print(table(rows))


def table(rows: list[dict[str, Any]]) -> str:
    """Markdown: one row per kind, ms per step of ours and torch's at each batch."""
    batches = sorted({r["batch"] for r in rows})
    kinds = sorted({r["kind"] for r in rows})
    get = {(r["side"], r["batch"], r["kind"]): r["ms_per_step"] for r in rows}
    head = "| kind | " + " | ".join(f"ours @{b} | torch @{b}" for b in batches) + " |"
    lines = [head, "|---|" + "---:|---:|" * len(batches)]
    for kind in kinds:
        cells = [f"{get.get((s, b, kind), 0):.1f}" for b in batches for s in ("ours", "torch")]
        lines.append(f"| {kind} | " + " | ".join(cells) + " |")
    walls = {(r["side"], r["batch"]): r["step_ms"] for r in rows}
    cells = [f"{walls.get((s, b), 0):.1f}" for b in batches for s in ("ours", "torch")]
    lines.append("| **step (wall)** | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
