"""Writes the notebooks in this folder (without outputs) from the cell sources below.

    .venv/bin/python notebooks/make_notebooks.py          # rewrite colab_tpu_inference.ipynb and train_tiny.ipynb

Edit the cells here, not in the .ipynb files: tests/test_notebooks.py checks that the stored notebooks equal what this
script builds, then executes them. Cells whose output the test checks carry a tag (``show-video``, ``loss-plot``...).
"""
from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import nbformat

HERE = Path(__file__).resolve().parent
KERNELSPEC = {"name": "python3", "display_name": "Python 3", "language": "python"}


def _md(text: str):
    return nbformat.v4.new_markdown_cell(textwrap.dedent(text).strip())


def _code(text: str, *tags: str):
    cell = nbformat.v4.new_code_cell(textwrap.dedent(text).strip())
    if tags:
        cell.metadata["tags"] = list(tags)
    return cell


# The setup cell both notebooks share. It must not import JAX before the fast-compile flags are set.
SETUP = '''
    # Setup. On Colab: mount Drive if a path points there, install jaxvc from JAXVC_SOURCE (plus JAX's TPU wheels
    # on a TPU runtime). Everywhere: fast XLA compiles on a CPU-only machine, then report the devices JAX sees.
    import importlib.util, os, subprocess, sys, time

    DRIVE_PATHS = [@DRIVE_PATHS@]

    IN_COLAB = "google.colab" in sys.modules
    if IN_COLAB:
        if any(str(p).startswith("/content/drive") for p in DRIVE_PATHS):
            from google.colab import drive
            drive.mount("/content/drive")
        if importlib.util.find_spec("jaxvc") is None:
            source = JAXVC_SOURCE
            if source.startswith(("https://", "git@")):  # a git URL: clone it (configs/ is needed, not just the package)
                subprocess.run(["git", "clone", "--depth", "1", source, "/content/jaxvc"], check=True)
                source = "/content/jaxvc"
            on_tpu = bool(os.environ.get("COLAB_TPU_ADDR")) or os.path.exists("/dev/accel0")
            subprocess.run([sys.executable, "-m", "pip", "install", "-q", "-e", source]
                           + (["jax[tpu]"] if on_tpu else []), check=True)
            sys.path.insert(0, source)  # an editable install made in this kernel is not on sys.path yet

    from jaxvc.notebook import use_fast_cpu_compiles

    FAST_CPU_COMPILES = use_fast_cpu_compiles()  # before JAX starts: XLA reads its flags once

    import jax

    print(f"python {sys.executable}\\njax {jax.__version__}, backend {jax.default_backend()}, devices {jax.devices()}")
    if FAST_CPU_COMPILES:
        print("no TPU/GPU found: XLA:CPU compiles at optimization level 0 (faster compiles for the tiny model)")
'''

