"""Shared defaults for every run. Other configs start from `get_config()` here and override.

Every field the code reads lives here, with one spelling; `--config.<path>=value` overrides it
on the command line.
"""

import ml_collections
from ml_collections.config_dict import placeholder


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.seed = 0

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

    # Network (ddpm.models).
    config.model = ml_collections.ConfigDict()
    config.model.name = "unet"
    config.model.ch = 64
    config.model.ch_mult = (1, 2, 2)
    config.model.num_res_blocks = 2
    config.model.attention_resolutions = (16,)
    config.model.mid_attention = True  # self-attention in the middle block (DDPM: True)
    config.model.num_heads = 4
    config.model.head_dim = placeholder(int)  # set: heads = channels // head_dim
    config.model.dropout = 0.1
    config.model.num_classes = placeholder(int)  # None = unconditional; else null label = n
    config.model.resblock_updown = False
    config.model.scale_shift_norm = False  # AdaGN-style time conditioning
    config.model.num_groups = 32
    config.model.learn_sigma = False
    config.model.time_embed_freqs = placeholder(int)  # None = ch // 2 frequencies
    config.model.time_embed_max_period = 10000.0
    config.model.dtype = "float32"  # compute dtype, e.g. bfloat16
    config.model.param_dtype = "float32"
    config.model.remat = False
    # U-Net/autoencoder: compute each convolution's kernel gradient over chunks of this many
    # examples (0 = one convolution over the batch). A CPU speed-up: XLA:CPU's kernel gradient
    # slows down sharply with batch size (bench/README.md); leave 0 on GPU/TPU.
    config.model.conv_grad_chunk = 0
    # DiT only (name="dit"; also uses num_heads, dropout, num_classes, learn_sigma, dtype, remat,
    # time_embed_freqs with None = 128).
    config.model.patch_size = 2
    config.model.hidden_size = 384
    config.model.depth = 12
    config.model.mlp_ratio = 4.0

    # Text conditioning by cross-attention (ddpm.text, ddpm.models.context); needs
    # model.num_classes = None. source: None (off) | "captions" (MNIST captions measured from
    # each digit, a word-level tokenizer and a text encoder trained with the denoiser) |
    # "npz:<path>" (precomputed embeddings per caption: captions, embeddings [N, L, D], mask).
    config.text = ml_collections.ConfigDict()
    config.text.source = placeholder(str)
    config.text.max_length = 12  # tokens L (npz: its L)
    config.text.width = 64  # context width D (npz: its D)
    config.text.depth = 2  # text encoder layers ("captions")
    config.text.num_heads = 4

    # Forward process and objective (ddpm.schedules, ddpm.diffusion).
    config.diffusion = ml_collections.ConfigDict()
    config.diffusion.schedule = "linear"  # linear | cosine | scaled_linear | sigmoid
    config.diffusion.num_timesteps = 1000
    config.diffusion.prediction = "eps"  # eps | x0 | v
    config.diffusion.loss_weighting = "none"  # none | min_snr
    config.diffusion.min_snr_gamma = 5.0
    config.diffusion.zero_terminal_snr = False

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
    config.training.sample_every = 5000
    # Devices that split each parameter, its EMA and optimizer state (FSDP); must divide the
    # device count. 1 = plain data parallel. Arrays under fsdp_min_size elements stay whole.
    config.training.fsdp = 1
    config.training.fsdp_min_size = 2**14

    # Generation (ddpm.samplers).
    config.sample = ml_collections.ConfigDict()
    config.sample.method = "ddim"  # ddpm | ddim | dpm++2m | dpm++2s | euler | heun
    config.sample.num_steps = 50
    config.sample.eta = 0.0
    config.sample.spacing = "trailing"  # leading | trailing | linspace | karras (not euler/heun)
    config.sample.variance = (
        "fixed_small"  # ddpm: fixed_small | fixed_large (learned if learn_sigma)
    )
    config.sample.dynamic_threshold = placeholder(float)  # Imagen quantile, e.g. 0.995 (pixels)
    config.sample.churn = 0.0  # euler / heun: EDM S_churn
    config.sample.guidance_scale = 1.0
    config.sample.num_samples = 64
    config.sample.batch_size = 64
    config.sample.labels = placeholder(int)  # None = all classes in rows; else one class id
    config.sample.prompt = placeholder(str)  # text models: None = "a handwritten <digit>" rows
    config.sample.clip_x0 = True  # pixel space only

    # Latent diffusion (ddpm.latent). Stage 1 trains model.name="autoencoder" (a KL-autoencoder,
    # ddpm.models.autoencoder); stage 2 names that run's workdir and trains the denoiser on its
    # latents, sampling in latent space (sample.clip_x0 must be False there) and decoding.
    config.latent = ml_collections.ConfigDict()
    config.latent.z_channels = 4  # latent channels (stage 2: must equal the stage-1 run's)
    config.latent.factor = 4  # spatial downsampling f = 2^(len(ch_mult)-1) of the autoencoder
    config.latent.recon_loss = "l1"  # stage 1: l1 | l2
    config.latent.kl_weight = 1e-6  # stage 1: beta (LDM's scale: recon summed over pixels)
    config.latent.autoencoder_workdir = placeholder(str)  # stage 2: the stage-1 run; None=pixels
    config.latent.scale_factor = placeholder(float)  # stage 2: None = 1 / std of the latents
    config.latent.sample_posterior = True  # stage 2: train on z ~ q(z|x) (False: its mean)

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
    config.eval.bpd_examples = 100  # test images for the full-T bound (T model calls each)
    config.eval.bpd_importance_examples = 500  # test images for the importance-sampled bound
    config.eval.bpd_importance_draws = 16  # timesteps per image of the importance-sampled bound
    config.eval.classifier_steps = 500  # training steps of the feature/accuracy classifier
    config.eval.inception_weights = placeholder(str)  # fid: the converted FID Inception .npz
    config.eval.reference_split = "train"  # real images the generated ones are compared with
    return config
