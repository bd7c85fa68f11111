#!/usr/bin/env bash
# Train on every host of a Cloud TPU VM slice with `gcloud compute tpus tpu-vm`.
#
#   launch/tpu_vm.sh --name NAME --zone ZONE [--project P] --accelerator-type v5p-128 [--version RUNTIME]
#                    [--queued] [--spot] --config configs/videomaker.py:sd15 --workdir gs://BUCKET/RUN
#                    [--no-copy] [--no-setup] [--detach] [--run-id ID] [--log-dir DIR] [--remote-dir DIR]
#                    [--dry-run] [-- --config.KEY=VALUE ...]
#   launch/tpu_vm.sh --name NAME --zone ZONE [--project P] (--logs | --stop | --delete [--queued]) [--dry-run]
#
# A run: create the TPU VM (or a queued resource with --queued, then wait until it is ACTIVE) unless it exists;
# ship the working tree (tracked + untracked files, not .venv) to every worker and make .venv there with
# launch/setup_env.sh plus jax[tpu]; then start `jaxvc train --distributed=auto` on all workers (jax.distributed
# finds the coordinator in the TPU metadata) with config.launch's LIBTPU_INIT_ARGS/XLA_FLAGS exported. Training
# runs detached on each worker (logs in ~/jaxvc-logs/RUN_ID/worker-N.log); its output streams here, each line
# prefixed with [worker-N], and is appended to LOG_DIR/train.log. Ctrl-C or SIGTERM stops the training on all
# workers (SIGTERM: the trainer saves a checkpoint; SIGKILL after --stop-timeout s); --detach returns after the
# start instead, --logs re-attaches, --stop stops, --delete stops and deletes the VM / queued resource.
# --workdir must be storage every worker sees (gs://...). --dry-run prints the commands instead of running them.
# $JAXVC_POLL_SECONDS: how often a queued resource's state is checked (30).
set -euo pipefail
PROG=tpu_vm.sh
# shellcheck source=launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; }

name="" zone="" project="" accelerator="" version="" queued=0 spot=0 config="" workdir="" action=run
copy=1 setup=1 detach=0 run_id="" log_dir="" remote_dir=jaxvc stop_timeout=300
overrides=()
while [ $# -gt 0 ]; do
  case "$1" in
    --*=*) flag="${1%%=*}"; value="${1#*=}"; shift; set -- "$flag" "$value" "$@"; continue ;;
  esac
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --name) need "$@"; name=$2; shift 2 ;;
    --zone) need "$@"; zone=$2; shift 2 ;;
    --project) need "$@"; project=$2; shift 2 ;;
    --accelerator-type) need "$@"; accelerator=$2; shift 2 ;;
    --version) need "$@"; version=$2; shift 2 ;;
    --config) need "$@"; config=$2; shift 2 ;;
    --workdir) need "$@"; workdir=$2; shift 2 ;;
    --run-id) need "$@"; run_id=$2; shift 2 ;;
    --log-dir) need "$@"; log_dir=$2; shift 2 ;;
    --remote-dir) need "$@"; remote_dir=$2; shift 2 ;;
    --stop-timeout) need "$@"; positive_int "$@"; stop_timeout=$2; shift 2 ;;
    --queued) queued=1; shift ;;
    --spot) spot=1; shift ;;
    --no-copy) copy=0; shift ;;
    --no-setup) setup=0; shift ;;
    --detach) detach=1; shift ;;
    --dry-run) DRY_RUN=1; shift ;;
    --stop|--delete|--logs)
      [ "$action" = run ] || die "choose one of --stop, --delete, --logs (got --$action and $1)"
      action=${1#--}; shift ;;
    --) shift; overrides=("$@"); break ;;
    *) die "unknown argument '$1' (see --help)" ;;
  esac
done

[ -n "$name" ] || die "--name is required (the TPU VM / queued resource name)"
[[ $name =~ ^[a-z]([-a-z0-9]*[a-z0-9])?$ ]] || die "--name '$name' must be lower-case letters, digits and dashes"
[ -n "$zone" ] || die "--zone is required (e.g. us-east5-a)"
run_id=${run_id:-$name}
log_dir=${log_dir:-$REPO_ROOT/runs/launch/$run_id}
loc=(--zone="$zone")
[ -z "$project" ] || loc+=(--project="$project")
ssh_all=(gcloud compute tpus tpu-vm ssh "$name" "${loc[@]}" --worker=all)
# The worker's index in the slice, from the TPU VM metadata server (the hostname if that is unreachable).
# shellcheck disable=SC2016  # expanded on the worker, not here
label='worker-$(curl -s -f -H Metadata-Flavor:Google http://metadata.google.internal/computeMetadata/v1/instance/attributes/agent-worker-number || hostname)'

