#!/usr/bin/env bash
# Train on several GPU machines, one jaxvc process per machine (it drives all of that machine's GPUs), under SLURM or
# over plain ssh. Process 0's machine is the jax.distributed coordinator.
#
#   launch/gpu_multinode.sh --slurm [--nodes N] [--gpus-per-node G] [--partition P] [--time T] [--job-name NAME]
#                           --config configs/videomaker.py:sd15 --workdir DIR [--port 12355] [--coordinator HOST]
#                           [--remote-dir DIR] [--python PY] [--setup [--cuda 12|13]] [--log-dir DIR] [--dry-run]
#                           [-- --config.KEY=VALUE ...]
#   launch/gpu_multinode.sh --hosts h1,h2,... --config ... --workdir DIR [--port 12355] [--coordinator HOST]
#                           [--remote-dir DIR] [--python PY] [--copy] [--setup [--cuda 12|13]] [--detach]
#                           [--run-id ID] [--log-dir DIR] [--stop-timeout S] [--dry-run] [-- --config.KEY=VALUE ...]
#   launch/gpu_multinode.sh --hosts h1,h2,... (--logs | --stop) [--run-id ID] [--dry-run]
#   launch/gpu_multinode.sh --slurm --stop --job-name NAME        (when srun made the allocation)
#
# SLURM: run inside an allocation (sbatch/salloc) or let srun allocate (--nodes/--partition/...). One task per node;
# each task reads its process id and the process count from SLURM_PROCID/SLURM_NTASKS and takes the first node of
# the step as coordinator; output lines are prefixed with the task id (srun --label) and appended to
# LOG_DIR/train.log. Ctrl-C or SIGTERM sends SIGTERM to srun, which forwards it to every task (the trainer saves a
# checkpoint and exits).
# ssh: the hosts (user@host allowed) get process ids 0..N-1 in the order given; the first is the coordinator
# (--coordinator names it as the others reach it, e.g. an internal IP). Each host runs training detached (log in
# ~/jaxvc-logs/RUN_ID/process-I.log there); the streams come here prefixed with [process-I] and are appended to
# LOG_DIR/process-I.log. Ctrl-C or SIGTERM stops every host (SIGTERM, then SIGKILL after --stop-timeout s).
# The code is expected at --remote-dir on every host (default: this checkout's path, i.e. a shared file system);
# --copy ships the working tree there (ssh mode); --setup makes .venv there (launch/setup_env.sh + jax[cudaNN]),
# once per copy (on the first host / node only when the file system is shared). --workdir must be shared storage.
# $JAXVC_SSH / $JAXVC_SCP replace `ssh -o BatchMode=yes` / `scp -q`. --dry-run prints the commands instead.
set -euo pipefail
PROG=gpu_multinode.sh
# shellcheck source=launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; }

slurm=0 hosts_arg="" config="" workdir="" port=12355 coordinator="" remote_dir="$REPO_ROOT" python=.venv/bin/python
copy=0 setup=0 cuda=12 detach=0 run_id="" log_dir="" stop_timeout=300 action=run
nodes="" gpus_per_node="" partition="" time_limit="" job_name=""
overrides=()
while [ $# -gt 0 ]; do
  case "$1" in
    --*=*) flag="${1%%=*}"; value="${1#*=}"; shift; set -- "$flag" "$value" "$@"; continue ;;
  esac
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --slurm) slurm=1; shift ;;
    --hosts) need "$@"; hosts_arg=$2; shift 2 ;;
    --config) need "$@"; config=$2; shift 2 ;;
    --workdir) need "$@"; workdir=$2; shift 2 ;;
    --port) need "$@"; positive_int "$@"; [ "$2" -le 65535 ] || die "--port must be <= 65535, got '$2'"
            port=$2; shift 2 ;;
    --coordinator) need "$@"; coordinator=$2; shift 2 ;;
    --remote-dir) need "$@"; remote_dir=$2; shift 2 ;;
    --python) need "$@"; python=$2; shift 2 ;;
    --cuda) need "$@"; [[ $2 =~ ^(12|13)$ ]] || die "--cuda must be 12 or 13, got '$2'"; cuda=$2; shift 2 ;;
    --run-id) need "$@"; run_id=$2; shift 2 ;;
    --log-dir) need "$@"; log_dir=$2; shift 2 ;;
    --stop-timeout) need "$@"; positive_int "$@"; stop_timeout=$2; shift 2 ;;
    --nodes) need "$@"; positive_int "$@"; nodes=$2; shift 2 ;;
    --gpus-per-node) need "$@"; positive_int "$@"; gpus_per_node=$2; shift 2 ;;
    --partition) need "$@"; partition=$2; shift 2 ;;
    --time) need "$@"; time_limit=$2; shift 2 ;;
    --job-name) need "$@"; job_name=$2; shift 2 ;;
    --copy) copy=1; shift ;;
    --setup) setup=1; shift ;;
    --detach) detach=1; shift ;;
    --dry-run) DRY_RUN=1; shift ;;
    --stop|--logs)
      [ "$action" = run ] || die "choose one of --stop, --logs (got --$action and $1)"
      action=${1#--}; shift ;;
    --) shift; overrides=("$@"); break ;;
    *) die "unknown argument '$1' (see --help)" ;;
  esac
