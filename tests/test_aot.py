"""--mode=compile (`ddpm.aot`): a tiny DiT's train step compiled for a TPU v5e slice (v5e:2x2)
on this CPU, the report checked against the compiled program and against figures counted by
hand from the network's shapes; the collective parser on a hand-written HLO text.

One compile of about ten seconds (the train step and the sampler); the compile tests are
skipped where libtpu is not installed.
"""

import importlib.util
import json
import os

import pytest

from ddpm import aot, compile_report
from ddpm.config import presets
from ddpm.errors import UserError
from tests.tiny import tiny_config

# libtpu lets one process at a time load it (/tmp/libtpu_lockfile); this process only
# compiles, so it need not wait for another compile on the same machine.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

needs_libtpu = pytest.mark.skipif(
    importlib.util.find_spec("libtpu") is None,
    reason="libtpu is not installed (pip install '.[tpu]'); XLA:TPU compiles with it",
)

TOPOLOGY, DEVICES, FSDP = "v5e:2x2", 4, 2
BATCH, SIZE, PATCH, WIDTH = 8, 16, 4, 32  # 16x16x1 digits, 4x4 patches: 16 tokens
V5E_HBM, V5E_FLOPS, V5E_BANDWIDTH = 16 * 2**30, 197e12, 819e9  # cloud.google.com/tpu/docs/v5e


def tiny_dit():
    """The tiny run's data and training (batch 8), a one-block DiT of width 32 on 4x4 patches,
    every parameter split over fsdp=2 devices."""
    config = tiny_config(batch_size=BATCH, fsdp=FSDP, fsdp_min_size=0)
    config.model = presets.mnist_dit()
    config.model.update(patch_size=PATCH, hidden_size=WIDTH, depth=1, num_heads=2)
    return config


def _dense(inputs: int, outputs: int) -> int:
    return inputs * outputs + outputs


def dit_parameters(d: int, depth: int, patch_in: int, classes: int, freqs: int = 128) -> int:
    """Parameters of the DiT: patch embedding, time MLP (sin-cos of 2 freqs), label table with
    a null row, per block adaLN (6d), qkv, projection and a 4x MLP, final adaLN and linear."""
    block = _dense(d, 6 * d) + _dense(d, 3 * d) + _dense(d, d) + _dense(d, 4 * d)
    block += _dense(4 * d, d)
    embed = _dense(patch_in, d) + _dense(2 * freqs, d) + _dense(d, d) + (classes + 1) * d
    return embed + depth * block + _dense(d, 2 * d) + _dense(d, patch_in)


def dit_forward_flops(d: int, depth: int, tokens: int, patch_in: int, freqs: int = 128) -> int:
    """2 x the multiply-adds of the DiT's matrix products for one example."""
    macs = tokens * patch_in * d + 2 * freqs * d + d * d  # patch embedding, time MLP
    per_block = 6 * d * d + tokens * (3 + 1 + 8) * d * d + 2 * tokens * tokens * d
    macs += depth * per_block + 2 * d * d + tokens * d * patch_in
    return 2 * macs


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("aot")
    return aot.compile_for_topology(tiny_dit(), str(workdir), TOPOLOGY, sampler=True), workdir


