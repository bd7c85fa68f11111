"""Config sections the methods' files (``configs/videomaker.py``, ``still_moving.py``, ``customcrafter.py``,
``microcinema.py``, ``disentangled_s2v.py``) share: the model's weights and sizes, named data streams, the optimizer,
and the run (mesh, precision, launch, checkpoints, logging, validation). Each file builds its own ``model.options``
and changes what its method needs."""
from __future__ import annotations

from ml_collections import ConfigDict, config_dict


def unet_model(*, vae_variant: str, num_frames: int, image_size: int) -> ConfigDict:
    """``config.model`` without ``options``: sizes by name, or weights from local files."""
    model = ConfigDict()
    model.unet_variant = "tiny"
    model.motion_layout = "v3"
    model.unet_overrides = ConfigDict()  # UNetConfig fields, e.g. down_block_types
    # the UNet's attention (jaxvc/models/attention.py): xla (einsum, everywhere), jax, cudnn (flash attention on
    # NVIDIA GPUs, bf16), splash (flash attention on TPUs) or ring (context parallelism over the mesh's sequence
    # axis); what a kernel cannot take falls back to the einsum.
    # The VAE and text encoder keep xla.
    model.attention_backend = "xla"
    model.text_variant = "tiny"
    model.vae_variant = vae_variant  # "none": pixel space; "tiny" / "sd": a VAE of that size
    model.pixel_patch = 1  # pixel space: p x p blocks folded into channels (jaxvc/models/patchify.py)
    model.pretrained = ""  # diffusers pipeline folder or jaxvc checkpoint (weights for unet/vae/text)
    # True (the real-size variants: they fine-tune SD1.5 + AnimateDiff): an empty `pretrained` is an error, not a
    # silent run on random weights; false trains from random weights (throughput studies; `jaxvc plan` sets it)
    model.requires_pretrained = False
    model.motion_adapter = ""  # MotionAdapter folder or AnimateDiff motion-module file
    model.allow_pickle = False
    model.tokenizer = ""  # tokenizer folder; "" = the pretrained folder's, else jaxvc's default CLIP BPE
    model.num_frames = num_frames
    model.image_size = image_size  # the frames' height, and their width unless image_width is set
    model.image_width = config_dict.placeholder(int)  # None: square frames
    return model


def stream_data(config: ConfigDict, streams: dict, *, with_mask: bool = False) -> ConfigDict:
    """``config.data`` for ``jaxvc/data/build.py``'s named streams (e.g. ``{"video": "synthetic:videos"}``): sizes
    tied to ``config.model``, the built-in synthetic world's settings, no workers (set ``workers`` for real data)."""
    data = ConfigDict()
    data.source = "grain"
    data.streams = ConfigDict(streams)
    data.image_size = config.model.get_ref("image_size")
    data.image_width = config.model.get_ref("image_width")
    data.num_frames = config.model.get_ref("num_frames")
    data.with_mask = with_mask  # a record's mask (e.g. subject.mask.png) weights the loss; none: every pixel
    data.seed = 0
    data.workers = 0
    data.synthetic = ConfigDict(dict(image_size=config.model.get_ref("image_size"),
                                     num_frames=config.model.get_ref("num_frames"), num_subjects=64, held_out=8,
                                     seed=0, records=4096))
    return data


def make_tiny(config: ConfigDict) -> None:
    """The CPU-test sizes every method's ``tiny`` variant shares: 20 steps of batch 2, 4 frames, a small world."""
    config.steps = 20
    config.batch_size = 2
    config.model.num_frames = 4
    config.checkpoint.every = 10
    config.data.synthetic.num_subjects = 12
    config.data.synthetic.held_out = 2
    config.data.synthetic.records = 64


def optim(lr: float) -> ConfigDict:
    """AdamW (weight decay 1e-2, not on norms and biases) after global-norm clipping, on an LR schedule; the other
    optimizers of jaxvc/train/optim.py by ``name``."""
    section = ConfigDict()
    section.name = "adamw"  # adamw | adafactor | lion | sgd (jaxvc/train/optim.py)
    section.lr = lr
    # constant | warmup_constant | warmup_cosine | warmup_linear | wsd | rsqrt (jaxvc/train/schedules.py)
    section.schedule = "constant"
    section.warmup_steps = 0
    section.decay_steps = config_dict.placeholder(int)  # None: config.steps
    section.end_lr_ratio = 0.0  # cosine, linear and wsd end at lr * end_lr_ratio
    section.cooldown_fraction = 0.2  # wsd: the decay is this last fraction of decay_steps
    section.cooldown_shape = "1-sqrt"  # wsd: 1-sqrt | linear | cosine
    section.b1 = 0.9
    section.b2 = 0.999
    section.eps = 1e-8
    section.weight_decay = 1e-2  # decoupled (x lr); never applied to norms, biases or other 1-d parameters
    section.mu_dtype = ""  # "bfloat16": the first moment (adamw, lion, sgd) in half the memory
    section.factored_min_dim = 128  # adafactor: factor a moment when its two largest dimensions are at least this
    section.clip_norm = 1.0  # global-norm clipping; 0 disables
    section.accumulation_steps = 1  # micro-batches per step (batch_size must divide)
    section.ema_decay = config_dict.placeholder(float)  # None: no EMA of the trainable parameters
    return section