done

if [ "$slurm" = 1 ] && [ -n "$hosts_arg" ]; then die "give --slurm or --hosts, not both"; fi
[ "$slurm" = 1 ] || [ -n "$hosts_arg" ] || die "say where to run: --slurm or --hosts h1,h2,..."
hosts=()
if [ -n "$hosts_arg" ]; then
  IFS=, read -r -a hosts <<<"$hosts_arg"
  for host in "${hosts[@]}"; do
    [[ $host =~ ^([A-Za-z0-9._-]+@)?[A-Za-z0-9._-]+$ ]] || die "--hosts: '$host' is not a host name (list: h1,h2,...)"
  done
fi
run_id=${run_id:-$(basename "${workdir:-jaxvc}")}
log_dir=${log_dir:-$REPO_ROOT/runs/launch/$run_id}
job_name_given=$job_name
job_name=${job_name:-jaxvc-$run_id}
read -r -a ssh_cmd <<<"${JAXVC_SSH:-ssh -o BatchMode=yes}"
read -r -a scp_cmd <<<"${JAXVC_SCP:-scp -q}"

# ssh HOST SCRIPT: the script runs under bash whatever the remote login shell is
on_host() { local host=$1 script=$2; run "${ssh_cmd[@]}" "$host" "bash -c $(quote_word "$script")"; }

stop_hosts() {
  local i
  for i in "${!hosts[@]}"; do
    if [ "$DRY_RUN" = 1 ]; then
      on_host "${hosts[$i]}" "$(stop_script "$run_id" "process-$i" "$stop_timeout")"
    else
      on_host "${hosts[$i]}" "$(stop_script "$run_id" "process-$i" "$stop_timeout")" &
    fi
  done
  [ "$DRY_RUN" = 1 ] || wait
}

case "$action" in
  stop)
    if [ "$slurm" = 1 ]; then
      [ -n "$job_name_given" ] || die "--stop with --slurm needs --job-name (the name srun ran under)"
      run scancel --signal=TERM --name="$job_name"
    else
      stop_hosts
    fi
    exit 0 ;;
  logs)
    [ "$slurm" = 0 ] || die "--logs is for --hosts runs; under SLURM read LOG_DIR/train.log or the job's output"
    for i in "${!hosts[@]}"; do
      start_logged "$log_dir/process-$i.log" "${ssh_cmd[@]}" "${hosts[$i]}" "bash -c $(quote_word "$(logs_script "$run_id" "process-$i")")"
    done
    wait_launched; exit 0 ;;
esac

