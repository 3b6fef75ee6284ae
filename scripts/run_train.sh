#!/usr/bin/env bash
# Train on this machine with torchrun: one process per GPU, or, without a GPU, 2 CPU
# processes over gloo (float8 emulated, float32 parameters).
#
#   bash scripts/run_train.sh [--section.key=value ...]
#
# Environment:
#   CONFIG_FILE  the TOML config      (default: train_configs/debug_model.toml)
#   NGPU         processes to start   (default: the visible GPUs, or 2 without a GPU)
# Arguments are passed through as config overrides, e.g. --training.steps=100.
# Several nodes: scripts/run_multinode.slurm. Keys and defaults: docs/config.md.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CONFIG_FILE="${CONFIG_FILE:-$root/train_configs/debug_model.toml}"

if [ -z "${NGPU:-}" ]; then
    NGPU=0
    if command -v nvidia-smi > /dev/null 2>&1; then
        # torch's count honours CUDA_VISIBLE_DEVICES; nvidia-smi alone would not.
        NGPU="$(python3 -c 'import torch; print(torch.cuda.device_count())')"
    fi
    if [ "$NGPU" -eq 0 ]; then
        NGPU=2
    fi
fi

if ! [[ "$NGPU" =~ ^[1-9][0-9]*$ ]]; then
    echo "run_train.sh: NGPU must be a positive integer (processes to start), got '$NGPU'" >&2
    exit 2
fi

if ! command -v nvidia-smi > /dev/null 2>&1 && [ -z "${OMP_NUM_THREADS:-}" ]; then
    # CPU processes share the cores; more threads than cores per process only thrash.
    cores="$(nproc 2> /dev/null || echo "$NGPU")"
    export OMP_NUM_THREADS=$(( cores / NGPU > 0 ? cores / NGPU : 1 ))
fi

# Seconds torchrun gives its workers between passing on a SIGTERM or Ctrl-C and killing
# them: time to finish the step and save (read by newer torchrun, such as torch 2.13's;
# torch 2.11's waits 30 s).
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT="${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-120}"

echo "run_train.sh: $NGPU process(es), config $CONFIG_FILE${*:+, overrides: $*}"
# Check the config once here: a bad one then gets one message and exit code 2, not one per
# process followed by torchrun's report of failed workers.
WORLD_SIZE="$NGPU" python3 -m ep_fp8.train --check --config "$CONFIG_FILE" "$@" || exit $?
exec python3 -m torch.distributed.run --standalone --nproc_per_node="$NGPU" \
    -m ep_fp8.train --config "$CONFIG_FILE" "$@"
