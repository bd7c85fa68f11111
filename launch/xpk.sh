#!/usr/bin/env bash
# Train on TPU slices of a GKE cluster with XPK (`xpk workload create`), one pod per TPU host.
#
#   launch/xpk.sh --cluster C --zone ZONE [--project P] --workload W --tpu-type v5p-128 [--num-slices N]
#                 (--docker-image IMAGE | --base-docker-image IMAGE) --config configs/videomaker.py:sd15
#                 --workdir gs://BUCKET/RUN [--priority P] [--max-restarts N] [--detach] [--log-dir DIR]
#                 [--dry-run] [-- --config.KEY=VALUE ...]
#   launch/xpk.sh --cluster C --zone ZONE [--project P] (--list | --logs --workload W | --delete --workload W)
#
# --docker-image: an image with jaxvc installed from this repository (`pip install -e .` and jax[tpu]); the pods
# run `jaxvc train` in it. --base-docker-image (e.g. python:3.11): the working tree (tracked + untracked files, not
# .venv) is staged into a folder that xpk builds into an image on top of it (--script-dir); each pod then makes
# .venv with launch/setup_env.sh plus jax[tpu] before training. Every pod runs `jaxvc train --distributed=auto`
# (jax.distributed takes the coordinator, and the slices' DCN setup, from the environment XPK/JobSet gives each pod)
# with config.launch's LIBTPU_INIT_ARGS/XLA_FLAGS exported. After the create, the pods' logs stream here via
# `kubectl logs -f` (each line prefixed with its pod) and are appended to LOG_DIR/train.log; Ctrl-C or SIGTERM
# deletes the workload (its pods get SIGTERM: the trainer saves a checkpoint in the grace period). --detach only
# creates it; --logs re-attaches; --delete deletes it; --list lists the cluster's workloads.
# --workdir must be storage every pod sees (gs://...). --dry-run prints the commands instead of running them.
# $JAXVC_POLL_SECONDS: how often to look for the workload's pods while it is queued (10).
set -euo pipefail
PROG=xpk.sh
# shellcheck source=launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; }

cluster="" zone="" project="" workload="" tpu_type="" num_slices=1 image="" base_image="" config="" workdir=""
priority="" max_restarts="" detach=0 log_dir="" action=run
overrides=()
while [ $# -gt 0 ]; do
  case "$1" in
    --*=*) flag="${1%%=*}"; value="${1#*=}"; shift; set -- "$flag" "$value" "$@"; continue ;;
  esac
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --cluster) need "$@"; cluster=$2; shift 2 ;;
    --zone) need "$@"; zone=$2; shift 2 ;;
    --project) need "$@"; project=$2; shift 2 ;;
    --workload) need "$@"; workload=$2; shift 2 ;;
    --tpu-type) need "$@"; tpu_type=$2; shift 2 ;;
    --num-slices) need "$@"; positive_int "$@"; num_slices=$2; shift 2 ;;
    --docker-image) need "$@"; image=$2; shift 2 ;;
    --base-docker-image) need "$@"; base_image=$2; shift 2 ;;
    --config) need "$@"; config=$2; shift 2 ;;
    --workdir) need "$@"; workdir=$2; shift 2 ;;
    --priority) need "$@"; priority=$2; shift 2 ;;
    --max-restarts) need "$@"; [[ $2 =~ ^[0-9]+$ ]] || die "--max-restarts must be an integer >= 0, got '$2'"
                    max_restarts=$2; shift 2 ;;
    --log-dir) need "$@"; log_dir=$2; shift 2 ;;
    --detach) detach=1; shift ;;
    --dry-run) DRY_RUN=1; shift ;;
    --list|--logs|--delete)
      [ "$action" = run ] || die "choose one of --list, --logs, --delete (got --$action and $1)"
      action=${1#--}; shift ;;
    --) shift; overrides=("$@"); break ;;
    *) die "unknown argument '$1' (see --help)" ;;
  esac
done

[ -n "$cluster" ] || die "--cluster is required (the GKE cluster xpk made)"
[ -n "$zone" ] || die "--zone is required (e.g. us-east5-a)"
[[ $zone =~ ^[a-z]+-[a-z]+[0-9]+-[a-z]$ ]] || die "--zone '$zone' does not look like a zone (e.g. us-east5-a)"
loc=(--cluster="$cluster" --zone="$zone")
[ -z "$project" ] || loc+=(--project="$project")
if [ "$action" != list ]; then
  [ -n "$workload" ] || die "--workload is required (a name for this run, e.g. sd15-run1)"
  # a JobSet name: lower-case DNS label, and xpk appends suffixes, so keep it short
  [[ $workload =~ ^[a-z]([-a-z0-9]{0,38}[a-z0-9])?$ ]] || die "--workload '$workload' must be lower-case letters, digits and dashes (at most 40)"
