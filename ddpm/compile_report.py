"""What a program compiled for a TPU costs on one of its devices: memory against the chip's
HBM, FLOPs and bytes per call, the roofline bound on its time, and its collectives.

Everything is read from the compiled program itself: XLA's `memory_analysis()` and
`cost_analysis()` and the collectives in its HLO text (`compiled.as_text()`). The chip
figures (`CHIPS`) are the vendor's published ones, each with its source; HBM capacities are
binary (the pages' "16 GB" of v5e is 16 GiB), and XLA:TPU's own limit, which decides whether
a program compiles, is a little lower (v5e: 15.75 GiB, as its out-of-memory error states).
All figures are per device: one device per chip on v5e, v5p and v6e; two on v4, one per
TensorCore, which then gets half the chip's HBM, FLOP/s and bandwidth.
"""

import dataclasses
import math
import re
from collections.abc import Sequence
from typing import Any

import jax

from ddpm.errors import UserError

GB = 1e9
GIB = 2**30


@dataclasses.dataclass(frozen=True)
class Chip:
    """A TPU generation's published per-chip figures: HBM capacity (bytes), peak bf16 FLOP/s,
    HBM bandwidth (bytes/s), and the page that states them."""

    name: str
    hbm_bytes: float
    peak_flops: float
    hbm_bandwidth: float
    source: str


# Keyed by jax's `device.device_kind`.
CHIPS = {
    "TPU v4": Chip("v4", 32 * GIB, 275e12, 1200 * GB, "https://cloud.google.com/tpu/docs/v4"),
    "TPU v5 lite": Chip("v5e", 16 * GIB, 197e12, 819 * GB, "https://cloud.google.com/tpu/docs/v5e"),
    "TPU v5": Chip("v5p", 95 * GIB, 459e12, 2765 * GB, "https://cloud.google.com/tpu/docs/v5p"),
    "TPU v6 lite": Chip(
        "v6e", 32 * GIB, 918e12, 1638 * GB, "https://cloud.google.com/tpu/docs/v6e"
    ),
}

COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")
# Bits per element of the HLO element types a collective can carry.
_BITS = {
    "pred": 8,
    "s4": 4,
    "u4": 4,
    "s8": 8,
    "u8": 8,
    "f8e4m3fn": 8,
    "f8e5m2": 8,
    "s16": 16,
    "u16": 16,
    "f16": 16,
    "bf16": 16,
    "s32": 32,
    "u32": 32,
    "f32": 32,
    "s64": 64,
    "u64": 64,
    "f64": 64,
    "c64": 64,
    "c128": 128,
}
_ARRAY = re.compile(rf"\b({'|'.join(sorted(_BITS, key=len, reverse=True))})\[([\d,]*)\]")
_COMPUTATION = re.compile(r"^(?:ENTRY )?%(\S+) ")
_OP = "|".join(COLLECTIVES)
_INSTRUCTION = re.compile(rf"^\s+(?:ROOT )?%\S+ = (.+?) ({_OP})(-start)?\(")
# XLA:TPU emits a reduce-scatter as a fusion of an all-reduce and a slice.
_REDUCE_SCATTER = "all-reduce-scatter"
_FUSED_REDUCE_SCATTER = re.compile(
    rf"^\s+(?:ROOT )?%\S+ = (.+?) fusion\(.*calls=%{_REDUCE_SCATTER}(?:[.,\s]|$)"
)


@dataclasses.dataclass(frozen=True)
class Budget:
    """What one device of a slice has: its chip, and the chip's share per device."""

    chip: Chip
    device_kind: str
    devices_per_chip: int

    @property
    def hbm_bytes(self) -> float:
        return self.chip.hbm_bytes / self.devices_per_chip

    @property
    def peak_flops(self) -> float:
        return self.chip.peak_flops / self.devices_per_chip

    @property
    def hbm_bandwidth(self) -> float:
        return self.chip.hbm_bandwidth / self.devices_per_chip

    def describe(self) -> dict[str, Any]:
        """The chip's figures (per chip), its device kind and devices per chip."""
        return {
            **dataclasses.asdict(self.chip),
            "device_kind": self.device_kind,
            "devices_per_chip": self.devices_per_chip,
        }


def budget(devices: Sequence[Any]) -> Budget:
    """The `Budget` of a slice's devices (a UserError for a chip missing from `CHIPS`)."""
    kind = devices[0].device_kind
    if kind not in CHIPS:
        names = ", ".join(f"{c.name} ({k})" for k, c in CHIPS.items())
        raise UserError(f"no figures for {kind!r} devices; the chip table has {names}")
    cores = len({getattr(d, "core_on_chip", 0) for d in devices})
    return Budget(CHIPS[kind], kind, cores)


def _elements(type_text: str) -> list[str]:
    """Top-level elements of an HLO tuple type "(a, (b, c), d)"; [type_text] for an array."""
    text = re.sub(r"/\*.*?\*/", "", type_text).strip()
    if not text.startswith("("):
        return [text]
    parts, depth, start = [], 0, 1
    for i, char in enumerate(text):
        if char in "([{":
            depth += 1
        elif char in ")]}":
            depth -= 1
        elif char == "," and depth == 1:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:-1])
    return parts


def array_bytes(type_text: str) -> int:
    """Bytes of the arrays of an HLO type ("f32[3,3,8]{...}" or a tuple of them); padding of
    the device layout is not counted."""
    bits = sum(
        _BITS[dtype] * math.prod(int(n) for n in dims.split(",") if n)
        for dtype, dims in _ARRAY.findall(type_text)
    )
    return bits // 8


