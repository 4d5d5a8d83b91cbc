#!/usr/bin/env bash
# N JAX processes on this machine talking through a local coordinator: how the tests exercise the
# multi-host code path on CPU, and a quick check of a multi-host set-up on one box.
#   NUM_PROCESSES=2 CPU_DEVICES=2 launch/local_multiprocess.sh configs/tiny.py [--config.x=y ...]
# Each process logs to $LOG_DIR/process_<i>.log (default: ./outputs/launch_logs).
set -euo pipefail
config=${1:?usage: $0 CONFIG [--config.overrides ...]}; shift
n=${NUM_PROCESSES:-2}
port=${PORT:-$((20000 + RANDOM % 20000))}
log_dir=${LOG_DIR:-outputs/launch_logs}
mkdir -p "$log_dir"
pids=()
for ((i = 0; i < n; i++)); do
  V2W_COORDINATOR_ADDRESS="127.0.0.1:$port" V2W_NUM_PROCESSES="$n" V2W_PROCESS_ID="$i" \
  V2W_CPU_DEVICES="${CPU_DEVICES:-}" JAX_PLATFORMS="${JAX_PLATFORMS:-cpu}" \
    python -m v2w_jax.train --config="$config" "$@" >"$log_dir/process_$i.log" 2>&1 &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
[ "$status" -eq 0 ] || { echo "a process failed; see $log_dir" >&2; tail -n 30 "$log_dir"/process_*.log >&2; }
exit "$status"
