"""Side by side against Hugging Face diffusers (PyTorch): train-step and sampling images/s of
this project's U-Net and of a `diffusers.UNet2DModel` built to the same architecture, in the
same run on the same machine. One JSON line per figure.

python -m bench.vs_diffusers [--config=configs.mnist_ddpm] [--device=cpu|cuda]
    [--cases=train@16,train@64,ddim50@16,dpm++2m20@16] [--torch=eager,compile]
    [--precision=fp32|tf32|bf16] [--rounds=3] [--round-seconds=3] [--torch-threads=2]
    [--breakdown] [--setup=sequential|parallel] [--setup-timeout=S]

Fairness: every (case, side) runs in its own worker process, set up (compiled, warmed up)
one after the other (on a GPU all at once by default, to save device time: compile times
then overlap); then the driver asks each worker in turn for one timed round, reversing
the order every round, and reports the median of the rounds. A round is a fixed number of
calls (chosen once per worker so a round lasts about --round-seconds). Torch workers run with
OMP_WAIT_POLICY=PASSIVE and torch.set_num_threads(--torch-threads), so an idle OpenMP pool
does not spin against the other worker. Needs torch and diffusers (bench/requirements.txt).
A worker that fails or misses `--setup-timeout` gets a `<case>/setup_failed` line and the
case goes on without it; a case whose worker dies mid-round gets `<case>/failed`.

Cases: `train@B` is one full training step at batch B (ours: `ddpm.train.make_train_step`:
the config's loss, grad clip, Adam, EMA; theirs: the same loss, `clip_grad_norm_`,
`torch.optim.Adam`, a foreach EMA). `METHOD{N}@B` (ddim, dpm++2m) samples B images with N steps
(ours: `ddpm.build.sampler`, one jitted lax.scan; theirs: a Python loop over `UNet2DModel` and
the diffusers scheduler of the config's process, `torch_scheduler`: DDIM / DPM-Solver++ with our
betas for DDPM, the flow-matching Euler scheduler / DPM-Solver++ on flow sigmas for a flow, the
EDM Euler / DPM-Solver++ schedulers for EDM). Class-conditional, no guidance. The torch train
step draws the process's own loss (`torch_noising`). `--breakdown` adds train figures for the
objective's loss alone (`train_fwd`) and loss + gradients (`train_fwdbwd`), to see where the
time goes.

Efficiency: each train case also gets `<figure>_b<B>/efficiency` lines: the FLOPs of our
call (XLA's cost analysis of the lowered computation) per second at the median round, as a
fraction of a large matmul's FLOP/s measured in the same worker and precision, and of the
device's datasheet dense peak where it is known (H100, H200).

Torch variants (`--torch`): eager, compile (torch.compile), compile-ro (mode="reduce-overhead",
CUDA graphs; GPU only). `--precision`: fp32 (JAX matmul precision "highest", no TF32 in torch),
tf32 (JAX default precision, torch TF32 on), bf16 (our config.model.dtype=bfloat16 vs torch
bf16 autocast). On the CPU only fp32 is meaningful.
"""

import argparse
import importlib
import json
import math
import os
import platform
import re
import resource
import signal
import statistics
import subprocess
import sys
import threading
import time
from typing import Any

import numpy as np

CASE_RE = re.compile(r"^(train|ddim|dpm\+\+2m)(\d*)@(\d+)$")
TORCH_VARIANTS = ("eager", "compile", "compile-ro")
PREFIX = "@@"  # marks protocol lines on a worker's stdout (libraries may print there too)


# --------------------------------------------------------------------------------------------
# Cases and the shared architecture description.


def parse_case(spec: str) -> dict[str, Any]:
    """'train@16' -> {kind: train, batch: 16}; 'ddim50@16' -> {kind: sample, method: ddim,
    steps: 50, batch: 16}."""
    match = CASE_RE.match(spec)
    if not match:
        raise ValueError(
            f"--cases entry {spec!r} is not train@B, ddimN@B or dpm++2mN@B (e.g. ddim50@16)"
        )
    what, steps, batch = match.groups()
    if what == "train":
        return {"kind": "train", "batch": int(batch), "name": f"train_b{batch}"}
    if not steps:
        raise ValueError(f"--cases entry {spec!r} needs a step count, e.g. {what}50@{batch}")
    name = f"{what.replace('++', 'pp')}{steps}_b{batch}"
    return {
        "kind": "sample",
        "method": what,
        "steps": int(steps),
        "batch": int(batch),
        "name": name,
    }