def profile() -> ConfigDict:
    """The profiler's settings (jaxvc/train/profiling.py); off until ``steps`` > 0."""
    section = ConfigDict()
    section.steps = 0  # steps in the trace (0: no trace)
    section.skip_steps = 5  # steps run first, from where the process starts or resumes (compiles, warm-up)
    section.dir = ""  # "" = <workdir>/tensorboard: TensorBoard's Profile tab finds the trace there
    section.all_hosts = False  # every process writes its trace (else process 0 only)
    section.memory = False  # a device memory profile (pprof) after the last traced step
    section.server_port = 0  # > 0: JAX's profiler server on that port, for on-demand capture
    return section


def add_run_sections(config: ConfigDict, *, checkpoint_every: int, validation_steps: int = 25,
                     guidance_scale: float = 8.0, eta: float = 0.0) -> None:
    """Mesh, precision, launch flags, checkpoints, logging and validation samples, set on ``config``. The
    validation sampling settings (``validation_steps``, ``guidance_scale``, DDIM ``eta``: the method's published
    inference settings) are also how ``jaxvc generate`` samples the run unless told otherwise."""
    config.mesh = ConfigDict({"data": -1, "fsdp": 1, "tensor": 1, "sequence": 1})
    config.rules = ()
    config.remat_policy = "none"
    config.compute_dtype = "float32"
    # "bfloat16": the train state keeps frozen matrices (kernels, embedding tables) rounded to bf16, half their
    # memory; layers computing in bf16 cast them there anyway (jaxvc/models/weight_storage.py). "": float32
    config.frozen_dtype = ""
    config.matmul_precision = config_dict.placeholder(str)
    config.compiler_options = ConfigDict()  # XLA options for every compile of the run (jaxvc/compile_options.py)

    # Exported on every host by the launch scripts (launch/*.sh) before `jaxvc train` starts: XLA and libtpu read
    # their flags from the environment at start-up (see jaxvc/launch_env.py). Tuples of "--flag=value".
    config.launch = ConfigDict()
    config.launch.libtpu_init_args = ()  # TPU only (LIBTPU_INIT_ARGS)
    config.launch.xla_flags = ()  # every platform (XLA_FLAGS)
    config.launch.gpu_xla_flags = ()  # GPU only, appended to XLA_FLAGS
    config.launch.env = ConfigDict()  # extra variables, e.g. {"TPU_STDERR_LOG_LEVEL": "0"}

    config.checkpoint = ConfigDict()
    config.checkpoint.every = checkpoint_every
    config.checkpoint.keep = 2
    config.checkpoint.keep_best = 0
    config.checkpoint.best_metric = "loss"
    config.checkpoint.best_mode = "min"
    config.checkpoint.use_async = True
    # False: frozen weights stay out of checkpoints and are re-read from model.pretrained on resume
    config.checkpoint.save_frozen = True

    config.log_every = 10
    config.sample_every = 0  # > 0: every that many steps, generate the validation videos below (samples/, TensorBoard)
    config.validation = ConfigDict()
    config.validation.prompts = ()  # e.g. ("a dog runs on the beach",)
    config.validation.references = ()  # one reference image path per prompt (methods that take one)
    config.validation.steps = validation_steps  # sampling steps
    # frames of the samples and of `jaxvc generate`'s default for the run (None: model.num_frames, what it trained
    # on; CustomCrafter trains on 4-frame still clips but generates 16)
    config.validation.num_frames = config_dict.placeholder(int)
    config.validation.sampler = ""  # "" = the method's own (ddim; euler for the Wan DiT), or "dpm++", "unipc", ...
    config.validation.guidance_scale = guidance_scale
    # the unconditional branch's prompt (VideoMaker's authors sample with a long list of artefacts to avoid: set it
    # here and the run's validation videos and `jaxvc generate` use it)
    config.validation.negative_prompt = ""
    config.validation.eta = eta  # DDIM's eta (the ddim sampler only)
    config.validation.seed = 0  # video i uses seed + i at every sample point
    config.validation.clip_model = ""  # local CLIPModel folder: CLIP-T, CLIP-I, T.Cons of the samples (TensorBoard)
    config.validation.dino_model = ""  # local ViTModel (DINO) folder: DINO-I
    config.max_nonfinite_in_a_row = 3
    config.peak_flops_per_device = config_dict.placeholder(float)
    config.progress_bar = True
    config.profile = profile()
