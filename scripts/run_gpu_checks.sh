#!/usr/bin/env bash
# The GPU checks and measurements behind docs/benchmarks.md, in one command.
#
#   bash scripts/run_gpu_checks.sh OUT_DIR [tests] [bench] [train] [ep]   (no stage: all)
#
#   tests  every GPU test (pytest -m gpu), log in OUT_DIR/gpu_tests.log, and the kernel
#          tests on CUDA tensors (OUT_DIR/gpu_kernel_tests.log)
#   bench  scripts/bench_grouped_mm.py (all shapes; the small ones and one large one again
#          in CUDA graphs), scripts/profile_grouped_mm.py (kernel times of the four large
#          shapes, OUT_DIR/profile_grouped_mm.log) and scripts/bench_dispatch.py (local
#          path on 1 GPU; all-to-all over every visible GPU when there are several)
#   train  moe_1b_h200.toml for 50 steps with float8 on and off (torch.compile on), then
#          scripts/profile_train_step.py for each: GPU time by category, unprofiled
#          tokens/s and where the host time goes (--host; the training logs give
#          tokens/s, MFU and memory)
#   ep     (2 GPUs or more) moe_1b_h200.toml with EP over every GPU for 30 steps, float8
#          experts with a float8 payload and bf16 experts with a bf16 payload; then the
#          float8 run resumed from its step-20 checkpoint with EP = 1 (FSDP2 over the same
#          GPUs), its steps 21-30 beside the uninterrupted run's (OUT_DIR/ep_resume.txt)
# Each stage writes its logs and JSON under OUT_DIR and goes on after a failure; the exit
# code is non-zero if any stage failed.
set -uo pipefail
# Ctrl-C stops the whole script, not only the stage running (torchrun exits 1 after a
# signal, which would read as a failed stage and start the next one).
trap 'echo "run_gpu_checks.sh: interrupted" >&2; exit 130' INT

out="${1:?usage: run_gpu_checks.sh OUT_DIR [tests] [bench] [train] [ep]}"
shift
stages="${*:-tests bench train ep}"
for stage in $stages; do
    case "$stage" in
        tests|bench|train|ep) ;;
        *) echo "run_gpu_checks.sh: unknown stage '$stage' (tests, bench, train, ep)" >&2; exit 2 ;;
    esac
done
# OUT_DIR is relative to where the script is called from, not to the repository.
mkdir -p "$out" 2> /dev/null && out="$(cd "$out" && pwd)" || {
    echo "run_gpu_checks.sh: cannot make the output folder '$out'" >&2
    exit 2
}
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
export PYTHONUNBUFFERED=1 PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
ngpu="$(python3 -c 'import torch; print(torch.cuda.device_count())')"
if [ "$ngpu" -lt 1 ]; then
    echo "run_gpu_checks.sh: no CUDA GPU visible" >&2
    exit 2
fi
{ nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
  python3 -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__)'
  date -u +%FT%TZ; } | tee "$out/env.txt"
failed=0

run() {  # run NAME CMD...: tee the output to OUT_DIR/NAME.log, remember a failure
    local name="$1"; shift
    echo "== $name: $*"
    # tee ignores Ctrl-C (-i) and keeps writing the log when the filters after it are gone
    # (-p), so a stopped run's last lines and its save still reach the log.
    "$@" 2>&1 | tee -i -p "$out/$name.log" | grep -v -E '^\[|^W[0-9]{4}|warnings.warn|^ *$' | tail -n 25
    local rc=${PIPESTATUS[0]}
    [ "$rc" -eq 0 ] || { echo "== $name failed (exit $rc)"; failed=1; }
}

train_recipe() {  # train_recipe FLOAT8(true|false)
    CONFIG_FILE=train_configs/moe_1b_h200.toml NGPU=1 bash scripts/run_train.sh \
        --training.steps=50 --compile.enabled=true --checkpoint.enabled=false \
        --float8.enabled="$1" --job.name="gpu_check_moe_1b_float8_$1" &&
        cp "outputs/gpu_check_moe_1b_float8_$1/metrics.jsonl" "$out/train_float8_$1.jsonl"
}