def collectives(hlo_text: str) -> dict[str, dict[str, int]]:
    """{kind: {"count", "bytes"}} of the collectives in a compiled module's HLO text.

    count: instructions in the text (one inside a loop body counts once); bytes: the sizes of
    their results on one device (an all-gather's gathered array, a reduce-scatter's
    scattered piece). An asynchronous pair (-start / -done) counts once.
    """
    found = {kind: {"count": 0, "bytes": 0} for kind in COLLECTIVES}
    in_reduce_scatter = False
    for line in hlo_text.splitlines():
        header = _COMPUTATION.match(line)
        if header:
            in_reduce_scatter = header.group(1).startswith(_REDUCE_SCATTER)
            continue
        match = _INSTRUCTION.match(line)
        if match and not in_reduce_scatter:
            type_text, kind, start = match.groups()
            if start and kind in ("all-gather", "collective-permute"):
                type_text = _elements(type_text)[1]  # (operands, results, ...)
        elif fused := _FUSED_REDUCE_SCATTER.match(line):
            type_text, kind = fused.group(1), "reduce-scatter"
        else:
            continue
        found[kind]["count"] += 1
        found[kind]["bytes"] += array_bytes(type_text)
    return found


def shard_bytes(tree: Any) -> int:
    """Bytes one device holds of the arrays of `tree` (`jax.ShapeDtypeStruct`s or arrays with
    shardings): the largest shard of each."""
    return sum(
        math.prod(leaf.sharding.shard_shape(leaf.shape)) * leaf.dtype.itemsize
        for leaf in jax.tree.leaves(tree)
    )


def program(
    compiled: jax.stages.Compiled, where: Budget, lower_s: float, compile_s: float
) -> dict[str, Any]:
    """Memory, cost, roofline and collectives of one device's share of `compiled`.

    memory total = arguments + outputs - aliased (donated) + temporaries + generated code,
    XLA's static figure, against the device's share of HBM (the runtime reserves some of it
    too). The roofline bound is max(flops / peak bf16 FLOP/s, bytes accessed / HBM
    bandwidth): a lower bound on the time of one call, not a measurement; collectives'
    time is not in it, and a loop body's cost is counted once by XLA's cost analysis.
    """
    memory = compiled.memory_analysis()
    total = (
        memory.argument_size_in_bytes
        + memory.output_size_in_bytes
        - memory.alias_size_in_bytes
        + memory.temp_size_in_bytes
        + memory.generated_code_size_in_bytes
    )
    cost = compiled.cost_analysis()
    flops, accessed = float(cost["flops"]), float(cost["bytes accessed"])
    compute_s = flops / where.peak_flops
    memory_s = accessed / where.hbm_bandwidth
    return {
        "memory": {
            "arguments": memory.argument_size_in_bytes,
            "outputs": memory.output_size_in_bytes,
            "aliased": memory.alias_size_in_bytes,
            "temporaries": memory.temp_size_in_bytes,
            "generated_code": memory.generated_code_size_in_bytes,
            "total": total,
            "hbm": where.hbm_bytes,
            "fits": total <= where.hbm_bytes,
        },
        "cost": {
            "flops": flops,
            "bytes_accessed": accessed,
            "arithmetic_intensity": flops / max(accessed, 1.0),
            "ridge_intensity": where.peak_flops / where.hbm_bandwidth,
            "compute_time_s": compute_s,
            "memory_time_s": memory_s,
            "time_lower_bound_s": max(compute_s, memory_s),
            "limited_by": "compute" if compute_s >= memory_s else "memory bandwidth",
        },
        "collectives": collectives(compiled.as_text()),
        "lower_s": lower_s,
        "compile_s": compile_s,
    }


def size(n: float) -> str:
    """Bytes in GiB, MiB or KiB."""
    for unit, scale in (("GiB", GIB), ("MiB", 2**20)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n / 2**10:.1f} KiB"


def format_program(name: str, report: dict[str, Any]) -> list[str]:
    """A few lines on one compiled program (`program`'s dict)."""
    m, c = report["memory"], report["cost"]
    verdict = "fits" if m["fits"] else "does NOT fit"
    moved = [
        f"{kind} {v['count']} ({size(v['bytes'])})"
        for kind, v in report["collectives"].items()
        if v["count"]
    ]
    return [
        f"{name} memory per device: arguments {size(m['arguments'])}, outputs "
        f"{size(m['outputs'])} ({size(m['aliased'])} of them donated), temporaries "
        f"{size(m['temporaries'])}, code {size(m['generated_code'])}; total {size(m['total'])} "
        f"of {size(m['hbm'])} HBM: {verdict}",
        f"{name} per device: {c['flops']:.3g} FLOP, {c['bytes_accessed']:.3g} bytes accessed, "
        f"{c['arithmetic_intensity']:.1f} FLOP/byte (ridge {c['ridge_intensity']:.0f}): "
        f"{c['limited_by']}-bound; roofline lower bound {c['time_lower_bound_s'] * 1e3:.2f} ms "
        "(a bound from peak figures, not a measurement)",
        f"{name} collectives: {', '.join(moved) or 'none'}",
        f"{name} compiled in {report['compile_s']:.1f} s (lowered in {report['lower_s']:.1f} s)",
    ]


def format_chip(where: Budget) -> str:
    """One line: the chip figures used, and their source."""
    c = where.chip
    share = f", shared by {where.devices_per_chip} devices" if where.devices_per_chip > 1 else ""
    return (
        f"Chip {c.name} ({where.device_kind}): {size(c.hbm_bytes)} HBM, "
        f"{c.peak_flops / 1e12:.0f} TFLOP/s bf16, {c.hbm_bandwidth / GB:.0f} GB/s{share} "
        f"({c.source})"
    )
