"""AllToAllDispatcher on gloo process groups of 2 and 4 CPU ranks against a single-process
reference on the same weights (scenarios in ep_worker.py, one spawn per world size)."""

import functools

import pytest
import torch

from tests._dist import run_ranks
from tests.moe import ep_worker

pytestmark = pytest.mark.slow
# (device, world size): gloo on CPU; NCCL on GPUs where at least two are present
GROUPS = (("cpu", 2), ("cpu", 4), ("cuda", 2))
# Errors are max |ep - ref| / max |ref|.
TOL_FP32 = 1e-5  # EP and reference do the same float32 arithmetic up to summation order
TOL_BF16 = 2e-2  # bf16: a few rounding steps (weight gradients sum per rank, then over ranks)


@pytest.fixture(scope="module", params=GROUPS, ids=lambda g: f"{g[0]}-ep{g[1]}")
def results(request):
    device, ws = request.param
    if device == "cuda" and torch.cuda.device_count() < ws:
        pytest.skip(f"needs {ws} CUDA GPUs")
    per_rank = run_ranks(functools.partial(ep_worker.run, device_type=device), ws,
                         backend="nccl" if device == "cuda" else "gloo", timeout=180,
                         pg_timeout=60)
    by_name = {name: [r[name] for r in per_rank] for name in per_rank[0]}
    by_name["tol"] = TOL_FP32 if device == "cpu" else TOL_BF16  # GPUs run bfloat16 activations
    return by_name


def _ranks(results, name):
    if name not in results:
        pytest.skip(f"{name} not run (ep_fp8.ops float8 ops unavailable)")
    for r, res in enumerate(results[name]):
        assert "error" not in res, f"rank {r}: {res.get('error')}"
    return results[name]


def _assert_matches_reference(res, tol):
    for key in ("y", "grad_x", "grad_w", "grad_w13", "grad_w2"):
        assert res[key] <= tol, (key, res[key])
    assert res["groups_aligned"] and res["fill_rows_zero"] and res["rows_conserved"]


@pytest.mark.parametrize("kind", ["uniform", "skewed", "all_to_one_expert", "empty_rank"])
def test_outputs_and_gradients_match_single_process_reference(results, kind):
    per_rank = _ranks(results, f"dispatch_{kind}")
    for res in per_rank:
        _assert_matches_reference(res, results["tol"])
    if kind == "empty_rank":  # the scenario really left the last rank without rows
        assert per_rank[-1]["received_nothing"] and not per_rank[0]["received_nothing"]


def test_bfloat16_rows_match_single_process_reference(results):
    for res in _ranks(results, "dispatch_bfloat16"):
        _assert_matches_reference(res, TOL_BF16)


@pytest.mark.parametrize("kind", ["uniform", "empty_rank"])
def test_float8_payload_matches_single_process_float8_experts(results, kind):
    # The received float8 rows and scales bit-match ops.quantize_rows of the rows a bf16
    # payload delivers (both exact_scales choices); outputs and gradients then match the
    # single-process float8 experts within the bf16 tolerance (bf16 activations).
    for res in _ranks(results, f"float8_{kind}"):
        assert res["payload_bits_match"]
        _assert_matches_reference(res, TOL_BF16)


def test_moe_layer_with_dtensor_expert_shards_matches_reference(results):
    for res in _ranks(results, "layer"):
        errs = {k: v for k, v in res.items() if k == "y" or k.startswith("grad_")}
        assert max(errs.values()) <= results["tol"], errs
        assert res["bias_same_on_all_ranks"] and res["bias_updated"]


def test_selective_checkpointing_never_repeats_an_all_to_all(results):
    for res in _ranks(results, "checkpoint"):
        # backward: one inverse all-to-all for combine, one for dispatch
        assert res["backward_all_to_alls_none"] == 2
        # Plain recompute repeats the forward's three (counts, rows, combine): 2 + 3.
        assert res["backward_all_to_alls_full"] == 5
        assert res["backward_all_to_alls_selective"] == 2
        assert res["grad_x_selective_vs_none"] <= results["tol"] and res["grad_x_full_vs_none"] <= results["tol"]


def test_bad_input_raises_value_error_on_every_rank(results):
    for res in _ranks(results, "bad_input"):
        assert "rank(s) [1]" in res["out_of_range"] and "outside [0, 8)" in res["out_of_range"]
        assert "must divide model.n_experts" in res["not_dividing"]
        assert res["usable_after_error"]


def test_bench_script_measures_both_payloads_in_both_phases(results):
    records = _ranks(results, "bench")[0]["records"]
    got = {(r["payload"], r["phase"]) for r in records}
    payloads = {"bf16", "float8"} if "float8_uniform" in results else {"bf16"}
    assert got == {(p, ph) for p in payloads for ph in ("fwd", "fwd_bwd")}
    for r in records:
        assert r["ms"] > 0 and r["baseline_ms"] > 0 and r["ratio"] == r["ms"] / r["baseline_ms"]
    by_payload = {r["payload"]: r["payload_bytes"] for r in records}
    if "float8" in by_payload:  # D float8 bytes + 4 scale bytes (padded to 16) against 2 D
        assert by_payload["float8"] * 2 * 64 == by_payload["bf16"] * (64 + 16)
