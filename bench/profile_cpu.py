"""Where a CPU train step spends its time: ours (XLA:CPU, from a `jax.profiler` trace of the
compiled step's thunks) and diffusers' U-Net in eager torch (`torch.profiler`), side by side,
per kind of operation, at each batch size.

    python -m bench.profile_cpu --config=configs.mnist --batches=64,256

Both sides build the train step as `bench.vs_diffusers` does (same network, loss, optimizer
and EMA; fp32; torch on --torch-threads threads). Each step is warmed up, then --steps steps
are traced. One JSON line per (side, batch, kind): ms per step and its share of the traced
time, with the untraced wall time per step; each side's most expensive operations; then a
Markdown table. XLA fuses elementwise work into larger kernels where it can, torch runs it
as separate operators, so compare the convolution and matmul rows first.
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

_COMPUTATION = re.compile(r"^(?:ENTRY )?%(\S+) .*\{$")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%(\S+) = \S+ ([\w-]+)\(")
_DATA_MOVEMENT = {
    "copy", "transpose", "pad", "slice", "concatenate", "dynamic-slice",
    "dynamic-update-slice", "gather", "scatter", "broadcast", "reshape", "bitcast",
    "tuple", "get-tuple-element",
}  # fmt: skip
# Kind of a torch operator (torch.profiler's self time); the backward of a convolution is
# one operator for both of its gradients. Anything else is elementwise.
TORCH_KINDS = (
    ("conv gradients (both)", re.compile(r"convolution_backward")),
    ("conv forward", re.compile(r"conv2d|convolution")),
    ("matmul", re.compile(r"addmm|aten::mm$|bmm|matmul|linear|scaled_dot_product|attention")),
    ("normalisation", re.compile(r"group_norm|layer_norm|batch_norm")),
    ("optimizer + EMA", re.compile(r"_foreach|adam|lerp|clip_grad")),
    ("reduction", re.compile(r"aten::(sum|mean|norm|var)")),
    ("data movement", re.compile(r"copy_|contiguous|permute|transpose|cat$|pad|slice|index")),
)


def hlo_kinds(text: str) -> dict[str, str]:
    """{instruction name: kind} of a compiled module's HLO text (`compiled.as_text()`), for
    the instructions a trace names (XLA:CPU runs one thunk per instruction of the entry
    computation and of loop bodies). A fusion takes the kind of what it fuses: a convolution
    (forward, input gradient, or kernel gradient, whose window spans the feature map), a dot
    (matmul), a reduction, only copies / transposes (data movement), else elementwise."""
    computations: dict[str, list[tuple[str, str]]] = {}
    current = None
    for line in text.splitlines():
        header = _COMPUTATION.match(line)
        if header:
            current = computations.setdefault(header.group(1), [])
            continue
        found = _INSTRUCTION.match(line)
        if found and current is not None:
            current.append((found.group(2), line))

    def kind(opcode: str, line: str) -> str:
        if opcode == "fusion":
            called = re.search(r"calls=%([\w.\-]+)", line)
            inner = computations.get(called.group(1), []) if called else []
            kinds = {kind(op, text) for op, text in inner if op != "parameter"}
            if "conv forward" in kinds and "transpose(jvp" in line:  # the fusion's metadata
                kinds.add("conv input grad")
            for k in ("conv kernel grad", "conv input grad", "conv forward", "matmul", "reduction"):
                if k in kinds:
                    return k
            return "data movement" if kinds <= {"data movement"} else "elementwise"
        if opcode == "convolution":
            window = re.search(r"window=\{size=(\d+)", line)
            if window is not None and int(window.group(1)) > 3:  # spans the feature map
                return "conv kernel grad"
            return "conv input grad" if "transpose(jvp" in line else "conv forward"
        if opcode == "dot":
            return "matmul"
        if opcode in ("reduce", "reduce-window"):
            return "reduction"
        if opcode in _DATA_MOVEMENT:
            return "data movement"
        if opcode in ("while", "conditional", "call"):
            return "control"  # its body's thunks are traced on their own
        return "elementwise"

    names = {}
    for instructions in computations.values():
        for opcode, line in instructions:
            names[_INSTRUCTION.match(line).group(1)] = kind(opcode, line)
    return names


def torch_kind(name: str) -> str:
    for kind, pattern in TORCH_KINDS:
        if pattern.search(name):
            return kind
    return "elementwise"


def _args(ns, batch: int) -> argparse.Namespace:
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

    executables: dict = {}
    case = {"kind": "train", "batch": batch}
    parts, _ = vs_diffusers.ours_worker(_args(ns, batch), case, executables)
    kinds_of = hlo_kinds(executables["step"].as_text())
    step = parts["step"]
    for _ in range(2):
        jax.block_until_ready(step())
    start = time.perf_counter()
    for _ in range(ns.steps):
        jax.block_until_ready(step())
    wall = (time.perf_counter() - start) * 1e3 / ns.steps
    with tempfile.TemporaryDirectory() as logdir:
        with jax.profiler.trace(logdir, create_perfetto_trace=True):
            for _ in range(ns.steps):
                jax.block_until_ready(step())
        (path,) = glob.glob(os.path.join(logdir, "**", "perfetto_trace.json.gz"), recursive=True)
        with gzip.open(path) as f:
            trace = json.load(f)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    per_op: dict[str, float] = collections.defaultdict(float)
    for e in events:  # the thunks: the events that name their HLO instruction
        op = (e.get("args") or {}).get("hlo_op")
        if e.get("ph") == "X" and op is not None and kinds_of.get(op) != "control":
            per_op[op] += e["dur"] / 1e3 / ns.steps
    kinds: dict[str, float] = collections.defaultdict(float)
    for op, ms in per_op.items():
        kinds[kinds_of.get(op, "other")] += ms
    return dict(kinds), wall, dict(per_op)


def profile_torch(ns, batch: int) -> tuple[dict[str, float], float, dict[str, float]]:
    """({kind: ms per step}, wall ms per step, {op: ms per step}) of torch's eager step."""
    import torch

    case = {"kind": "train", "batch": batch}
    parts, _ = vs_diffusers.torch_worker(_args(ns, batch), case, "eager")
    step = parts["step"]
    for _ in range(2):
        step()
    start = time.perf_counter()
    for _ in range(ns.steps):
        step()
    wall = (time.perf_counter() - start) * 1e3 / ns.steps
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(ns.steps):
            step()
    per_op = {
        a.key: a.self_cpu_time_total / 1e3 / ns.steps
        for a in prof.key_averages()
        if a.self_cpu_time_total
    }
    kinds: dict[str, float] = collections.defaultdict(float)
    for op, ms in per_op.items():
        kinds[torch_kind(op)] += ms
    return dict(kinds), wall, per_op


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
    lines.append("| **step, wall, untraced** | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs.mnist")
    parser.add_argument("--batches", default="64,256")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--torch-threads", type=int, default=os.cpu_count())
    parser.add_argument("--top", type=int, default=8, help="operations listed per side, batch")
    ns = parser.parse_args()
    rows: list[dict[str, Any]] = []
    for batch in map(int, ns.batches.split(",")):
        for side, fn in (("ours", profile_ours), ("torch", profile_torch)):
            kinds, wall, per_op = fn(ns, batch)
            traced = sum(kinds.values())
            for kind, ms in sorted(kinds.items(), key=lambda kv: -kv[1]):
                row = dict(
                    side=side,
                    batch=batch,
                    kind=kind,
                    ms_per_step=round(ms, 2),
                    share=round(ms / traced, 3),
                    step_ms=round(wall, 1),
                )
                rows.append(row)
                print(json.dumps(row), flush=True)
            top = sorted(per_op.items(), key=lambda kv: -kv[1])[: ns.top]
            top_ops = {k: round(v, 2) for k, v in top}
            print(json.dumps(dict(side=side, batch=batch, top_ops=top_ops)), flush=True)
    print(table(rows))


if __name__ == "__main__":
    main()
