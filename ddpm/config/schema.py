"""Every config field, its default and its meaning: the schema recipes start from.

`get_config()` is the whole default config; recipes (configs/*.py) take it and override
fields. `config.model` holds only the fields of its family (`model_section(name)`: "unet",
"dit" or "autoencoder"), so a run carries only what its network reads. Choices that change
speed but never results live in `config.runtime`, applied by platform (`ddpm.runtime`).
`--config.<path>=value` overrides any field on the command line.
"""

import ml_collections
from ml_collections.config_dict import placeholder

from ddpm import processes

OBJECTIVES = ("diffusion", "autoencoder", "latent", "distill", "consistency")


def _common_model_fields(model: ml_collections.ConfigDict) -> None:
    model.dropout = 0.1
    model.dtype = "float32"  # compute dtype, e.g. bfloat16 (parameters stay param_dtype)
    model.param_dtype = "float32"
    model.remat = False  # rematerialise blocks in the backward pass (memory for compute)


def _denoiser_fields(model: ml_collections.ConfigDict) -> None:
    model.num_classes = placeholder(int)  # None = unconditional; else null label = n
    model.learn_sigma = False  # also output the variance interpolation (iDDPM)
    model.time_embed_freqs = placeholder(int)  # None = the family's default
    model.time_embed_max_period = 10000.0
    # Layout of the sinusoidal embedding: cos_sin | sin_cos (original DDPM); frequencies
    # max_period^(-i / (freqs - freq_shift)) (diffusers' downscale_freq_shift; DDPM: 1).
    model.time_embed_order = "cos_sin"
    model.time_embed_freq_shift = 0.0
    # Takes the guidance scale as an input: one call per guided step (guided distillation).
    model.guidance_embed = False


def unet() -> ml_collections.ConfigDict:
    """`config.model` of the U-Net (ddpm.models.unet): DDPM's with its successors' options."""
    model = ml_collections.ConfigDict()
    model.name = "unet"
    model.ch = 64
    model.ch_mult = (1, 2, 2)
    model.num_res_blocks = 2
    model.attention_resolutions = (16,)
    model.mid_attention = True  # self-attention in the middle block (DDPM: True)
    model.num_heads = 4
    model.head_dim = placeholder(int)  # set: heads = channels // head_dim
    model.resblock_updown = False
    model.scale_shift_norm = False  # AdaGN-style time conditioning
    model.num_groups = 32
    model.norm_eps = 1e-6  # GroupNorm epsilon (diffusers' default: 1e-5)
    # Strided 3x3 downsampling conv: 0 = pad after the input ("SAME"; DDPM), 1 = both sides
    model.downsample_padding = 0
    # block: self-attention (+ cross-attention with text) blocks; transformer: Stable
    # Diffusion's spatial transformers (GEGLU; needs config.text) of transformer_depth blocks
    model.attention_type = "block"
    model.transformer_depth = 1
    _denoiser_fields(model)  # time_embed_freqs None = ch // 2
    _common_model_fields(model)
    return model


def dit() -> ml_collections.ConfigDict:
    """`config.model` of the Diffusion Transformer (ddpm.models.dit)."""
    model = ml_collections.ConfigDict()
    model.name = "dit"
    model.patch_size = 2
    model.hidden_size = 384
    model.depth = 12
    model.num_heads = 6
    model.mlp_ratio = 4.0
    model.mlp_norm_eps = 1e-6  # epsilon of the LayerNorm before each MLP (diffusers': 1e-5)
    # 2-D sin-cos position embedding: row_col (rows in the first half of the channels) or
    # col_row (columns first: the reference DiT, MAE and diffusers)
    model.pos_embed_layout = "row_col"
    _denoiser_fields(model)  # time_embed_freqs None = 128
    _common_model_fields(model)
    model.dropout = 0.0
    return model


def autoencoder() -> ml_collections.ConfigDict:
    """`config.model` of latent diffusion's stage-1 KL-autoencoder (ddpm.models.autoencoder);
    it downsamples by f = 2^(len(ch_mult) - 1) to z_channels latent channels."""
    model = ml_collections.ConfigDict()
    model.name = "autoencoder"
    model.ch = 64
    model.ch_mult = (1, 2, 2)
    model.num_res_blocks = 2
    model.attention_resolutions = ()
    model.mid_attention = True
    model.num_heads = 4
    model.head_dim = placeholder(int)
    model.num_groups = 32
    model.z_channels = 4
    model.quant_conv = False  # 1x1 convs on the moments and latents (Stable Diffusion's VAE)
    _common_model_fields(model)
    model.dropout = 0.0
    return model