def load_config(module: str, batch: int, precision: str):
    config = importlib.import_module(module).get_config()
    config.training.batch_size = batch
    if precision == "bf16":
        config.model.dtype = "bfloat16"
    return config


def diffusers_kwargs(config) -> dict[str, Any]:
    """`UNet2DModel` keyword arguments for the architecture of `config.model` (a U-Net)."""
    m = config.model
    if m.name != "unet" or m.resblock_updown or m.scale_shift_norm:
        raise ValueError(
            f"config.model (name={m.name!r}, resblock_updown={m.resblock_updown}, "
            f"scale_shift_norm={m.scale_shift_norm}) has no UNet2DModel twin here: use a plain "
            "U-Net config (name='unet', resblock_updown=False, scale_shift_norm=False)"
        )
    size, channels = config.data.image_size, config.data.channels
    out_ch = [m.ch * k for k in m.ch_mult]
    attn = [size // 2**i in m.attention_resolutions for i in range(len(out_ch))]
    attn_ch = [c for c, a in zip(out_ch, attn, strict=True) if a] + [out_ch[-1]]
    return dict(
        sample_size=size,
        in_channels=channels,
        out_channels=channels * (2 if m.learn_sigma else 1),
        block_out_channels=tuple(out_ch),
        layers_per_block=m.num_res_blocks,
        down_block_types=tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in attn),
        up_block_types=tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)),
        add_attention=bool(m.mid_attention),
        # diffusers takes one head width for all blocks; ours has num_heads per block.
        attention_head_dim=m.head_dim or attn_ch[0] // m.num_heads,
        norm_num_groups=m.num_groups,
        dropout=m.dropout,
        num_class_embeds=None if m.num_classes is None else m.num_classes + 1,
        flip_sin_to_cos=True,
        freq_shift=0,
    )


def emit(prefix: str = "", **record) -> None:
    print(prefix + json.dumps(record), flush=True)


# --------------------------------------------------------------------------------------------
# Workers: set up one side of one case, then answer "run PART" with one timed round.


def _calibrate(fn, round_seconds: float, sync) -> int:
    """Calls per round so that a round lasts about `round_seconds` (fn already warm)."""
    start = time.perf_counter()
    sync(fn())
    once = time.perf_counter() - start
    return max(1, math.ceil(round_seconds / max(once, 1e-6)))


