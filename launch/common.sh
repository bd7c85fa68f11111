# Shared by launch/tpu_vm.sh, launch/xpk.sh and launch/gpu_multinode.sh (sourced, not run): dry-run printing,
# argument checks, the environment a config asks for, shipping the working tree, and the per-host start/stop
# scripts that run `jaxvc train` detached (setsid) so a dropped ssh connection does not kill a pod run.
# shellcheck shell=bash

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DRY_RUN=0

die() { printf '%s: %s\n' "$PROG" "$*" >&2; exit 2; }

# "$1 needs a value" unless $2 is there and is not the next flag.
need() { [ $# -ge 2 ] && [ -n "$2" ] && [[ $2 != --* ]] || die "$1 needs a value"; }

positive_int() { [[ $2 =~ ^[1-9][0-9]*$ ]] || die "$1 must be a positive integer, got '$2'"; }

# One shell word: as is when it has no special characters, else in single quotes (' written as '\'').
quote_word() {
  if [[ $1 =~ ^[-A-Za-z0-9_./:=,+@%]+$ ]]; then
    printf '%s' "$1"
  else
    local squote="'"
    printf "'%s'" "${1//$squote/$squote\\$squote$squote}"
  fi
}

# One command as a line of shell words, each quoted so that pasting the line runs exactly this command.
quote_cmd() {
  local out="" word
  for word in "$@"; do out+="$(quote_word "$word") "; done
  printf '%s\n' "${out% }"
}

# Run a command, or with --dry-run print it (stdout, one line).
run() {
  if [ "$DRY_RUN" = 1 ]; then quote_cmd "$@"; else "$@"; fi
}

# Progress notes: '# ...' lines in a dry run (so the output stays a runnable script), stderr otherwise.
note() {
  if [ "$DRY_RUN" = 1 ]; then printf '# %s\n' "$*"; else printf '%s: %s\n' "$PROG" "$*" >&2; fi
}

# Everything after `--` goes to `jaxvc train` and must be config overrides (checked locally, before any remote work).
check_overrides() {
  local arg
  for arg in "$@"; do
    [[ $arg == --config.?*=* ]] || die "arguments after -- must be config overrides like --config.optim.lr=1e-5, got '$arg'"
  done
}

check_config() {
  [ -n "$1" ] || die "--config is required (e.g. --config configs/videomaker.py:sd15)"
  local file="${1%%:*}"
  [ -f "$file" ] || [ -f "$REPO_ROOT/$file" ] || die "config file '$file' not found (relative to $PWD or $REPO_ROOT)"
}

local_python() {
  if [ -n "${PYTHON:-}" ]; then printf '%s\n' "$PYTHON"
  elif [ -x "$REPO_ROOT/.venv/bin/python" ]; then printf '%s\n' "$REPO_ROOT/.venv/bin/python"
  else printf '%s\n' python3; fi
}

# `export NAME=value` lines for config.launch on a platform (jaxvc/launch_env.py), computed on this machine. Also
# loads the config with the overrides, so a typo in a key fails here and not on 64 hosts.
config_exports() {
  local platform=$1 config=$2; shift 2
  local py; py="$(local_python)"
  PYTHONPATH="$REPO_ROOT${PYTHONPATH:+:$PYTHONPATH}" "$py" -m jaxvc.launch_env --config "$config" \
    --platform "$platform" "$@" || die "could not read config.launch from '$config' (see the error above)"
}

# The exports as one line of shell ('export A=1; export B=2; '), for a remote command.
exports_inline() {
  local line out=""
  while IFS= read -r line; do
    if [ -n "$line" ]; then out+="$line; "; fi
  done <<<"$1"
  printf '%s' "$out"
}

# Pinned versions from the lock file (e.g. `pinned jax` -> 0.10.2), or from another requirements file in launch/.
pinned() { sed -n "s/^$1==//p" "$REPO_ROOT/launch/${2:-requirements-lock.txt}"; }

# The pip install, run in a host's .venv, of the accelerator's jax plugin ("tpu", "cuda12", ...). TPU hosts also get
# the exact libtpu that `jaxvc plan` compiles with (launch/requirements-libtpu.txt; jax[tpu] alone allows any
# 0.0.42.* release), so a plan and the pod it was made for run the same TPU compiler.
plugin_install() {
  local extra=$1 packages
  packages="$(quote_word "jax[$extra]==$(pinned jax)")"
  [ "$extra" != tpu ] || packages+=" $(quote_word "libtpu==$(pinned libtpu requirements-libtpu.txt)")"
  printf '%s' ".venv/bin/python -m pip install -q $packages"
}

# A tarball of the working tree as git sees it (tracked + untracked, minus ignored: no .venv, no runs/).
ship_tree() {
  local tarball=$1
  if [ "$DRY_RUN" = 1 ]; then
    printf '%s | %s\n' "$(quote_cmd git -C "$REPO_ROOT" ls-files -z --cached --others --exclude-standard)" \
      "$(quote_cmd tar -C "$REPO_ROOT" --null -T - -czf "$tarball")"
  else
    git -C "$REPO_ROOT" ls-files -z --cached --others --exclude-standard | tar -C "$REPO_ROOT" --null -T - -czf "$tarball"
  fi
}

# Shell run on a host to unpack a shipped tarball into a fresh copy of the code.
unpack_script() {
  local tarball=$1 dir=$2
  local d t; d="$(quote_word "$dir")"; t="$(quote_word "$tarball")"
  printf '%s' "set -euo pipefail; rm -rf $d.new && mkdir -p $d.new && tar -xzf $t -C $d.new && rm -rf $d && mv $d.new $d"
}

# Shell run on a host to make .venv with the pinned versions (launch/setup_env.sh, which needs Python >= 3.11) plus
# the accelerator's jax plugin ("tpu", "cuda12", ...).
setup_script() {
  local dir=$1 extra=$2
  printf '%s' "set -euo pipefail; cd $(quote_word "$dir"); py=python3; "
  printf '%s' "if ! python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then py=python3.11; "
  printf '%s' "command -v python3.11 >/dev/null || { sudo apt-get update -qq && sudo apt-get install -y -qq python3.11 python3.11-venv; }; fi; "
  printf '%s' "PYTHON=\$py bash launch/setup_env.sh && $(plugin_install "$extra")"
}

# Shell run on a host to start training detached and stream its log, each line prefixed with [LABEL].
#   start_script DIR RUN LABEL_EXPR EXPORTS FOLLOW -- TRAIN_COMMAND...
# FOLLOW=0 returns right after the start (detached). LABEL_EXPR is shell evaluated on the host (e.g. the TPU worker number from the metadata server). The process runs
# in its own session (setsid) with its log under ~/jaxvc-logs/RUN; the pid file (pid + hostname) lets stop_script
# signal exactly this process group, also on a shared home directory. The exit status is the training's.
start_script() {
  local dir=$1 run_id=$2 label_expr=$3 exports=$4 follow=$5; shift 6
  local logs; logs="\$HOME/jaxvc-logs/$(quote_word "$run_id")"
  printf '%s' "set -euo pipefail; label=$label_expr; logs=$logs; mkdir -p \"\$logs\"; "
  printf '%s' "if [ -f \"\$logs/\$label.pid\" ] && read -r old host < \"\$logs/\$label.pid\" && [ \"\$host\" = \"\$(hostname)\" ] && kill -0 \"\$old\" 2>/dev/null; then "
  printf '%s' "echo \"[\$label] already running (pid \$old); stop it first\" >&2; exit 1; fi; "
  # the log exists before the run starts: a `tail -F` that opens it late exits 1 though it printed everything
  printf '%s' ": > \"\$logs/\$label.log\"; "
  printf '%s' "cd $(quote_word "$dir"); $exports"
  printf '%s' "setsid nohup $(quote_cmd "$@") > \"\$logs/\$label.log\" 2>&1 < /dev/null & pid=\$!; "
  printf '%s' "echo \"\$pid \$(hostname)\" > \"\$logs/\$label.pid\"; "
  if [ "$follow" = 0 ]; then
    printf '%s' "echo \"[\$label] started (pid \$pid), log \$logs/\$label.log\""
    return 0
  fi
  printf '%s' "tail -n +1 -F --pid=\"\$pid\" \"\$logs/\$label.log\" 2>/dev/null | sed -u \"s/^/[\$label] /\"; wait \"\$pid\""
}

# Shell run on a host to stop the run: SIGTERM to the process group (jaxvc train saves a checkpoint and exits),
# SIGKILL after TIMEOUT seconds.
stop_script() {
  local run_id=$1 label_expr=$2 timeout=$3
  printf '%s' "label=$label_expr; f=\"\$HOME/jaxvc-logs/$(quote_word "$run_id")/\$label.pid\"; "
  printf '%s' "if [ -f \"\$f\" ] && read -r pid host < \"\$f\" && [ \"\$host\" = \"\$(hostname)\" ] && kill -0 \"\$pid\" 2>/dev/null; then "
  printf '%s' "kill -TERM -- \"-\$pid\"; for _ in \$(seq $timeout); do kill -0 \"\$pid\" 2>/dev/null || break; sleep 1; done; "
  printf '%s' "if kill -0 \"\$pid\" 2>/dev/null; then kill -KILL -- \"-\$pid\"; echo \"[\$label] killed (pid \$pid)\"; "
  printf '%s' "else echo \"[\$label] stopped (pid \$pid)\"; fi; else echo \"[\$label] not running\"; fi"
}

# Shell run on a host to follow an already started run's log.
logs_script() {
  local run_id=$1 label_expr=$2
  printf '%s' "label=$label_expr; f=\"\$HOME/jaxvc-logs/$(quote_word "$run_id")/\$label\"; "
  printf '%s' "read -r pid _ < \"\$f.pid\" || exit 1; tail -n +1 -F --pid=\"\$pid\" \"\$f.log\" 2>/dev/null | sed -u \"s/^/[\$label] /\""
}

# Start a long command in the background with its output streamed here and appended to LOG (LAUNCH_PIDS gets its
# pid; wait_launched waits for all of them). Background jobs of a script ignore Ctrl-C, so the caller's INT/TERM trap
# decides what happens to the remote side (stop it) while the stream shows it shutting down. --dry-run prints it.
LAUNCH_PIDS=()
start_logged() {
  local log=$1; shift
  if [ "$DRY_RUN" = 1 ]; then
    printf '%s 2>&1 | %s\n' "$(quote_cmd "$@")" "$(quote_cmd tee -a "$log")"
    return 0
  fi
  mkdir -p "$(dirname "$log")"
  "$@" > >(tee -a "$log") 2>&1 < /dev/null &
  LAUNCH_PIDS+=("$!")
}

# Wait for every started command; the status is the first non-zero one.
wait_launched() {
  local pid status=0 code
  for pid in "${LAUNCH_PIDS[@]}"; do
    code=0; wait "$pid" || code=$?
    [ "$status" != 0 ] || status=$code
  done
  LAUNCH_PIDS=()
  return "$status"
}