MODEL_SECTIONS = {"unet": unet, "dit": dit, "autoencoder": autoencoder}
# Model fields that change neither the parameters' shapes nor the function a trained network
# computes: a workdir resumes when only these (or config.runtime) differ.
FREE_MODEL_FIELDS = ("dropout", "dtype", "param_dtype", "remat")


def model_section(name: str) -> ml_collections.ConfigDict:
    """The default `config.model` of family `name` (a KeyError for an unknown family)."""
    return MODEL_SECTIONS[name]()


def get_config() -> ml_collections.ConfigDict:
    """The default config: every field the code reads, with one spelling."""
    config = ml_collections.ConfigDict()
    config.seed = 0
    # What is trained: "diffusion" (a denoiser on data), "autoencoder" (latent diffusion's
    # stage 1, model.name="autoencoder"), "latent" (a denoiser on the latents of the frozen
    # autoencoder in latent.autoencoder_workdir), "distill" (a few-step student of the diffusion
    # run in distill.teacher_workdir), "consistency" (a consistency model, distilled or trained:
    # config.consistency). See ddpm.objectives.
    config.objective = "diffusion"

    # Input pipeline (ddpm.data).
    config.data = ml_collections.ConfigDict()
    config.data.source = "mnist5k"  # mnist5k | tfds:<name> | folder:<path> | npz:<path> | sines
    config.data.image_size = 32
    config.data.channels = 1
    config.data.length = placeholder(int)  # 1-D signals (source="sines"): L of [L, C]; else None
    config.data.data_dir = placeholder(str)  # TFDS data_dir (None = TFDS default)
    config.data.train_split = "train"
    config.data.eval_split = "test"
    config.data.image_key = "image"
    config.data.label_key = "label"
    config.data.random_flip = False
    config.data.skip_corrupt = False
    config.data.num_workers = 0  # grain worker processes; 0 = in the main process
    config.data.prefetch = 2  # batches buffered ahead of the train step

    # Network (ddpm.models): the fields of one family, see model_section.
    config.model = unet()

    # Text conditioning by cross-attention (ddpm.text, ddpm.models.context); needs
    # model.num_classes = None. source: None (off) | "captions" (MNIST captions measured from
    # each digit, a word-level tokenizer and a text encoder trained with the denoiser) |
    # "npz:<path>" (precomputed embeddings per caption: captions, embeddings [N, L, D], mask) |
    # "clip:<dir>" (a Stable Diffusion pipeline's frozen CLIP text encoder; set by the import).
    config.text = ml_collections.ConfigDict()
    config.text.source = placeholder(str)
    config.text.max_length = 12  # tokens L (npz: its L)
    config.text.width = 64  # context width D (npz: its D)
    config.text.depth = 2  # text encoder layers ("captions")
    config.text.num_heads = 4

    # Noise process (ddpm.processes). process: "ddpm" (the discrete schedule below with its
    # prediction and loss weighting: ddpm.schedules, ddpm.diffusion), "edm" (Karras et al.
    # 2022: x = x_0 + sigma eps with the paper's preconditioning), "flow" (flow matching /
    # rectified flow: x_t = (1 - t) x_0 + t eps, velocity target eps - x_0) or "vpsde"
    # (score_sde's continuous-time VP-SDE, eps target). The ddpm fields below are ignored by
    # the others, which read their own section diffusion.<process>.
    config.diffusion = ml_collections.ConfigDict()
    config.diffusion.process = "ddpm"
    config.diffusion.schedule = "linear"  # linear | cosine | scaled_linear | sigmoid
    config.diffusion.num_timesteps = 1000
    # linear / scaled_linear endpoints; None = the schedule's own (linear: 1e-4 and 0.02;
    # scaled_linear: 0.00085 and 0.012). linear scales both by 1000 / num_timesteps.
    config.diffusion.beta_start = placeholder(float)
    config.diffusion.beta_end = placeholder(float)
    config.diffusion.prediction = "eps"  # eps | x0 | v
    config.diffusion.loss_weighting = "none"  # none | min_snr
    config.diffusion.min_snr_gamma = 5.0
    config.diffusion.zero_terminal_snr = False
    # One section per continuous process, its fields and defaults those of its class:
    # edm (ddpm.processes.edm.EDM): sigma_data (the data's std), training ln sigma ~
    #   N(p_mean, p_std^2), sampler levels in [sigma_min, sigma_max] (the paper's values);
    # flow (ddpm.processes.flow.Flow): training t ~ logit_normal (sigmoid of N(logit_mean,
    #   logit_std^2)) | uniform, then t -> shift t / (1 + (shift - 1) t) in training and in
    #   the sampler's levels (SD3);
    # vpsde (ddpm.processes.vpsde.VPSDE): beta(t) = beta_min + t (beta_max - beta_min),
    #   training t ~ U[t_min, 1] (score_sde's 0.1, 20, 1e-5).
    for name, process in processes.REGISTRY.items():
        if process.defaults():
            config.diffusion[name] = ml_collections.ConfigDict(process.defaults())

    # Optimisation and bookkeeping (ddpm.train).
    config.training = ml_collections.ConfigDict()
    config.training.num_steps = 10_000
    config.training.batch_size = 128  # global, over all devices and hosts
    config.training.optimizer = "adamw"  # adam | adamw
    config.training.learning_rate = 2e-4
    config.training.lr_schedule = "constant"  # constant | cosine (after warmup)
    config.training.warmup_steps = 1000
    config.training.weight_decay = 0.0
    config.training.adam_b2 = 0.999
    config.training.grad_clip = 1.0
    config.training.grad_accum_steps = 1
    config.training.ema_decay = 0.9999
    config.training.ema_warmup = False
    config.training.label_dropout = 0.1
    config.training.log_every = 50
    config.training.checkpoint_every = 1000
    config.training.keep_checkpoints = 3
    config.training.sample_every = 5000  # steps between sample grids (one at the end); 0: none
    # Devices that split each parameter, its EMA and optimizer state (FSDP); must divide the
    # device count. 1 = plain data parallel. Arrays under fsdp_min_size elements stay whole.
    config.training.fsdp = 1
    config.training.fsdp_min_size = 2**14

    # Post-hoc EMA (ddpm.posthoc_ema; Karras et al. 2024, EDM2): track keeps power-function
    # EMAs of these sigma_rel (the profile's width relative to the run's length, each in
    # (0, 0.2887)) beside training.ema_decay's, and stores them every snapshot_every steps in
    # workdir/phema/. sigma_rel: sample / eval / edit / distil with the EMA of this profile,
    # reconstructed from the snapshots (--mode=phema writes it), instead of ema_decay's.
    config.phema = ml_collections.ConfigDict()
    config.phema.track = ()  # e.g. (0.05, 0.10); () = off
    config.phema.snapshot_every = 100
    config.phema.sigma_rel = placeholder(float)

    # Generation (ddpm.samplers).
    config.sample = ml_collections.ConfigDict()
    config.sample.method = "ddim"  # ddpm | ddim | dpm++2m | dpm++2s | euler | heun
    config.sample.num_steps = 50
    config.sample.eta = 0.0
    # leading | trailing | linspace | karras; None = the method's own (karras for euler and
    # heun, trailing for the others). edm: karras (default) | trailing; flow: trailing.
    config.sample.spacing = placeholder(str)
    config.sample.variance = "fixed_small"  # ddpm: fixed_small | fixed_large (or learned)
    config.sample.dynamic_threshold = placeholder(float)  # Imagen quantile, e.g. 0.995 (pixels)
    config.sample.churn = 0.0  # euler / heun: EDM S_churn
    config.sample.guidance_scale = 1.0
    # Autoguidance (ddpm.autoguide): guide with this weaker model instead of the null label:
    # "step:N" (checkpoint N of the run) or another diffusion run's workdir. None: classifier-
    # free guidance. guidance_scale is then autoguidance's.
    config.sample.guide = placeholder(str)
    config.sample.num_samples = 64
    config.sample.batch_size = 64
    config.sample.labels = placeholder(int)  # None = all classes in rows; else one class id
    config.sample.prompt = placeholder(str)  # text models: None = "a handwritten <digit>" rows
    # text models with an outside encoder (clip:, npz:): guidance's unconditional branch
    # encodes this instead of the empty prompt
    config.sample.negative_prompt = placeholder(str)
    config.sample.clip_x0 = True  # pixel space only

    # Latent diffusion (ddpm.objectives.latent). Stage 1 (objective="autoencoder") trains the
    # KL-autoencoder; stage 2 (objective="latent") names that run's workdir and trains the
    # denoiser on its latents (shape from the stage-1 run), sampling in latent space
    # (sample.clip_x0 must be False there) and decoding.
    config.latent = ml_collections.ConfigDict()
    config.latent.recon_loss = "l1"  # stage 1: l1 | l2
    config.latent.kl_weight = 1e-6  # stage 1: beta (LDM's scale: recon summed over pixels)
    config.latent.autoencoder_workdir = placeholder(str)  # stage 2: the stage-1 run
    config.latent.scale_factor = placeholder(float)  # stage 2: None = 1 / std of the latents
    config.latent.sample_posterior = True  # stage 2: train on z ~ q(z|x) (False: its mean)

    # Progressive distillation (ddpm.objectives.distill; Salimans & Ho 2022), optionally after
    # guided distillation (Meng et al. 2023). The teacher is a diffusion run (trained or
    # imported) with the same model, diffusion and data sections. Round r (of
    # log2(teacher_steps / final_steps)) trains the student so that one DDIM step equals two of
    # its teacher's on the trailing grid of teacher_steps / 2^r steps; then the student (EMA)
    # becomes the teacher, with a fresh optimizer. guided: first, for guided_steps steps, a
    # student taking the guidance scale s (model.guidance_embed=True) learns the teacher's
    # guided prediction for s ~ U[guidance_min, guidance_max]; the rounds then distil that.
    # The run is guided_steps (if guided) + rounds x steps_per_round steps long
    # (training.num_steps may stop it earlier); sample with DDIM, final_steps, trailing.
    config.distill = ml_collections.ConfigDict()
    config.distill.teacher_workdir = placeholder(str)
    config.distill.teacher_steps = 16  # DDIM steps of the first teacher
    config.distill.final_steps = 1  # DDIM steps of the last student
    config.distill.steps_per_round = 1000
    config.distill.guided = False
    config.distill.guided_steps = 1000
    config.distill.guidance_min = 1.0
    config.distill.guidance_max = 5.0

    # Consistency models (ddpm.objectives.consistency; Song et al. 2023, improved CT 2023) of
    # config.diffusion.process: distillation (CD) from the diffusion run in teacher_workdir
    # (same model, data and diffusion sections), or training (CT) with no teacher, from scratch
    # or from the weights of the diffusion run in init_workdir. Sample with
    # sample.method="consistency", 1-4 steps.
    config.consistency = ml_collections.ConfigDict()
    cm = config.consistency
    cm.teacher_workdir = placeholder(str)  # CD; None: CT
    cm.init_workdir = placeholder(str)  # CT only: start from this diffusion run's EMA weights
    cm.teacher_solver = "heun"  # CD: heun | euler, one step of the teacher's ODE per pair
    cm.teacher_guidance = 1.0  # CD: the teacher's classifier-free guidance scale
    cm.curriculum = "fixed"  # fixed: num_levels levels | ict: start_levels doubling to end_levels
    cm.num_levels = 18  # fixed: Karras levels (rho) on the process's VE range
    cm.start_levels = 10  # ict
    cm.end_levels = 1280  # ict
    cm.rho = 7.0
    cm.level_sampling = "uniform"  # pairs: uniform | lognormal (p_mean, p_std of ln s)
    cm.p_mean = -1.1
    cm.p_std = 2.0
    cm.distance = "l2"  # l2 | pseudo_huber
    cm.weighting = "uniform"  # uniform | inverse_gap (1 / (s_n+1 - s_n), improved CT)
    cm.target_ema = 0.95  # the target network's EMA decay; 0: the student, no gradient
    cm.sigma_data = 0.5  # the skip coefficient's sigma_data

    # Editing with a trained run (ddpm.editing): --mode=inpaint / --mode=img2img.
    config.edit = ml_collections.ConfigDict()
    config.edit.input = "0"  # a PNG path, or the index of a test-set example
    config.edit.mask = "center"  # inpaint: center | left_half | random_boxes (regions to
    # generate) or a PNG path (white = keep, black = generate)
    config.edit.strength = 0.6  # img2img (SDEdit): noise level to start from, in (0, 1]
    config.edit.jump_length = 10  # inpaint, RePaint: steps per resampled block
    config.edit.resample = 1  # inpaint, RePaint: passes per block (1 = plain replacement)
    config.edit.num_samples = 8  # results per input

    # Evaluation (ddpm.evaluate).
    config.eval = ml_collections.ConfigDict()
    config.eval.metrics = ("bpd",)  # any of bpd | fd | accuracy | pr | fid
    config.eval.num_samples = 1000  # generated samples per guidance scale (fd, accuracy, pr, fid)
    config.eval.guidance_scales = ()  # e.g. (0, 1, 3); () = (sample.guidance_scale,)
    config.eval.batch_size = 100  # test images per bound evaluation / samples per sampler call
    # bpd of a discrete (ddpm) process: its variational bound, besides the ODE's figure.
    config.eval.bpd_examples = 100  # test images for the full-T bound (T model calls each)
    config.eval.bpd_importance_examples = 500  # test images for the importance-sampled bound
    config.eval.bpd_importance_draws = 16  # timesteps per image of the importance-sampled bound
    # bpd from the probability-flow ODE (every process): images, the solver's rtol = atol, and
    # the divergence: hutchinson (one Rademacher probe per image) | exact (one vector-Jacobian
    # product per dimension: small inputs only).
    config.eval.bpd_ode_examples = 100
    config.eval.bpd_ode_tolerance = 1e-5
    config.eval.bpd_ode_divergence = "hutchinson"
    config.eval.classifier_steps = 500  # training steps of the feature/accuracy classifier
    config.eval.inception_weights = placeholder(str)  # fid: the converted FID Inception .npz
    config.eval.reference_split = "train"  # real images the generated ones are compared with

    # Pretrained weights (ddpm.pretrained): the diffusers model directory a run imports
    # (--mode=import); set by configs/pretrained.py:DIR, which also derives the model.
    config.pretrained = ml_collections.ConfigDict()
    config.pretrained.path = placeholder(str)
    # A Stable Diffusion U-Net's LoRA in diffusers' layout (pytorch_lora_weights.safetensors),
    # merged into the weights for sample / img2img / inpaint / eval, times lora_scale.
    config.pretrained.lora = placeholder(str)
    config.pretrained.lora_scale = 1.0

    # LoRA fine-tuning (ddpm.objectives.lora) of the U-Net of config.pretrained.path (a Stable
    # Diffusion pipeline): rank None = off (train every weight); set, only the adapters train,
    # on the diffusers modules whose names end in a target (attention projections by
    # default), scaled by alpha / rank (None: alpha = rank); the frozen base is held in
    # base_dtype (float32 | bfloat16). The workdir's pytorch_lora_weights.safetensors (the EMA
    # adapters, rewritten at every checkpoint) loads in diffusers.
    config.lora = ml_collections.ConfigDict()
    config.lora.rank = placeholder(int)
    config.lora.alpha = placeholder(float)
    config.lora.targets = ("to_q", "to_k", "to_v", "to_out.0")
    config.lora.base_dtype = "float32"

    # Speed only, never results (ddpm.runtime): chosen by platform unless set. The resume
    # check ignores this section.
    config.runtime = ml_collections.ConfigDict()
    # The train step's and samplers' kernels on CPU: "ynnpack" (XLA:CPU's default: YNNPACK
    # fusions for convolutions, matmuls), "xla" (XLA's own, Eigen convolutions), "auto" ("xla"
    # on an AVX-512 CPU, where the train step is 1.3x faster at batch 64 and 256;
    # "ynnpack" on other CPUs until measured there). No effect on GPU/TPU.
    config.runtime.cpu_kernels = "auto"
    # Convolution kernel gradients summed over chunks of this many examples (YNNPACK's
    # kernel gradient slows down sharply with batch size). None = 16 on a single CPU device
    # with YNNPACK, 0 (one convolution) elsewhere.
    config.runtime.conv_grad_chunk = placeholder(int)
    # GroupNorm: "fast" (a hand-written two-pass gradient; reverse mode only, no jax.jvp),
    # "flax" (flax's own), "auto" (fast on CPU, flax on GPU/TPU).
    config.runtime.group_norm = "auto"
    # Parameter init keys: "rbg" (XLA:CPU compiles initialisers 3-4x faster), "threefry",
    # "auto" (rbg on CPU, threefry elsewhere). Changes the initial draw, so set it explicitly
    # to compare runs across platforms from the same init.
    config.runtime.init_key = "auto"
    config.runtime.async_checkpoint = True  # write checkpoints while training goes on
    return config