@needs_libtpu
def test_memory_per_device(result):
    result, _ = result
    report, compiled = result.report, result.train_step.compiled
    memory = report["train_step"]["memory"]
    count = dit_parameters(WIDTH, 1, PATCH * PATCH, classes=10)
    assert report["parameters"] == count
    assert report["mesh"] == {"data": DEVICES // FSDP, "fsdp": FSDP}
    # Every array has an even axis, so each device holds half of each: float32 / fsdp.
    assert memory["params"] == memory["ema_params"] == count * 4 // FSDP
    assert 2 * memory["params"] <= memory["opt_state"] <= 2 * memory["params"] + 64  # m, v, counts
    xla = compiled.memory_analysis()
    batch = BATCH // DEVICES * (SIZE * SIZE * 4 + 4)  # float32 images, int32 labels
    # TPU layouts pad arrays to tiles: the arguments hold at least the state and the batch.
    assert memory["arguments"] == xla.argument_size_in_bytes >= memory["train_state"] + batch
    assert 0 < memory["aliased"] <= memory["outputs"]  # the state is donated
    assert memory["total"] == (
        xla.argument_size_in_bytes
        + xla.output_size_in_bytes
        - xla.alias_size_in_bytes
        + xla.temp_size_in_bytes
        + xla.generated_code_size_in_bytes
    )
    assert memory["hbm"] == V5E_HBM and memory["fits"] and report["fits"]
    assert report["layouts"] == [
        {"fsdp": FSDP, "remat": False, "outcome": "compiled", "total": memory["total"]}
    ]


@needs_libtpu
def test_flops_and_roofline(result):
    result, _ = result
    cost = result.report["train_step"]["cost"]
    assert cost["flops"] == result.train_step.compiled.cost_analysis()["flops"]
    # Forward and backward (twice the forward's products) of this device's 2 examples.
    products = 3 * dit_forward_flops(WIDTH, 1, (SIZE // PATCH) ** 2, PATCH * PATCH)
    products *= BATCH // DEVICES
    assert 1.0 <= cost["flops"] / products <= 2.0
    bound = max(cost["flops"] / V5E_FLOPS, cost["bytes_accessed"] / V5E_BANDWIDTH)
    assert cost["time_lower_bound_s"] == pytest.approx(bound)
    assert cost["limited_by"] == "memory bandwidth"  # far below v5e's 240 FLOP/byte


@needs_libtpu
def test_sampler_splits_its_rows_over_the_devices(result):
    """The tiny config's sampler: 20 samples, DDIM with guidance (the conditional and the
    unconditional half in one call: 40 rows), split over the 4 devices as sampling on the
    training mesh splits them: 10 rows per device per call. XLA's cost analysis counts the
    scan's body (one step) once; on every device the whole batch would be 4x as much."""
    result, _ = result
    config = tiny_dit()
    assert (config.sample.num_samples, config.sample.method) == (20, "ddim")
    assert config.sample.guidance_scale != 1
    flops = result.report["sampler"]["cost"]["flops"]
    assert flops == result.sampler.compiled.cost_analysis()["flops"]
    products = 2 * 20 // DEVICES * dit_forward_flops(WIDTH, 1, (SIZE // PATCH) ** 2, PATCH**2)
    assert 1.0 <= flops / products <= 2.0


@needs_libtpu
def test_collectives_of_fsdp(result):
    result, _ = result
    found = result.report["train_step"]["collectives"]
    text = result.train_step.compiled.as_text()
    gathers = sum(
        f" all-gather{start}(" in line for line in text.splitlines() for start in ("", "-start")
    )
    assert found["all-gather"]["count"] == gathers > 0  # split parameters gathered for use
    assert found["all-gather"]["bytes"] > 0
    # Each device receives the sum over all devices of its shard of the gradient.
    reduced = found["all-reduce"]["bytes"] + found["reduce-scatter"]["bytes"]
    assert reduced >= result.report["train_step"]["memory"]["params"]


@needs_libtpu
def test_report_files(result):
    result, workdir = result
    stem = os.path.join(workdir, "compile", "v5e_2x2")
    with open(stem + ".json") as f:
        assert json.load(f) == json.loads(json.dumps(result.report))
    with open(stem + ".hlo.txt") as f:
        assert f.read() == result.train_step.compiled.as_text()


@needs_libtpu
def test_bad_topologies_are_user_errors():
    with pytest.raises(UserError, match="needs --topology"):
        aot.topology_devices(None)
    with pytest.raises(UserError, match="'v5e:3x3' is not a slice libtpu knows"):
        aot.topology_devices("v5e:3x3")
    with pytest.raises(UserError, match="no figures for 'TPU v3' devices"):
        compile_report.budget(aot.topology_devices("v3:2x2"))


HLO = """HloModule m

%all-reduce-scatter.1 (input_0: f32[8,4]) -> f32[4,4] {
  %input_0 = f32[8,4]{1,0} parameter(0)
  %all-reduce.2 = f32[8,4]{1,0:T(8,128)} all-reduce(%input_0), channel_id=1, to_apply=%add
  ROOT %dynamic-slice.1 = f32[4,4]{1,0} dynamic-slice(%all-reduce.2, %i, %j)
}

ENTRY %main (p0: bf16[2,16], p1: f32[8,4]) -> f32[] {
  %p0 = bf16[2,16]{1,0:T(8,128)(2,1)} parameter(0)
  %all-gather.1 = bf16[4,16]{1,0:T(8,128)(2,1)} all-gather(%p0), dimensions={0}
  %all-gather-start.2 = (bf16[2,16]{1,0}, bf16[4,16]{1,0}) all-gather-start(%p0), dimensions={0}
  %all-gather-done.2 = bf16[4,16]{1,0} all-gather-done(%all-gather-start.2)
  %all-reduce.3 = (f32[]{:T(128)}, f32[3]{0}, /*index=2*/s32[2]{0}) all-reduce(%a, %b, %c)
  %all-reduce-start.4 = f32[5]{0} all-reduce-start(%x), to_apply=%add
  %all-reduce-done.4 = f32[5]{0} all-reduce-done(%all-reduce-start.4)
  %fusion.9 = f32[4,4]{1,0} fusion(%p1), kind=kCustom, calls=%all-reduce-scatter.1
  %collective-permute-start.1 = (u32[1]{0}, u32[1]{0}, u32[], u32[]) collective-permute-start(%q)
  %collective-permute-done.1 = u32[1]{0} collective-permute-done(%collective-permute-start.1)
  %all-to-all = f32[2,1,8]{2,1,0} all-to-all(%r), dimensions={0}
  ROOT %add.1 = f32[] add(%all-gather.1, %all-reduce.3)
}
"""


def test_collectives_parsed_from_hlo_text():
    assert compile_report.collectives(HLO) == {
        "all-gather": {"count": 2, "bytes": 2 * 4 * 16 * 2},  # sync, and a -start's result
        "reduce-scatter": {"count": 1, "bytes": 4 * 4 * 4},  # XLA:TPU's fused form
        "all-reduce": {"count": 2, "bytes": (1 + 3 + 2) * 4 + 5 * 4},
        "all-to-all": {"count": 1, "bytes": 16 * 4},
        "collective-permute": {"count": 1, "bytes": 4},
    }


def test_fit_order_and_its_bound():
    assert aot.fit_layouts(4) == [
        (1, False),
        (2, False),
        (4, False),
        (1, True),
        (2, True),
        (4, True),
    ]
    # 20 GB at fsdp=1, of which the state (8 GB) and gradients and updates (2 x 2 GB) shrink:
    # at fsdp=4 to a quarter, 3 GB; the 8 GB that do not shrink remain.
    memory = {"total": 20e9, "train_state": 8e9, "ema_params": 2e9}
    assert aot.least_total(memory, 1, 4) == pytest.approx(8e9 + 12e9 / 4)
