"""The toy denoiser (jaxvc/methods/toy_denoiser.py) on the synthetic moving-squares stream: the trainer's test config.

Variants: ``tiny`` (default; pure data parallelism), ``fsdp`` (parameters sharded over all devices),
``fsdp_tensor`` (fsdp x tensor = 4 x 2 on 8 devices), ``remat`` (full rematerialization of the blocks).
Every field here is also the reference list of what the trainer reads (see jaxvc/train/loop.py).
"""
from ml_collections import ConfigDict, config_dict

from jaxvc.config_sections import optim, profile


def get_config(variant=None):
    variant = variant or "tiny"
    config = ConfigDict()
    config.method = "toy"
    config.seed = 0
    config.steps = 10
    config.batch_size = 8  # global, over all hosts and devices
    config.workdir = ""  # the CLI's --workdir wins; one of the two must be given

    config.model = ConfigDict()
    config.model.frames = 2
    config.model.height = 8
    config.model.width = 8
    config.model.channels = 3
    config.model.features = 8
    config.model.num_blocks = 2
    config.model.groups = 4
    config.model.time_features = 16
    config.model.num_train_timesteps = 100
    config.model.sample_steps = 4
    config.model.num_samples = 2
    # The stem (time_embedding, conv_in) plays the part of frozen pretrained weights.
    config.model.trainable = ("params/blocks_.*", "params/norm_out/.*", "params/conv_out/.*")

    config.data = ConfigDict()
    config.data.source = "toy"
    config.data.seed = 0
    config.data.with_noise = False  # per-example noise/timesteps from the data (split-invariant loss)

    config.optim = optim(lr=1e-3)  # every field: jaxvc/config_sections.py
    config.optim.schedule = "warmup_cosine"
    config.optim.warmup_steps = 2

    config.mesh = ConfigDict({"data": -1, "fsdp": 1, "tensor": 1, "sequence": 1})
    config.rules = ()  # overrides of jaxvc/parallel/rules.py DEFAULT_RULES, e.g. (("embed", None),)
    config.remat_policy = "none"  # none | full | nothing_saveable | dots_saveable | ...
    config.compute_dtype = "float32"
    config.matmul_precision = config_dict.placeholder(str)  # e.g. "highest"; None leaves JAX's default
    # XLA options for every compile, e.g. {"xla_backend_optimization_level": 0} (4x faster CPU compiles in tests)
    config.compiler_options = ConfigDict()

    config.checkpoint = ConfigDict()
    config.checkpoint.every = 5  # steps; 0 disables periodic saves (the last step and SIGTERM still save)
    config.checkpoint.keep = 2  # the latest N
    config.checkpoint.keep_best = 1  # plus the best N by best_metric (0: none)
    config.checkpoint.best_metric = "loss"
    config.checkpoint.best_mode = "min"
    config.checkpoint.use_async = True
    config.checkpoint.save_frozen = True  # False: frozen weights are rebuilt by the method on restore

    config.log_every = 1
    config.sample_every = 0  # steps between sample videos (method.sample), 0: never
    config.max_nonfinite_in_a_row = 3
    config.preemption_check_every = 10  # steps between the hosts' SIGTERM agreement (multi-process runs only)
    config.peak_flops_per_device = config_dict.placeholder(float)  # None: from the device table (no MFU on CPU)
    config.progress_bar = True
    config.profile = profile()  # profiler traces of chosen steps (jaxvc/train/profiling.py); off by default

    if variant == "tiny":
        pass
    elif variant == "fsdp":
        config.mesh = ConfigDict({"data": 1, "fsdp": -1, "tensor": 1, "sequence": 1})
    elif variant == "fsdp_tensor":
        config.mesh = ConfigDict({"data": 1, "fsdp": -1, "tensor": 2, "sequence": 1})
    elif variant == "remat":
        config.remat_policy = "full"
    else:
        raise ValueError(f"configs/toy.py: unknown variant '{variant}' (tiny, fsdp, fsdp_tensor, remat)")
    return config