def ours_worker(
    args, case, executables: dict | None = None, runtime: dict | None = None
) -> tuple[dict, dict]:
    """(parts: name -> fn doing one call, info). JAX on args.device. `executables`, if given,
    receives each part's compiled executable (bench.profile_cpu reads their HLO); `runtime`:
    `config.runtime` fields set over the recipe's (bench.cpu_kernels)."""
    import jax
    import jax.numpy as jnp

    from ddpm import build, objectives, sharding, train
    from ddpm.config.runs import data_shape

    if args.precision == "fp32":
        jax.config.update("jax_default_matmul_precision", "highest")
    config = load_config(args.config, case["batch"], args.precision)
    config.runtime.update(runtime or {})
    mesh = build.mesh(config)
    objective = objectives.create(config, workdir=None, mesh=mesh)
    batch = case["batch"]
    rng = np.random.default_rng(0)
    labels = None
    if config.model.num_classes is not None:
        labels = jnp.asarray(rng.integers(0, config.model.num_classes, (batch,)), jnp.int32)
    parts, compile_s, flops = {}, {}, {}

    def compiled(name, fn, *call):
        start = time.perf_counter()
        lowered = fn.lower(*call)
        out = lowered.compile()
        compile_s[name] = round(time.perf_counter() - start, 2)
        if executables is not None:
            executables[name] = out
        flops[name] = (lowered.cost_analysis() or {}).get("flops")
        return out

    if case["kind"] == "train":
        tx, lr_fn = build.optimizer(config.training)
        step_fn = train.make_train_step(objective, tx, lr_fn, mesh)
        state = train.init_train_state(jax.random.key(0), objective, tx, mesh)
        images = rng.uniform(-1, 1, (batch, *data_shape(config))).astype(np.float32)
        label = np.zeros(batch, np.int32) if labels is None else np.asarray(labels)
        data = sharding.global_batch({"image": images, "label": label}, mesh)
        frozen = objective.frozen
        step = compiled("step", step_fn, state, data, frozen)
        holder = {"state": state}
        n_params = sum(p.size for p in jax.tree.leaves(state.params))

        def run_step():
            holder["state"], metrics = step(holder["state"], data, frozen)
            return metrics

        parts["step"] = run_step
        if args.breakdown:

            def loss_fn(params, key):
                return objective.loss(params, frozen, data, key)[0]

            params = jax.tree.map(jnp.copy, state.params)  # the step donates `state`
            call = (params, jax.random.key(1))
            fwd = compiled("fwd", jax.jit(loss_fn), *call)
            grad = compiled("fwdbwd", jax.jit(jax.grad(loss_fn)), *call)
            parts["fwd"] = lambda: fwd(*call)
            parts["fwdbwd"] = lambda: grad(*call)
    else:
        params = jax.jit(objective.init_params)(jax.random.key(0))
        n_params = sum(p.size for p in jax.tree.leaves(params))
        config.sample.update(method=case["method"], num_steps=case["steps"], guidance_scale=1.0)
        shape = (batch, *objective.input_shape)
        fn = build.sampler(config, objective.apply, objective.process, shape)
        fn = jax.jit(fn, compiler_options=objective.speed.compiler_options)
        key = jax.random.key(1)
        sampler = compiled("sample", fn, params, key, labels)
        parts["sample"] = lambda: sampler(params, key, labels)

    dev = jax.devices()[0]
    info = dict(
        params=int(n_params),
        compile_s=compile_s,
        flops=flops,
        device=f"{dev.platform}:{dev.device_kind}",
        versions={"jax": jax.__version__, "flax": importlib.import_module("flax").__version__},
    )
    return parts, info


# Dense peak TFLOP/s by device-name fragment and --precision (NVIDIA datasheets, no sparsity).
PEAK_TFLOPS = {
    "H100 PCIe": {"fp32": 51.2, "tf32": 378.0, "bf16": 756.0},
    "H100": {"fp32": 66.9, "tf32": 494.7, "bf16": 989.4},  # SXM5
    "H200": {"fp32": 66.9, "tf32": 494.7, "bf16": 989.4},
}


def peak_tflops(device: str, precision: str) -> float | None:
    """The datasheet's dense peak for `device` ("cuda:NVIDIA H100 80GB HBM3") or None."""
    for fragment, peaks in PEAK_TFLOPS.items():  # "H100 PCIe" is tried before "H100"
        if fragment in device:
            return peaks[precision]
    return None


def matmul_ceiling(precision: str) -> float:
    """FLOP/s of a large square matmul in the benchmark's precision: the best of 5 timed
    batches of calls (4096^2 on an accelerator, 2048^2 on the CPU)."""
    import jax
    import jax.numpy as jnp

    n = 2048 if jax.default_backend() == "cpu" else 4096
    dtype = jnp.bfloat16 if precision == "bf16" else jnp.float32
    a = jax.random.normal(jax.random.key(0), (n, n), dtype)
    matmul = jax.jit(lambda a, b: a @ b)
    jax.block_until_ready(matmul(a, a))
    calls = 3 if jax.default_backend() == "cpu" else 50
    best = math.inf
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(calls):
            out = matmul(a, a)
        jax.block_until_ready(out)
        best = min(best, (time.perf_counter() - start) / calls)
    return 2 * n**3 / best