ep_recipe() {  # ep_recipe NAME EP FLOAT8 PAYLOAD [override ...]: moe_1b_h200 on every GPU
    local name="$1" ep="$2" f8="$3" payload="$4"
    shift 4
    CONFIG_FILE=train_configs/moe_1b_h200.toml NGPU="$ngpu" bash scripts/run_train.sh \
        --training.steps=30 --compile.enabled=true --metrics.log_every=1 \
        --parallel.ep="$ep" --float8.enabled="$f8" --float8.dispatch_payload="$payload" \
        --job.name="gpu_check_$name" "$@" &&
        cp "outputs/gpu_check_$name/metrics.jsonl" "$out/train_$name.jsonl"
}

ep_resume() {  # the EP run's step-20 checkpoint resumed with EP = 1, steps 21-30 compared
    local src="outputs/gpu_check_ep${ngpu}_float8/checkpoints/step-20"
    mkdir -p outputs/gpu_check_ep1_resumed/checkpoints &&
        cp -r "$src" outputs/gpu_check_ep1_resumed/checkpoints/ &&
        ep_recipe ep1_resumed 1 true bf16 --checkpoint.enabled=true --checkpoint.interval=100 &&
        python3 - "$out/train_ep${ngpu}_float8.jsonl" "$out/train_ep1_resumed.jsonl" <<'PY' | tee "$out/ep_resume.txt"
import json, sys
def losses(path):
    return {r["step"]: r["loss"] for r in map(json.loads, open(path)) if "loss" in r}
full, resumed = losses(sys.argv[1]), losses(sys.argv[2])
print("step  uninterrupted  resumed_ep1  relative_difference")
for step in sorted(resumed):
    print(f"{step:4d}  {full[step]:.4f}  {resumed[step]:.4f}  {resumed[step] / full[step] - 1:+.2e}")
PY
}

for stage in $stages; do
    case "$stage" in
        tests)
            run gpu_tests python3 -m pytest -m gpu -q -o addopts="" -p no:cacheprovider tests
            # Not marked gpu (they run on CPU too), but on CUDA tensors when a GPU is present:
            # the Triton kernels bit for bit against their torch references (SwiGLU's
            # against float64).
            run gpu_kernel_tests python3 -m pytest -q -o addopts="" -p no:cacheprovider \
                tests/ops/test_quant_kernels.py tests/ops/test_permute.py tests/ops/test_swiglu.py ;;
        bench)
            run bench_grouped_mm python3 scripts/bench_grouped_mm.py --out "$out/bench_grouped_mm.json"
            run bench_grouped_mm_cuda_graph python3 scripts/bench_grouped_mm.py --cuda-graph \
                --shape 8192,16,2048,2816 --shape 8192,16,1408,2048 --shape 4096,32,2048,768 \
                --shape 16384,8,5120,16384 --out "$out/bench_grouped_mm_cuda_graph.json"
            run profile_grouped_mm python3 scripts/profile_grouped_mm.py --shape 16384,8,5120,16384 \
                --shape 16384,8,8192,5120 --shape 32768,8,7168,4096 --shape 32768,8,2048,7168
            run bench_dispatch_local python3 scripts/bench_dispatch.py --out "$out/bench_dispatch_local.json"
            if [ "$ngpu" -gt 1 ]; then
                run bench_dispatch_ep python3 -m torch.distributed.run --standalone \
                    --nproc-per-node="$ngpu" scripts/bench_dispatch.py --out "$out/bench_dispatch_ep$ngpu.json"
            fi ;;
        train)
            for f8 in true false; do
                run "train_float8_$f8" train_recipe "$f8"
                run "profile_float8_$f8" python3 -m torch.distributed.run --standalone --nproc-per-node=1 \
                    scripts/profile_train_step.py --config train_configs/moe_1b_h200.toml \
                    --compile.enabled=true --float8.enabled="$f8" --warmup 6 --steps 3 --host 30 \
                    --out "$out/profile_float8_$f8.json"
            done ;;
        ep)
            if [ "$ngpu" -lt 2 ]; then
                echo "== ep: needs 2 GPUs or more, $ngpu visible: skipped"
                continue
            fi
            rm -rf outputs/gpu_check_ep*
            run "train_ep${ngpu}_float8" ep_recipe "ep${ngpu}_float8" "$ngpu" true float8 \
                --checkpoint.enabled=true --checkpoint.interval=20 --checkpoint.resume=false
            run "train_ep${ngpu}_bf16" ep_recipe "ep${ngpu}_bf16" "$ngpu" false bf16 \
                --checkpoint.enabled=false
            run ep_resume ep_resume ;;
    esac
done
exit "$failed"