fi
log_dir=${log_dir:-$REPO_ROOT/runs/launch/$workload}
selector="jobset.sigs.k8s.io/jobset-name=$workload"
credentials=(gcloud container clusters get-credentials "$cluster" --region="${zone%-*}")
[ -z "$project" ] || credentials+=(--project="$project")
stream=(kubectl logs -f -l "$selector" --all-containers=true --prefix=true --max-log-requests=1024)

case "$action" in
  list) run xpk workload list "${loc[@]}"; exit 0 ;;
  delete) run xpk workload delete --workload="$workload" "${loc[@]}"; exit 0 ;;
  logs) run "${credentials[@]}"; run "${stream[@]}"; exit 0 ;;
esac

[ ${#overrides[@]} = 0 ] || check_overrides "${overrides[@]}"
check_config "$config"
[ -n "$workdir" ] || die "--workdir is required (storage all pods share, e.g. gs://BUCKET/runs/NAME)"
[ -n "$tpu_type" ] || die "--tpu-type is required (e.g. v5p-128, v6e-256)"
[[ $tpu_type =~ ^v[0-9]+[a-z]*-[0-9]+$ ]] || die "--tpu-type '$tpu_type' does not look like v5p-128 / v6e-256 / v5litepod-16"
if [ -n "$image" ] && [ -n "$base_image" ]; then die "give --docker-image or --base-docker-image, not both"; fi
[ -n "$image$base_image" ] || die "--docker-image (jaxvc installed) or --base-docker-image (the working tree is added) is required"
exports="$(config_exports tpu "$config" "${overrides[@]}")"

train=(train --config "$config" --workdir "$workdir" --distributed=auto "${overrides[@]}")
create=(xpk workload create --workload="$workload" "${loc[@]}" --tpu-type="$tpu_type" --num-slices="$num_slices")
if [ -n "$image" ]; then
  command="$(exports_inline "$exports")$(quote_cmd jaxvc "${train[@]}")"
  create+=(--docker-image="$image")
else
  stage="${TMPDIR:-/tmp}/jaxvc-xpk-$workload"
  tarball="$stage.tgz"
  ship_tree "$tarball"
  run rm -rf "$stage"
  run mkdir -p "$stage"
  run tar -xzf "$tarball" -C "$stage"
  command="bash launch/setup_env.sh && $(plugin_install tpu) && "
  command+="$(exports_inline "$exports")$(quote_cmd .venv/bin/jaxvc "${train[@]}")"
  create+=(--base-docker-image="$base_image" --script-dir="$stage")
fi
create+=(--command="$command")
[ -z "$priority" ] || create+=(--priority="$priority")
[ -z "$max_restarts" ] || create+=(--max-restarts="$max_restarts")
run "${create[@]}"
if [ "$detach" = 1 ]; then
  note "created $workload; follow with --logs, end with --delete"
  exit 0
fi

run "${credentials[@]}"
# the pods may wait in the cluster's queue (Kueue) for capacity before they exist and start
pods=(kubectl get pods -l "$selector" -o name)
if [ "$DRY_RUN" = 1 ]; then
  note "repeat every 10 s until it lists pods:"
  quote_cmd "${pods[@]}"
else
  note "waiting for the pods of $workload (queued until the cluster has capacity)"
  until [ -n "$("${pods[@]}" 2>/dev/null)" ]; do sleep "${JAXVC_POLL_SECONDS:-10}"; done
fi
run kubectl wait --for=condition=Ready pod -l "$selector" --timeout=24h
note "on Ctrl-C or SIGTERM:"
if [ "$DRY_RUN" = 1 ]; then printf '# %s\n' "$(quote_cmd xpk workload delete --workload="$workload" "${loc[@]}")"; fi
on_signal() {
  trap - INT TERM
  note "deleting workload $workload"
  xpk workload delete --workload="$workload" "${loc[@]}" || true
  wait_launched || true
  exit 130
}
trap on_signal INT TERM
start_logged "$log_dir/train.log" "${stream[@]}"
wait_launched