def torch_worker(args, case, variant: str) -> tuple[dict, dict]:
    """(parts, info) for diffusers' UNet2DModel in torch `variant` (eager|compile|compile-ro)."""
    import diffusers
    import torch

    from ddpm import build

    torch.set_num_threads(args.torch_threads)
    cuda = args.device == "cuda"
    dev = torch.device("cuda" if cuda else "cpu")
    tf32 = args.precision == "tf32"
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32
    config = load_config(args.config, case["batch"], "fp32")
    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(**diffusers_kwargs(config)).to(dev)
    n_params = sum(p.numel() for p in unet.parameters())
    net = unet  # the driver checked `variant` against TORCH_VARIANTS
    if variant != "eager":
        net = torch.compile(unet, mode="reduce-overhead" if variant == "compile-ro" else None)
    autocast = lambda: torch.autocast(dev.type, torch.bfloat16, enabled=args.precision == "bf16")
    process = build.process(config)
    batch = case["batch"]
    shape = (batch, config.data.channels, config.data.image_size, config.data.image_size)
    gen = np.random.default_rng(0)
    labels = None
    if config.model.num_classes is not None:
        labels = torch.as_tensor(gen.integers(0, config.model.num_classes, (batch,)), device=dev)
    parts, compile_s = {}, {}

    if case["kind"] == "train":
        tr = config.training
        noised = torch_noising(config, process, torch, dev)
        x0 = torch.as_tensor(gen.uniform(-1, 1, shape), dtype=torch.float32, device=dev)
        params = list(unet.parameters())
        opt = torch.optim.Adam(params, lr=tr.learning_rate, betas=(0.9, tr.adam_b2), foreach=True)
        ema = [p.detach().clone() for p in params]
        null = config.model.num_classes

        def loss_fn():
            """The process's loss (`ddpm.processes`): w ||target - net(input, time)||^2."""
            inputs, time, target, weight = noised(x0)
            y = None
            if null is not None:
                y = torch.where(torch.rand(batch, device=dev) < tr.label_dropout, null, labels)
            with autocast():
                out = net(inputs, time, class_labels=y).sample
            per = ((out.float() - target) ** 2).mean(dim=(1, 2, 3))
            return (per if weight is None else per * weight).mean()

        def step():
            loss = loss_fn()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, tr.grad_clip, foreach=True)
            opt.step()
            with torch.no_grad():
                torch._foreach_lerp_(ema, params, 1.0 - tr.ema_decay)
            return loss

        def fwdbwd():
            loss = loss_fn()
            loss.backward()
            for p in params:
                p.grad = None
            return loss

        parts["step"] = step
        if args.breakdown:
            parts["fwd"], parts["fwdbwd"] = loss_fn, fwdbwd
    else:
        sched, time_scale = torch_scheduler(config, process, case["method"], diffusers)

        @torch.inference_mode()
        def sample():
            sched.set_timesteps(case["steps"], device=dev)
            x = torch.randn(shape, device=dev) * getattr(sched, "init_noise_sigma", 1.0)
            scale_input = getattr(sched, "scale_model_input", lambda x, t: x)
            for t in sched.timesteps:
                with autocast():
                    out = net(scale_input(x, t), t * time_scale, class_labels=labels).sample
                x = sched.step(out.float(), t, x).prev_sample
            return x

        parts["sample"] = sample

    # First calls: torch.compile compiles here (forward and, in training, backward).
    for name, fn in parts.items():
        start = time.perf_counter()
        fn()
        torch_sync(args.device)
        compile_s[name] = round(time.perf_counter() - start, 2)
    info = dict(
        params=int(n_params),
        compile_s=compile_s,
        device=f"cuda:{torch.cuda.get_device_name()}" if cuda else "cpu",
        versions={"torch": torch.__version__, "diffusers": diffusers.__version__},
        torch_threads=torch.get_num_threads(),
        omp_wait_policy=os.environ.get("OMP_WAIT_POLICY"),
    )
    return parts, info