# ------------------------------------------------------------------------------------------- inference notebook
INFERENCE = [
    _md('''
        # jaxvc: a video of *your* subject (VideoMaker inference, Colab TPU)

        A reference image of a subject plus a prompt in, a video of that subject doing what the prompt says out:
        `CustomVideoPipeline` (`jaxvc/pipeline.py`) runs VideoMaker's sampling, a jitted DDIM loop with
        classifier-free guidance whose unconditional branch has a zero reference (`SAMPLER` swaps in DPM-Solver++
        or UniPC, which need fewer steps).

        **On Colab:** *Runtime > Change runtime type > TPU* (or a GPU). Put the jaxvc repository and the weights on
        Google Drive (or set `JAXVC_SOURCE` to a git URL), fill in the parameters below and *Run all*.
        `MODEL_DIR` is a diffusers AnimateDiff pipeline folder (SD1.5 + motion modules saved whole), a plain SD1.5
        folder plus `MOTION_ADAPTER` (a diffusers `MotionAdapter` folder or an AnimateDiff `mm_sd_v15` file), or a
        checkpoint written by `jaxvc convert` (loads fastest). A diffusers Wan folder works too: an image-to-video
        one (Wan 2.1 I2V, Wan 2.2 I2V A14B or TI2V-5B) takes `REFERENCE_IMAGE` as the video's first frame, a
        text-to-video one takes none. Nothing is downloaded.

        **Without weights** (`MODEL_DIR = ""`, e.g. on a CPU or in CI) the notebook builds a tiny *untrained*
        VideoMaker (`configs/videomaker.py:tiny`), saves it in the `jaxvc convert` checkpoint format and loads it
        back through the same path, at 32x32 with 8 frames and 4 steps: it runs top to bottom on a CPU (most of the
        time is XLA compiling the model once), and its video is noise. For a small model that has learned something on a CPU,
        see `train_tiny.ipynb` and `jaxvc demo`.
    '''),
    _code('''
        # Parameters (papermill: this cell is tagged "parameters")
        JAXVC_SOURCE = "/content/drive/MyDrive/jaxvc"  # Colab only: the jaxvc repository (a Drive folder or a git URL)
        MODEL_DIR = ""        # diffusers AnimateDiff/SD1.5/Wan folder or `jaxvc convert` checkpoint; "" = tiny
        MOTION_ADAPTER = ""   # MotionAdapter folder or AnimateDiff motion-module file, if MODEL_DIR is plain SD1.5
        REFERENCE_IMAGE = ""  # the subject (any image PIL reads; transparent pixels become white); "" = synthetic
        PROMPT = "a subject moves left on a sky background"
        NEGATIVE_PROMPT = None  # None: the model's (a training run's validation.negative_prompt, else "")
        FRAMES, HEIGHT, WIDTH = None, None, None  # None: the model's (16 x 512 x 512; Wan: 81 x 480 x 832; a run's)
        STEPS = None          # None: the model's (DDIM 30; Wan 50; a run's validation steps); 20-25 for "dpm++"
        SAMPLER = None        # None: the model's own (DDIM; a Wan folder's UniPC), or "dpm++", "dpm++-karras",
                              # "dpm++-sde", "unipc" (diffusers' multistep solvers; -karras: AnimateDiff only)
        GUIDANCE = None       # classifier-free guidance; None: the model's (VideoMaker's 8, Wan's 5, a run's)
        SEED = 0
        DTYPE = "auto"        # UNet compute dtype: "auto" = bfloat16 on TPU/GPU, float32 on CPU
        FPS = None            # None: the model's rate (8; Wan 2.1 16, TI2V-5B 24)
        OUTPUT_DIR = "outputs"  # on Colab, a Drive folder keeps the files
        TINY_SETTINGS = dict(FRAMES=8, HEIGHT=32, WIDTH=32, STEPS=4)  # replace the above when MODEL_DIR == ""
    ''', "parameters"),
    _code(SETUP.replace("@DRIVE_PATHS@", "JAXVC_SOURCE, MODEL_DIR, MOTION_ADAPTER, REFERENCE_IMAGE, OUTPUT_DIR"),
          "setup"),
    _md('''
        ## Load the pipeline

        `CustomVideoPipeline.from_pretrained` reads either kind of folder (`jaxvc/convert/pipeline.py:load_pipeline`),
        exactly as `jaxvc generate --model MODEL_DIR` does.
    '''),
    _code('''
        from pathlib import Path

        import numpy as np
        from IPython.display import display

        from jaxvc import media
        from jaxvc.notebook import show_videos
        from jaxvc.pipeline import CustomVideoPipeline, load_reference_image

        if DTYPE == "auto":
            DTYPE = "float32" if jax.default_backend() == "cpu" else "bfloat16"
        model_path = MODEL_DIR
        if not model_path:
            # A tiny untrained VideoMaker written in the `jaxvc convert` checkpoint format, so the load below is the
            # same code path as for real weights.
            from jaxvc.config_utils import load_config
            from jaxvc.convert.pipeline import PipelineWeights, save_converted
            from jaxvc.methods import build_method

            start = time.perf_counter()
            method = build_method(load_config("configs/videomaker.py:tiny"))  # found in the jaxvc repository
            params = jax.jit(method.init_params)(jax.random.key(SEED))["params"]
            weights = PipelineWeights(
                method.unet.config, {"params": params["unet"]}, method.vae.config, {"params": params["vae"]},
                method.text_encoder.config, {"params": params["text_encoder"]}, tokenizer_folder=None,
                scheduler_config=method.scheduler_config())
            model_path = str(save_converted(weights, "tiny_videomaker_checkpoint", overwrite=True))
            FRAMES, HEIGHT, WIDTH, STEPS = (TINY_SETTINGS[k] for k in ("FRAMES", "HEIGHT", "WIDTH", "STEPS"))
            print(f"MODEL_DIR is empty: built an untrained tiny VideoMaker in {time.perf_counter() - start:.1f}s, "
                  f"saved to {model_path}; using {TINY_SETTINGS}")

        start = time.perf_counter()
        pipe = CustomVideoPipeline.from_pretrained(model_path, motion_adapter=MOTION_ADAPTER or None, dtype=DTYPE)
        FRAMES, HEIGHT, WIDTH = (mine or default for mine, default in zip((FRAMES, HEIGHT, WIDTH), pipe.default_video))
        sizes = {name: sum(x.size for x in jax.tree.leaves(tree)) for name, tree in pipe.params.items()}
        print(f"loaded {type(pipe).__name__} from {model_path} in {time.perf_counter() - start:.1f}s: "
              + ", ".join(f"{name} {count / 1e6:.2f}M params" for name, count in sizes.items() if count)
              + f"; compute dtype {DTYPE}; {FRAMES} frames at {HEIGHT}x{WIDTH}; "
              + ("takes a reference image" if pipe.takes_reference else "text-to-video: no reference image"))
    '''),
    _md('''
        ## Pick the reference image and the prompt

        `REFERENCE_IMAGE` can be any file on the mounted Drive (or upload one with `google.colab.files.upload()`).
        Left empty, the reference is a held-out subject of jaxvc's synthetic world (`jaxvc/data/synthetic.py`),
        drawn on white like the papers' references. A text-to-video model (a Wan T2V folder) takes none.
    '''),
    _code('''
        if not pipe.takes_reference:
            reference = None
            print("text-to-video model: no reference image")
        elif REFERENCE_IMAGE:
            reference = REFERENCE_IMAGE
            print(f"reference: {REFERENCE_IMAGE}")
        else:
            from jaxvc.data.synthetic import SyntheticWorld

            world = SyntheticWorld(image_size=min(HEIGHT, WIDTH), num_frames=FRAMES)
            subject_id = world.held_out_subject_ids[0]
            reference = world.reference_image(subject_id, seed=SEED)
            print(f"reference: synthetic subject {subject_id}, {world.caption(subject_id)}")
        print(f"prompt: {PROMPT!r}")
        if reference is not None:
            # what the model sees: resized to cover (HEIGHT, WIDTH) and centre-cropped, in [-1, 1]
            reference_pixels = media.to_uint8(load_reference_image(reference, HEIGHT, WIDTH))
            display(media.contact_sheet([reference_pixels[None]], ["reference"], cell=128))
    '''),
    _md('''
        ## Generate

        The first call compiles the sampling loop for these shapes, so it takes longer than the rest; later calls
        with the same sizes, step count and guidance scale reuse the compiled loop.
    '''),
    _code('''
        start = time.perf_counter()
        frames = pipe(reference, PROMPT, negative_prompt=NEGATIVE_PROMPT, guidance_scale=GUIDANCE,
                      num_inference_steps=STEPS, seed=SEED, num_frames=FRAMES, height=HEIGHT, width=WIDTH,
                      sampler=SAMPLER)
        print(f"generated {frames.shape} {frames.dtype} frames in {time.perf_counter() - start:.1f}s "
              "(including compilation)")
    ''', "generate"),
    _code('''
        show_videos([frames], [PROMPT], kind="mp4", fps=FPS or pipe.default_fps)
        if reference is None:
            display(media.contact_sheet([frames], ["generated"]))
        else:
            display(media.contact_sheet([reference_pixels[None], frames], ["reference", "generated"]))
    ''', "show-video"),
    _md("## Save the MP4, the GIF and the contact sheet"),
    _code('''
        files = pipe.save(frames, OUTPUT_DIR, name="video", reference=reference, fps=FPS)
        for kind, path in files.items():
            print(f"{kind}: {path} ({path.stat().st_size:,} bytes)")
    ''', "save"),
]

