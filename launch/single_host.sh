#!/usr/bin/env bash
# One host, all its GPUs, one JAX process (JAX drives every local GPU from one process).
#   launch/single_host.sh configs/nemo.py [--config.x=y ...]
set -euo pipefail
config=${1:?usage: $0 CONFIG [--config.overrides ...]}; shift
exec python -m v2w_jax.train --config="$config" "$@"