def torch_noising(config, process, torch, dev):
    """noised(x0 [B, C, H, W]) -> (network input, model time [B], target, weight [B] or None):
    one draw of the training loss of config.diffusion.process, in torch, as `ddpm.processes`
    defines it (DDPM: t ~ U{0..T-1}, the prediction's target, min-SNR weighting; flow: t
    logit-normal or uniform, shifted, x_t = (1 - t) x0 + t eps, target eps - x0, time 1000 t;
    EDM: ln sigma ~ N(P_mean, P_std), input c_in (x0 + sigma eps), target (x0 - c_skip x) /
    c_out, time 250 ln sigma)."""
    name, d = process.name, config.diffusion
    if name == "ddpm":
        if d.loss_weighting not in ("none", "min_snr") or config.model.learn_sigma:
            raise ValueError(
                f"config.diffusion.loss_weighting={d.loss_weighting!r} / learn_sigma: the torch "
                "step mirrors weighting none or min_snr without learned variance only"
            )
        betas = np.asarray(process.schedule.betas, np.float64)
        ab = torch.as_tensor(np.cumprod(1.0 - betas), dtype=torch.float32, device=dev)

        def noised(x0):
            t = torch.randint(0, len(betas), (x0.shape[0],), device=dev)
            noise = torch.randn_like(x0)
            a, s = ab[t].sqrt().view(-1, 1, 1, 1), (1 - ab[t]).sqrt().view(-1, 1, 1, 1)
            target = {"eps": noise, "x0": x0, "v": a * noise - s * x0}[d.prediction]
            weight = None
            if d.loss_weighting == "min_snr":
                snr = ab[t] / (1 - ab[t])
                denominator = {"eps": snr, "x0": torch.ones_like(snr), "v": snr + 1}
                weight = snr.clamp(max=d.min_snr_gamma) / denominator[d.prediction]
            return a * x0 + s * noise, t, target, weight

        return noised
    if name == "flow":

        def noised(x0):
            b = x0.shape[0]
            if process.t_sampling == "uniform":
                t = torch.rand(b, device=dev)
            else:
                t = torch.sigmoid(
                    process.logit_mean + process.logit_std * torch.randn(b, device=dev)
                )
            t = process.shift * t / (1 + (process.shift - 1) * t)
            noise = torch.randn_like(x0)
            tt = t.view(-1, 1, 1, 1)
            return (1 - tt) * x0 + tt * noise, 1000 * t, noise - x0, None

        return noised
    if name == "edm":
        sd = process.sigma_data

        def noised(x0):
            sigma = torch.exp(process.p_mean + process.p_std * torch.randn(x0.shape[0], device=dev))
            s = sigma.view(-1, 1, 1, 1)
            x = x0 + s * torch.randn_like(x0)
            total = s**2 + sd**2
            c_skip, c_out, c_in = sd**2 / total, s * sd / total.sqrt(), 1 / total.sqrt()
            return c_in * x, 250 * torch.log(sigma), (x0 - c_skip * x) / c_out, None

        return noised
    raise ValueError(f"config.diffusion.process={name!r} has no torch twin here (ddpm, flow, edm)")


def torch_scheduler(config, process, method: str, diffusers):
    """(diffusers scheduler for `method` on config's process, factor from its timesteps to our
    model time): DDPM: DDIM / DPM-Solver++ with our betas (trailing); flow: the flow-matching
    Euler scheduler (DDIM on a flow is Euler) / DPM-Solver++ on flow sigmas, both shifted; EDM:
    the EDM Euler / DPM-Solver++ schedulers (their timesteps are 0.25 ln sigma)."""
    second = dict(algorithm_type="dpmsolver++", solver_order=2)
    if process.name == "ddpm":
        betas = np.asarray(process.schedule.betas, np.float64)
        common = dict(
            num_train_timesteps=len(betas),
            trained_betas=betas,
            prediction_type={"v": "v_prediction", "eps": "epsilon", "x0": "sample"}[
                config.diffusion.prediction
            ],
            timestep_spacing="trailing",
        )
        if method == "ddim":
            return diffusers.DDIMScheduler(clip_sample=bool(config.sample.clip_x0), **common), 1
        return diffusers.DPMSolverMultistepScheduler(lower_order_final=True, **second, **common), 1
    if process.name == "flow":
        if method == "ddim":
            return diffusers.FlowMatchEulerDiscreteScheduler(shift=process.shift), 1
        flow = dict(
            use_flow_sigmas=True, prediction_type="flow_prediction", flow_shift=process.shift
        )
        return diffusers.DPMSolverMultistepScheduler(lower_order_final=True, **second, **flow), 1
    if process.name == "edm":
        edm = dict(
            sigma_min=process.sigma_min, sigma_max=process.sigma_max, sigma_data=process.sigma_data
        )
        if method == "ddim":
            return diffusers.EDMEulerScheduler(**edm), 1000
        return diffusers.EDMDPMSolverMultistepScheduler(**second, **edm), 1000
    raise ValueError(f"config.diffusion.process={process.name!r} has no diffusers sampler here")


