"""The training entry point on CUDA (skipped without a GPU): the debug recipe through
`python -m ep_fp8.train` on one GPU with the cuda float8 backend, and through torchrun with
EP = 2 and a float8 payload when two GPUs are visible."""

import json
import os
import subprocess
import sys

import pytest
import torch

from tests._paths import ROOT

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

CONFIG = os.path.join(ROOT, "train_configs", "debug_model.toml")


def run(tmp_path, launcher, *overrides):
    cmd = launcher + ["-m", "ep_fp8.train", "--config", CONFIG, f"--job.output_dir={tmp_path}",
                      "--job.name=gpu", "--training.steps=60", "--metrics.log_every=10",
                      *overrides]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    with open(os.path.join(tmp_path, "gpu", "metrics.jsonl")) as f:
        lines = [json.loads(line) for line in f]
    return lines[0]["run"], lines[1:], proc.stdout


def test_one_gpu_float8_cuda_backend_trains_and_reports_memory(tmp_path):
    header, records, out = run(tmp_path, [sys.executable], "--parallel.ep=1",
                               "--float8.backend=cuda", "--training.dtype=bfloat16")
    assert header["world_size"] == 1 and header["device"] != "cpu"
    assert records[-1]["loss"] < records[0]["loss"] - 1.0
    assert all(r["peak_mem_gib"] > 0 for r in records)
    name = torch.cuda.get_device_name()
    if "H100" in name or "H200" in name:
        assert all(r["mfu"] > 0 for r in records)
    assert "summary: 60/60 steps" in out


def test_a_gpu_runs_checkpoint_exports_and_samples_on_the_gpu(tmp_path):
    """A checkpoint of a float8 run on the GPU, exported on the CPU, gives on the GPU the
    logits it gives on the CPU (float32 weights; 2e-3, for the GPU's other reduction
    orders and attention kernels), and samples there with a CUDA generator."""
    from ep_fp8.generate import generate
    from ep_fp8.train.export import export_model, load_exported

    run(tmp_path, [sys.executable], "--parallel.ep=1", "--float8.backend=cuda",
        "--training.dtype=bfloat16", "--checkpoint.enabled=true")
    meta = export_model(os.path.join(tmp_path, "gpu"), str(tmp_path / "m.pt"),
                        progress=lambda line: None)
    assert meta["step"] == 60
    cpu, _ = load_exported(str(tmp_path / "m.pt"))
    gpu, _ = load_exported(str(tmp_path / "m.pt"), "cuda")
    vocab = meta["model_args"]["vocab_size"]
    tokens = torch.randint(0, vocab, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(gpu(tokens.cuda()).cpu(), cpu(tokens), rtol=2e-3, atol=2e-3)
    new = generate(gpu, [1, 2, 3], 20, temperature=1.0,
                   generator=torch.Generator("cuda").manual_seed(0))
    assert len(new) == 20 and all(0 <= t < vocab for t in new)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_two_gpus_ep2_float8_payload_matches_the_bf16_payload_closely(tmp_path):
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                "--nproc_per_node=2"]
    _, fp8, _ = run(tmp_path / "a", launcher, "--parallel.ep=2", "--float8.dispatch_payload=float8")
    _, bf16, _ = run(tmp_path / "b", launcher, "--parallel.ep=2", "--float8.dispatch_payload=bf16")
    assert fp8[-1]["loss"] < fp8[0]["loss"] - 1.0
    # The payload changes only where the quantization happens (before instead of after
    # the all-to-all, same rows): the final losses agree to a few percent.
    assert abs(fp8[-1]["loss"] - bf16[-1]["loss"]) < 0.05 * bf16[-1]["loss"]