stop_all() { run "${ssh_all[@]}" --command="$(stop_script "$run_id" "$label" "$stop_timeout")"; }

case "$action" in
  stop) stop_all; exit 0 ;;
  logs) run "${ssh_all[@]}" --command="$(logs_script "$run_id" "$label")"; exit 0 ;;
  delete)
    stop_all || note "could not stop the training (already gone?); deleting anyway"
    if [ "$queued" = 1 ]; then
      run gcloud compute tpus queued-resources delete "$name" "${loc[@]}" --force --quiet
    else
      run gcloud compute tpus tpu-vm delete "$name" "${loc[@]}" --quiet
    fi
    exit 0 ;;
esac

[ ${#overrides[@]} = 0 ] || check_overrides "${overrides[@]}"
check_config "$config"
[ -n "$workdir" ] || die "--workdir is required (storage all workers share, e.g. gs://BUCKET/runs/NAME)"
[ -n "$accelerator" ] || die "--accelerator-type is required (e.g. v5p-128, v6e-64, v4-32)"
[[ $accelerator =~ ^v[0-9]+[a-z]*-[0-9]+$ ]] || die "--accelerator-type '$accelerator' does not look like v5p-128 / v6e-64 / v5litepod-16"
if [ -z "$version" ]; then
  case "$accelerator" in
    v4-*) version=tpu-ubuntu2204-base ;;
    v5p-*) version=v2-alpha-tpuv5 ;;
    v5litepod-*) version=v2-alpha-tpuv5-lite ;;
    v6e-*) version=v2-alpha-tpuv6e ;;
    *) die "no default --version (TPU runtime) for '$accelerator'; pass one" ;;
  esac
fi
exports="$(config_exports tpu "$config" "${overrides[@]}")"

# 1. the slice: reuse it if it exists, else create it
if [ "$queued" = 1 ]; then
  describe=(gcloud compute tpus queued-resources describe "$name" "${loc[@]}" --format='value(state.state)')
  create=(gcloud compute tpus queued-resources create "$name" --node-id="$name" "${loc[@]}"
          --accelerator-type="$accelerator" --runtime-version="$version")
else
  describe=(gcloud compute tpus tpu-vm describe "$name" "${loc[@]}" --format='value(state)')
  create=(gcloud compute tpus tpu-vm create "$name" "${loc[@]}" --accelerator-type="$accelerator" --version="$version")
fi
[ "$spot" = 0 ] || create+=(--spot)
if [ "$DRY_RUN" = 1 ]; then
  quote_cmd "${describe[@]}"
  note "if the describe above fails (no such resource):"
  quote_cmd "${create[@]}"
  [ "$queued" = 0 ] || note "then repeat the describe every 30 s until it prints ACTIVE"
else
  if state="$("${describe[@]}" 2>/dev/null)"; then
    note "reusing $name ($state)"
  else
    note "creating $name ($accelerator, $version)"
    "${create[@]}"
  fi
  if [ "$queued" = 1 ]; then
    while state="$("${describe[@]}")" && [ "$state" != ACTIVE ]; do
      case "$state" in FAILED|SUSPENDED) die "queued resource $name is $state";; esac
      note "queued resource $name is $state; waiting"; sleep "${JAXVC_POLL_SECONDS:-30}"
    done
  fi
fi

# 2. the code and the environment on every worker
if [ "$copy" = 1 ]; then
  tarball="${TMPDIR:-/tmp}/jaxvc-$run_id.tgz"
  ship_tree "$tarball"
  run gcloud compute tpus tpu-vm scp "$tarball" "$name:jaxvc-src.tgz" "${loc[@]}" --worker=all
  run "${ssh_all[@]}" --command="$(unpack_script jaxvc-src.tgz "$remote_dir")"
fi
[ "$setup" = 0 ] || run "${ssh_all[@]}" --command="$(setup_script "$remote_dir" tpu)"

# 3. training on all workers
train=(.venv/bin/jaxvc train --config "$config" --workdir "$workdir" --distributed=auto "${overrides[@]}")
start="$(start_script "$remote_dir" "$run_id" "$label" "$(exports_inline "$exports")" "$((1 - detach))" -- "${train[@]}")"
if [ "$detach" = 1 ]; then
  run "${ssh_all[@]}" --command="$start"
  note "started detached: follow with --logs, end with --stop"
  exit 0
fi
note "on Ctrl-C or SIGTERM:"
if [ "$DRY_RUN" = 1 ]; then printf '# %s\n' "$(stop_all)"; fi
on_signal() {
  trap - INT TERM
  note "stopping the training on all workers of $name"
  stop_all || true
  wait_launched || true
  exit 130
}
trap on_signal INT TERM
start_logged "$log_dir/train.log" "${ssh_all[@]}" --command="$start"
wait_launched