# -------------------------------------------------------------------------------------------- training notebook
TRAINING = [
    _md('''
        # jaxvc: train a tiny VideoMaker on the synthetic subject world

        The whole training loop at toy scale, on a CPU in minutes: the config, the Grain input pipeline,
        `jaxvc.train.loop.train` (the same trainer `jaxvc train` runs on a TPU pod), the loss curve, then a video
        of a subject the model never saw, generated with and without its reference image. The captions say how the
        subject moves but not what it looks like ("a subject moves left on a sky background"), so only the
        reference carries the identity.

        A few dozen steps only start to learn (colour blobs, not yet the subject): `jaxvc demo` trains the full demo
        model (`configs/videomaker.py:demo`) and scores it with the synthetic world's exact metrics.
    '''),
    _code('''
        # Parameters (papermill: this cell is tagged "parameters")
        JAXVC_SOURCE = "/content/drive/MyDrive/jaxvc"  # Colab only: the jaxvc repository (a Drive folder or a git URL)
        STEPS = 30              # the demo config trains 1200
        BATCH_SIZE = 4          # the demo config uses 8
        WARMUP_STEPS = 5        # the demo config warms up for 50
        UNET_WIDTHS = (16, 32, 32)  # the demo's UNet is (64, 64, 64); narrower trains faster on a CPU
        WORKDIR = "train_tiny_run"  # checkpoints, TensorBoard logs and config.json
        FRESH_RUN = True        # delete WORKDIR first (train() would otherwise resume from its checkpoints)
        SAMPLING_STEPS = 10     # DDIM steps when generating
        GUIDANCE = 3.0
        SEED = 0
    ''', "parameters"),
    _code(SETUP.replace("@DRIVE_PATHS@", "JAXVC_SOURCE, WORKDIR"), "setup"),
    _md('''
        ## The config

        `configs/videomaker.py:demo` with a few overrides, written exactly as `jaxvc train` takes them on the command
        line (the printed command runs the same training outside the notebook).
    '''),
    _code('''
        import shlex
        from pathlib import Path

        import numpy as np
        from IPython.display import display

        from jaxvc import media
        from jaxvc.config_utils import apply_overrides, load_config

        OVERRIDES = [f"steps={STEPS}", f"batch_size={BATCH_SIZE}", f"optim.warmup_steps={WARMUP_STEPS}",
                     f"model.unet_overrides.block_out_channels={tuple(UNET_WIDTHS)}", "log_every=5",
                     f"checkpoint.every={STEPS}", "progress_bar=False", f"seed={SEED}"]
        config = apply_overrides(load_config("configs/videomaker.py:demo"), OVERRIDES)  # found in the jaxvc repository
        print("jaxvc train --config configs/videomaker.py:demo --workdir", WORKDIR,
              " ".join(shlex.quote(f"--config.{o}") for o in OVERRIDES))
        model = config.model
        print(f"\\nmodel: {model.image_size}x{model.image_size} pixels, {model.num_frames} frames, "
              f"{model.pixel_patch}x{model.pixel_patch} patches, UNet {tuple(model.unet_overrides.block_out_channels)}, "
              f"{model.options.prediction_type} prediction, {model.options.beta_schedule} betas")
        print(f"method options: {dict(model.options)}")
        print(f"optimizer: {dict(config.optim)}")
    '''),
    _md('''
        ## The data: a Grain pipeline over the synthetic world

        `jaxvc/data/training_streams.py` turns `config.data` into the trainer's input: the synthetic world's video
        stream (`SyntheticVideoSource`), clips and references cut by `jaxvc/data/pipeline.py`, captions tokenized.
        Each batch is a pure function of its index, so the iterator state saved in checkpoints is tiny and resuming
        is exact. Here is the first batch.
    '''),
    _code('''
        from jaxvc.data.training_streams import from_config as data_from_config, world_from_config

        world = world_from_config(config)
        print(f"synthetic world: {world.num_subjects} subjects, {len(world.held_out_subject_ids)} held out of training "
              f"{world.held_out_subject_ids}")
        data = data_from_config(config, rows=(0, config.batch_size))
        batch = next(data)
        for key, value in batch.items():
            print(f"  {key:<12} {getattr(value, 'dtype', type(value).__name__)!s:<8} {np.shape(value)}")
        for i, text in enumerate(batch["caption"]):
            print(f"  clip {i}: {text}")
        rows, labels = [], []
        for i in range(len(batch["caption"])):
            rows += [batch["reference"][i][None], batch["video"][i]]
            labels += [f"reference {i}", f"clip {i}"]
        display(media.contact_sheet(rows, labels, cell=48))
        data.close()
    ''', "data"),
    _md('''
        ## Train

        `train(config, method, data, workdir)` builds the mesh (here one CPU device), creates the sharded state,
        compiles the step, runs it, writes TensorBoard scalars every `log_every` steps and an Orbax checkpoint at
        the end. `data` is a factory: the trainer asks it for this host's rows of every global batch.
    '''),
    _code('''
        import shutil

        from jaxvc.methods import build_method
        from jaxvc.train.loop import train

        if FRESH_RUN:
            shutil.rmtree(WORKDIR, ignore_errors=True)
        method = build_method(config)
        start = time.perf_counter()
        result = train(config, method, lambda rows: data_from_config(config, rows), WORKDIR)
        train_seconds = time.perf_counter() - start
        losses = np.array([h["loss"] for h in result.history])
        print(f"trained steps {result.start_step} -> {result.final_step} in {train_seconds:.0f}s (including "
              f"compilation); mean loss of the first 3 steps {losses[:3].mean():.3f}, of the last 10 "
              f"{losses[-10:].mean():.3f}")
    ''', "train"),
    _code('''
        import matplotlib.pyplot as plt

        from jaxvc.notebook import moving_average

        steps = np.array([h["step"] for h in result.history])
        figure, (loss_axis, lr_axis) = plt.subplots(1, 2, figsize=(10, 3.2))
        loss_axis.plot(steps, losses, alpha=0.4, label="loss per step")
        loss_axis.plot(steps, moving_average(losses, 5), label="mean of the last 5")
        loss_axis.set(xlabel="step", ylabel=f"{config.model.options.prediction_type} MSE (+ GIRL terms)",
                      title="training loss")
        loss_axis.legend()
        lr_axis.plot(steps, [h["learning_rate"] for h in result.history])
        lr_axis.set(xlabel="step", ylabel="learning rate", title=f"{config.optim.schedule} schedule")
        figure.tight_layout()
        plt.show()
    ''', "loss-plot"),
    _md('''
        ## Sample a held-out subject, with and without its reference

        `method.pipeline(params, tokenizer)` wraps the trained weights in the same `CustomVideoPipeline` the
        inference notebook loads from files. Without a reference (a zero reference latent, the branch trained by
        reference dropout) the model only knows "a subject".
    '''),
    _code('''
        from jaxvc.data.synthetic import caption
        from jaxvc.models.tokenizer import load_tokenizer
        from jaxvc.notebook import show_videos

        pipe = method.pipeline(result.state.full_params(), load_tokenizer(config.model.get("tokenizer")))
        subject_id = world.held_out_subject_ids[0]
        reference = world.reference_image(subject_id, seed=SEED)
        prompt = caption(world.subject(subject_id), "left", "sky", name=config.data.caption_name)
        common = dict(num_frames=config.model.num_frames, height=config.model.image_size,
                      width=config.model.image_size, num_inference_steps=SAMPLING_STEPS, guidance_scale=GUIDANCE,
                      seed=SEED, progress=False)
        start = time.perf_counter()
        with_reference = pipe(reference, prompt, **common)
        without_reference = pipe(None, prompt, **common)
        print(f"held-out subject {subject_id} ({caption(world.subject(subject_id))}), prompt {prompt!r}: two videos "
              f"{with_reference.shape} in {time.perf_counter() - start:.1f}s")
        show_videos([with_reference, without_reference], ["with the reference", "without (text only)"], kind="mp4")
        display(media.contact_sheet([reference[None], with_reference, without_reference],
                                    ["reference", "with reference", "no reference"]))
    ''', "show-video"),
    _md('''
        ## TensorBoard logs and checkpoints

        The scalars (`train/loss`, `train/learning_rate`, `train/grad_norm`, `perf/step_time_s`,
        `perf/samples_per_s`, `method/...`) are in `WORKDIR/tensorboard`. View them with
        `tensorboard --logdir train_tiny_run/tensorboard`, or inside Colab:

        ```
        %load_ext tensorboard
        %tensorboard --logdir train_tiny_run/tensorboard
        ```

        Read back here without TensorBoard (`jaxvc.notebook.read_scalars`):
    '''),
    _code('''
        from jaxvc.notebook import read_scalars

        scalars = read_scalars(Path(WORKDIR) / "tensorboard")
        for tag, points in sorted(scalars.items()):
            print(f"{tag:<28} {len(points)} points, last (step {points[-1][0]}): {points[-1][1]:.4g}")
        checkpoints = sorted(p.name for p in (Path(WORKDIR) / "checkpoints").iterdir() if p.name.isdigit())
        print(f"checkpoints in {WORKDIR}/checkpoints: {checkpoints}; the run's config: {WORKDIR}/config.json")
        print("the `jaxvc train` command printed above with a larger --config.steps continues this run from its "
              "last checkpoint")
    ''', "tensorboard"),
]

NOTEBOOKS = {"colab_tpu_inference.ipynb": INFERENCE, "train_tiny.ipynb": TRAINING}


def build(name: str) -> nbformat.NotebookNode:
    """The notebook ``name`` (a key of NOTEBOOKS), without outputs."""
    notebook = nbformat.v4.new_notebook()
    notebook.cells = [nbformat.from_dict(cell) for cell in NOTEBOOKS[name]]
    for index, cell in enumerate(notebook.cells):  # stable ids: regenerating gives the same file
        cell.id = f"{Path(name).stem.replace('_', '-')}-{index:02d}"
    notebook.metadata["kernelspec"] = dict(KERNELSPEC)
    notebook.metadata["language_info"] = {"name": "python"}
    if name == "colab_tpu_inference.ipynb":
        notebook.metadata["accelerator"] = "TPU"  # Colab opens it on a TPU runtime
        notebook.metadata["colab"] = {"provenance": []}
    nbformat.validate(notebook)
    return notebook


def main(argv=None) -> int:
    for name in NOTEBOOKS:
        nbformat.write(build(name), HERE / name)
        print(f"wrote {HERE / name}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