def torch_sync(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


def peak_memory(side: str, device: str) -> dict[str, float]:
    """Peak device memory (GPU) or peak resident set size (CPU), MiB."""
    out = {"peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
    if device == "cuda" and side == "ours":
        import jax

        stats = jax.devices()[0].memory_stats() or {}
        out["peak_device_mib"] = round(stats.get("peak_bytes_in_use", 0) / 2**20, 1)
    elif device == "cuda":
        import torch

        out["peak_device_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return out


def worker_main(args) -> None:
    case = parse_case(args.case)
    if args.worker == "ours":
        import jax

        parts, info = ours_worker(args, case)
        sync = jax.block_until_ready
    else:
        parts, info = torch_worker(args, case, args.worker)
        sync = lambda out: torch_sync(args.device)
    for fn in parts.values():  # warm-up beyond the first (compiling) call
        sync(fn())
    calls = {name: _calibrate(fn, args.round_seconds, sync) for name, fn in parts.items()}
    emit(PREFIX, ready=True, calls=calls, **info, **peak_memory(args.worker, args.device))
    for line in sys.stdin:
        part = line.strip()
        if part == "quit":
            break
        if part == "matmul_ceiling":  # asked once the other workers are set up and idle
            emit(PREFIX, matmul_flops_per_s=matmul_ceiling(args.precision))
            continue
        fn, n = parts[part], calls[part]
        start = time.perf_counter()
        for _ in range(n):
            out = fn()
        sync(out)
        emit(PREFIX, part=part, calls=n, seconds=time.perf_counter() - start)


# --------------------------------------------------------------------------------------------
# Driver.


class Worker:
    """A worker process: started, read until ready (in a thread, so that set-up can overlap
    other workers' and be given up on), then asked for rounds over stdin."""

    def __init__(self, args, case_spec: str, side: str):
        cmd = [
            sys.executable,
            "-m",
            "bench.vs_diffusers",
            f"--worker={side}",
            f"--case={case_spec}",
        ]
        for flag in ("config", "device", "precision", "round_seconds", "torch_threads"):
            cmd.append(f"--{flag.replace('_', '-')}={getattr(args, flag)}")
        if args.breakdown:
            cmd.append("--breakdown")
        env = dict(os.environ)
        if side == "ours":
            env["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"  # leave GPU memory for torch
            if args.device == "cpu":
                env["JAX_PLATFORMS"] = "cpu"
        else:
            env["OMP_WAIT_POLICY"] = "PASSIVE"
        self.side, self.info, self.error, self.setup_s = side, None, None, None
        self._start = time.perf_counter()
        self.proc = subprocess.Popen(  # its own process group: kill() takes its helpers too
            cmd,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
            start_new_session=True,
        )

        def await_ready():
            try:
                self.info = self._read()
                self.setup_s = round(time.perf_counter() - self._start, 1)
            except RuntimeError as err:
                self.error = str(err)

        self._setup = threading.Thread(target=await_ready, daemon=True)
        self._setup.start()

    def ready(self, timeout: float | None) -> bool:
        """Waits up to `timeout` s (None: no limit) for set-up; kills a worker not ready."""
        self._setup.join(timeout)
        if self.info is None and self.error is None:  # still setting up: give up on it
            self.kill()
            self._setup.join()
            elapsed = time.perf_counter() - self._start
            self.info, self.error = None, f"not ready after {elapsed:.0f} s (--setup-timeout)"
        return self.info is not None

    def _read(self) -> dict:
        for line in self.proc.stdout:
            if line.startswith(PREFIX):
                return json.loads(line[len(PREFIX) :])
        raise RuntimeError(f"worker {self.side} exited with code {self.proc.wait()}")

    def run(self, part: str) -> dict:
        self.proc.stdin.write(part + "\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self) -> None:
        self.proc.stdin.write("quit\n")
        self.proc.stdin.close()
        self.proc.wait()

    def kill(self) -> None:
        """Ends the worker and whatever it started (torch.compile's compile workers)."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


def start_workers(args, spec: str) -> list[Worker]:
    """Ours first, then each torch variant; set up one after the other (`--setup=sequential`,
    so compile times are not shared) or all at once (`parallel`, the default on a GPU, where
    set-up dominates a device lease). Workers not ready within `--setup-timeout` s of their
    start (parallel: of the first start) are killed and returned with `.error` set."""
    sides, workers = ["ours", *args.torch.split(",")], []
    try:
        if args.setup == "sequential":
            for side in sides:
                workers.append(Worker(args, spec, side))
                if not workers[-1].ready(args.setup_timeout) and side == "ours":
                    break  # no case without ours
            return workers
        workers = [Worker(args, spec, side) for side in sides]
        deadline = None if args.setup_timeout is None else time.monotonic() + args.setup_timeout
        for w in workers:
            w.ready(None if deadline is None else max(0.0, deadline - time.monotonic()))
        return workers
    except BaseException:  # SIGTERM (a time limit) or ^C while setting up: leave no worker
        for w in workers:
            w.kill()
        raise


def machine() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "cores": os.cpu_count()}


def run_case(args, spec: str) -> None:
    case = parse_case(spec)
    load_start = os.getloadavg()
    workers = start_workers(args, spec)
    try:
        measure_case(args, case, workers, load_start)
    finally:
        for w in workers:
            w.kill()


def measure_case(args, case: dict, workers: list[Worker], load_start) -> None:
    """Timed rounds over the workers that set up, and the case's JSON lines. A worker that
    failed to set up gets a `<case>/setup_failed` line; the case goes on while ours and at
    least one torch variant are ready."""
    for w in workers:
        if w.info is None:
            emit(name=f"{case['name']}/setup_failed", side=w.side, error=w.error)
    if workers[0].info is None or all(w.info is None for w in workers[1:]):
        return
    workers = [w for w in workers if w.info is not None]
    ours = workers[0]
    for w in workers[1:]:
        ratio = w.info["params"] / ours.info["params"]
        print(
            f"# {case['name']}: parameters ours {ours.info['params']:,}, "
            f"diffusers {w.info['params']:,} ({w.side}; ratio {ratio:.4f})",
            file=sys.stderr,
        )
        if abs(ratio - 1) > 0.05:
            raise RuntimeError(f"parameter counts differ by more than 5 %: ratio {ratio:.4f}")
    parts = list(ours.info["calls"])
    ceiling = ours.run("matmul_ceiling")["matmul_flops_per_s"] if case["kind"] == "train" else None
    seconds = {(w.side, p): [] for w in workers for p in parts}
    for r in range(args.rounds):
        order = workers if r % 2 == 0 else workers[::-1]
        for part in parts:
            for w in order:
                out = w.run(part)
                seconds[w.side, part].append(out["seconds"] / out["calls"])
    for w in workers:
        w.close()
    load_end = os.getloadavg()

    per_call = {k: statistics.median(v) for k, v in seconds.items()}
    ips = lambda side, part: case["batch"] / per_call[side, part]
    versions = {k: v for w in workers for k, v in w.info["versions"].items()}
    common = dict(
        units="images/s",
        batch=case["batch"],
        config=args.config,
        precision=args.precision,
        rounds=args.rounds,
        device={"ours": ours.info["device"], "theirs": workers[1].info["device"]},
        versions=versions,
        torch_threads=workers[1].info["torch_threads"],
        omp_wait_policy=workers[1].info["omp_wait_policy"],
        machine=machine(),
        load_1m={"start": round(load_start[0], 2), "end": round(load_end[0], 2)},
    )
    figure = case["name"] if case["kind"] == "sample" else "train"
    for part in parts:
        label = {"step": figure, "sample": figure}.get(part, f"train_{part}")
        name_base = label if case["kind"] == "sample" else f"{label}_b{case['batch']}"
        best = None
        for w in workers[1:]:
            theirs = ips(w.side, part)
            best = max(best or 0.0, theirs)
            emit(
                name=f"{name_base}/vs_{w.side}",
                ours=round(ips("ours", part), 2),
                theirs=round(theirs, 2),
                ratio=round(ips("ours", part) / theirs, 3),
                ours_rounds=[round(case["batch"] / s, 2) for s in seconds["ours", part]],
                theirs_rounds=[round(case["batch"] / s, 2) for s in seconds[w.side, part]],
                **common,
            )
        if len(workers) > 2:
            emit(
                name=f"{name_base}/vs_best_torch",
                ours=round(ips("ours", part), 2),
                theirs=round(best, 2),
                ratio=round(ips("ours", part) / best, 3),
                **common,
            )
        flops = ours.info["flops"].get(part)
        if case["kind"] == "train" and flops:
            achieved = flops / per_call["ours", part]
            peak = peak_tflops(ours.info["device"], args.precision)
            emit(
                name=f"{name_base}/efficiency",
                units="TFLOP/s",
                flops_per_call=flops,
                ours=round(achieved / 1e12, 4),
                matmul_ceiling=round(ceiling / 1e12, 4),
                fraction_of_matmul=round(achieved / ceiling, 3),
                peak=peak,
                fraction_of_peak=None if peak is None else round(achieved / 1e12 / peak, 3),
                precision=args.precision,
                device=common["device"]["ours"],
                versions=versions,
            )
    emit(
        name=f"{case['name']}/setup",
        units="s",
        ours_compile_s=ours.info["compile_s"],
        theirs_first_call_s={w.side: w.info["compile_s"] for w in workers[1:]},
        setup_s={w.side: w.setup_s for w in workers},
        setup=args.setup,
        memory={w.side: {k: v for k, v in w.info.items() if "peak" in k} for w in workers},
        params={w.side: w.info["params"] for w in workers},
        device=common["device"],
        versions=versions,
    )


def table(path: str) -> str:
    """Markdown tables of the images/s and TFLOP/s figures in a file of this script's lines."""
    rows = [
        "| figure | ours | diffusers | ratio | load 1m (start, end) |",
        "|---|---:|---:|---:|---|",
    ]
    efficiency = [
        "| figure | TFLOP/step | ours TFLOP/s | matmul ceiling | of ceiling | of peak |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    with open(path) as f:
        for line in f:
            if not line.startswith("{"):
                continue
            r = json.loads(line)
            if r.get("units") == "images/s":
                load = f"{r['load_1m']['start']}, {r['load_1m']['end']}"
                rows.append(
                    f"| {r['name']} | {r['ours']} | {r['theirs']} | {r['ratio']} | {load} |"
                )
            elif r.get("units") == "TFLOP/s":
                peak = "n/a" if r["peak"] is None else f"{r['fraction_of_peak']} of {r['peak']}"
                efficiency.append(
                    f"| {r['name']} | {r['flops_per_call'] / 1e12:.4g} | {r['ours']} | "
                    f"{r['matmul_ceiling']} | {r['fraction_of_matmul']} | {peak} |"
                )
    if len(efficiency) > 2:
        rows += [""] + efficiency
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs.mnist_ddpm")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--cases", default="train@16,train@64,ddim50@16,dpm++2m20@16")
    parser.add_argument("--torch", default="eager,compile")
    parser.add_argument("--precision", default="fp32", choices=("fp32", "tf32", "bf16"))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--round-seconds", type=float, default=3.0)
    parser.add_argument("--torch-threads", type=int, default=os.cpu_count())
    parser.add_argument("--breakdown", action="store_true")
    parser.add_argument(
        "--setup",
        choices=("sequential", "parallel"),
        help="set workers up one after the other or all at once (default: parallel on cuda)",
    )
    parser.add_argument(
        "--setup-timeout", type=float, help="seconds; workers not ready by then are dropped"
    )
    parser.add_argument("--table", metavar="JSONL", help="print a Markdown table of a run's lines")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--case", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker_main(args)
        return
    if args.table:
        print(table(args.table))
        return
    for variant in args.torch.split(","):
        if variant not in TORCH_VARIANTS:
            raise ValueError(f"--torch entry {variant!r} is not one of {', '.join(TORCH_VARIANTS)}")
    if args.device == "cpu" and "compile-ro" in args.torch.split(","):
        raise ValueError("--torch=compile-ro (CUDA graphs) needs --device=cuda")
    args.setup = args.setup or ("parallel" if args.device == "cuda" else "sequential")
    specs = args.cases.split(",")
    for spec in specs:
        parse_case(spec)  # fail on a bad entry before any work
    # A time limit (`timeout`) ends the driver with SIGTERM: unwind, so run_case kills workers.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    for spec in specs:
        try:
            run_case(args, spec)
        except RuntimeError as err:  # a worker died mid-round: report it, go on to the next
            emit(name=f"{parse_case(spec)['name']}/failed", error=str(err))


if __name__ == "__main__":
    main()