[ ${#overrides[@]} = 0 ] || check_overrides "${overrides[@]}"
check_config "$config"
[ -n "$workdir" ] || die "--workdir is required (a folder every machine sees, e.g. on the shared file system)"
if [ "$slurm" = 0 ] && [ ${#hosts[@]} -lt 1 ]; then die "--hosts lists no host"; fi
exports="$(exports_inline "$(config_exports gpu "$config" "${overrides[@]}")")"
train=("$python" -m jaxvc.cli train --config "$config" --workdir "$workdir")

if [ "$slurm" = 1 ]; then
  [ "$copy" = 0 ] || die "--copy is for --hosts; under SLURM the code is read from --remote-dir on the shared file system"
  [ "$detach" = 0 ] || die "--detach is for --hosts; under SLURM submit this script with sbatch instead"
  alloc=()
  [ -z "$nodes" ] || alloc+=(--nodes="$nodes")
  [ -z "$gpus_per_node" ] || alloc+=(--gpus-per-node="$gpus_per_node")
  [ -z "$partition" ] || alloc+=(--partition="$partition")
  [ -z "$time_limit" ] || alloc+=(--time="$time_limit")
  one_node=(--nodes=1 --ntasks=1)
  [ -z "$partition" ] || one_node+=(--partition="$partition")
  [ -z "$time_limit" ] || one_node+=(--time="$time_limit")
  [ "$setup" = 0 ] || run srun "${one_node[@]}" bash -c "$(setup_script "$remote_dir" "cuda$cuda")"
  # shellcheck disable=SC2016  # expanded in each task, where SLURM sets these
  first_node='$(scontrol show hostnames "$SLURM_STEP_NODELIST" | head -n 1)'
  task="set -euo pipefail; cd $(quote_word "$remote_dir"); ${exports}coordinator=${coordinator:-$first_node}; "
  # shellcheck disable=SC2016
  task+="exec $(quote_cmd "${train[@]}") --coordinator_address \"\$coordinator:$port\""
  # shellcheck disable=SC2016
  task+=' --num_processes "$SLURM_NTASKS" --process_id "$SLURM_PROCID"'
  [ ${#overrides[@]} = 0 ] || task+=" $(quote_cmd "${overrides[@]}")"
  note "on Ctrl-C or SIGTERM: kill -TERM <srun's pid> (srun forwards it to every task)"
  # shellcheck disable=SC2329  # called by the trap below
  on_signal() {
    trap - INT TERM
    note "stopping: SIGTERM to srun (forwarded to every task)"
    kill -TERM "${LAUNCH_PIDS[@]}" 2>/dev/null || true
    wait_launched || true
    exit 130
  }
  trap on_signal INT TERM
  start_logged "$log_dir/train.log" srun "${alloc[@]}" --ntasks-per-node=1 --job-name="$job_name" \
    --kill-on-bad-exit=1 --label bash -c "$task"
  wait_launched
  exit $?
fi

# ssh hosts
[ -z "$nodes$gpus_per_node$partition$time_limit" ] || die "--nodes/--gpus-per-node/--partition/--time are for --slurm"
coordinator_address="${coordinator:-${hosts[0]#*@}}:$port"
if [ "$copy" = 1 ]; then
  tarball="${TMPDIR:-/tmp}/jaxvc-$run_id.tgz"
  ship_tree "$tarball"
  for host in "${hosts[@]}"; do
    run "${scp_cmd[@]}" "$tarball" "$host:jaxvc-src.tgz"
    on_host "$host" "$(unpack_script jaxvc-src.tgz "$remote_dir")"
  done
fi
if [ "$setup" = 1 ]; then
  setup_hosts=("${hosts[@]}")
  [ "$copy" = 1 ] || setup_hosts=("${hosts[0]}")  # one shared checkout: one .venv
  for host in "${setup_hosts[@]}"; do on_host "$host" "$(setup_script "$remote_dir" "cuda$cuda")"; done
fi
if [ "$detach" = 0 ]; then
  note "on Ctrl-C or SIGTERM:"
  if [ "$DRY_RUN" = 1 ]; then stop_hosts | sed 's/^/# /'; fi
  # shellcheck disable=SC2329  # called by the trap below
  on_signal() {
    trap - INT TERM
    note "stopping the training on ${#hosts[@]} hosts"
    stop_hosts || true
    wait_launched || true
    exit 130
  }
  trap on_signal INT TERM
fi
for i in "${!hosts[@]}"; do
  script="$(start_script "$remote_dir" "$run_id" "process-$i" "$exports" "$((1 - detach))" -- "${train[@]}" \
    --coordinator_address "$coordinator_address" --num_processes "${#hosts[@]}" --process_id "$i" "${overrides[@]}")"
  if [ "$detach" = 1 ]; then
    on_host "${hosts[$i]}" "$script"
  else
    start_logged "$log_dir/process-$i.log" "${ssh_cmd[@]}" "${hosts[$i]}" "bash -c $(quote_word "$script")"
  fi
done
[ "$detach" = 0 ] || { note "started detached: follow with --logs, end with --stop"; exit 0; }
wait_launched
