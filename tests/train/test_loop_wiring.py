"""The training loop (ep_fp8.train.loop) honours each config setting it is given: the
dispatch payload and exact_scales reach the MoE layers, job.seed reaches the weight init,
training.max_norm clips, router.bias_update_rate moves the router biases, and the metrics
get the global tokens of a whole (accumulated) step and the lr each step used.

One spawn of 2 gloo ranks (module fixture) builds the models and runs two short train()
calls; inside the ranks, loop.build_model, loop.build_optimizer_and_scheduler and
loop.MetricsLogger are wrapped to observe what train() builds. The worker returns small
dicts of numbers; the tests assert on them.
"""

from __future__ import annotations

import functools
import math

import pytest

from tests._dist import run_ranks

pytestmark = pytest.mark.slow

WORLD = 2
LR, WARMUP, STEPS, RATE = 3e-3, 2, 3, 0.01
BATCH, SEQ, ACCUM = 2, 16, 2
# Small and deterministic: the debug preset in float32 on the CPU, short sequences.
BASE = [
    "--training.device=cpu", "--training.dtype=float32", f"--training.batch_size={BATCH}",
    f"--training.seq_len={SEQ}", "--metrics.tensorboard=false", "--metrics.log_every=1",
    "--parallel.ep=2",
]
# The two train() runs: equal but for max_norm. Weight decay off, so that a weight moves
# only through its (clipped) gradient; warm-up over 2 of 3 steps, so each step has its own lr.
TRAIN = BASE + [
    f"--training.steps={STEPS}", f"--training.grad_accum={ACCUM}", f"--optimizer.lr={LR}",
    "--optimizer.weight_decay=0", f"--lr_schedule.warmup_steps={WARMUP}",
    f"--router.bias_update_rate={RATE}", "--float8.enabled=false",
]
TINY_NORM = 1e-9


def _full(t):
    from torch.distributed.tensor import DTensor

    return (t.full_tensor() if isinstance(t, DTensor) else t).detach().clone()


def _weights(model) -> dict:
    """name -> full (unsharded) float32 copy of every parameter; collective on every rank."""
    return {n: _full(p) for n, p in model.named_parameters()}


def _config(root: str, name: str, overrides: list[str], world: int):
    from ep_fp8.train.config import load_config

    return load_config(None, [f"--job.output_dir={root}", f"--job.name={name}"] + overrides,
                       world_size=world)


def _describe_moe(model) -> list[dict]:
    from ep_fp8.parallel.expert_parallel import moe_layers

    return [{"dispatcher": type(m.dispatcher).__name__,
             "payload": getattr(m.dispatcher, "payload", None),
             "dispatcher_exact_scales": getattr(m.dispatcher, "exact_scales", None),
             "experts_exact_scales": m.experts.exact_scales}
            for m in moe_layers(model)]


def _observed_train(cfg) -> dict:
    """train(cfg) with its model, optimizer and metrics logger observed: the weights
    before the first and after the last step, the lr of every optimizer.step() call, the
    MetricsLogger's tokens_per_step, the records, the routers' expert_bias at the end."""
    import torch

    import ep_fp8.train.loop as loop
    from ep_fp8.moe.router import Router

    seen: dict = {"lr_used": []}
    build_model, build_opt, logger_cls = (loop.build_model, loop.build_optimizer_and_scheduler,
                                          loop.MetricsLogger)

    def observed_build_model(*args, **kwargs):
        model, model_args, dims = build_model(*args, **kwargs)
        seen["model"], seen["before"] = model, _weights(model)
        return model, model_args, dims

    def observed_build_opt(*args, **kwargs):
        optimizer, scheduler = build_opt(*args, **kwargs)
        optimizer.register_step_pre_hook(
            lambda opt, a, k: seen["lr_used"].append(opt.param_groups[0]["lr"]))
        return optimizer, scheduler

    class ObservedLogger(logger_cls):
        def __init__(self, *args, **kwargs):
            seen["tokens_per_step"] = kwargs.get("tokens_per_step")
            super().__init__(*args, **kwargs)

    loop.build_model, loop.build_optimizer_and_scheduler, loop.MetricsLogger = (
        observed_build_model, observed_build_opt, ObservedLogger)
    try:
        out = loop.train(cfg)
    finally:
        loop.build_model, loop.build_optimizer_and_scheduler, loop.MetricsLogger = (
            build_model, build_opt, logger_cls)
    model, before = seen.pop("model"), seen.pop("before")
    after = _weights(model)
    squares = sum(float(((after[n] - before[n]).double() ** 2).sum()) for n in before)
    seen["update_norm"] = math.sqrt(squares)
    seen["biases"] = [_full(m.expert_bias).tolist() for m in model.modules()
                      if isinstance(m, Router)]
    seen["records"] = [{"step": r["step"], "lr": r["lr"]} for r in out["records"]]
    seen["step"] = out["step"]
    del model, after, before
    torch.distributed.barrier()
    return seen


def wiring_worker(rank: int, world: int, root: str) -> dict:
    import torch

    from ep_fp8.train.loop import build_model

    device, dtype, out = torch.device("cpu"), torch.float32, {}

    # Dispatch payload and exact_scales, as build_model leaves the MoE layers.
    cases = {
        "float8_exact": ["--float8.enabled=true", "--float8.dispatch_payload=float8",
                         "--float8.exact_scales=true"],
        "bf16_inexact": ["--float8.enabled=true", "--float8.dispatch_payload=bf16",
                         "--float8.exact_scales=false"],
        "float8_off": ["--float8.enabled=false", "--float8.dispatch_payload=float8"],
    }
    for case, overrides in cases.items():
        model, _, dims = build_model(_config(root, case, BASE + overrides, world), device, dtype)
        out[f"moe_{case}"] = {"ep": dims.ep, "layers": _describe_moe(model)}
        del model

    # job.seed: the init of two builds with seed 1, and one with seed 2.
    weights = [_weights(build_model(_config(root, f"seed{i}", BASE + [f"--job.seed={s}"],
                                            world), device, dtype)[0])
               for i, s in enumerate((1, 1, 2))]
    matrices = [n for n, w in weights[0].items() if w.ndim >= 2]
    out["seed"] = {
        "n_params": len(weights[0]), "n_matrices": len(matrices),
        "same_seed_equal": sum(torch.equal(weights[0][n], weights[1][n]) for n in weights[0]),
        "other_seed_differs": sum(not torch.equal(weights[0][n], weights[2][n])
                                  for n in matrices),
    }
    del weights

    # Two short train() runs, equal but for training.max_norm.
    for name, max_norm in (("clipped", TINY_NORM), ("unclipped", 0)):
        cfg = _config(root, name, TRAIN + [f"--training.max_norm={max_norm}"], world)
        out[name] = _observed_train(cfg)
    return out


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("wiring"))
    return run_ranks(functools.partial(wiring_worker, root=root), WORLD, timeout=300,
                     pg_timeout=120)


def test_float8_dispatch_payload_reaches_every_moe_layer_with_ep2(ranks):
    # float8.enabled = true, dispatch_payload = "float8", EP = 2: every MoE layer sends
    # float8 rows all-to-all; asked for "bf16", bf16 rows; float8 off forces bf16.
    for r in ranks:
        for case, payload in (("float8_exact", "float8"), ("bf16_inexact", "bf16"),
                              ("float8_off", "bf16")):
            moe = r[f"moe_{case}"]
            assert moe["ep"] == 2 and len(moe["layers"]) == 3, moe   # debug: 3 MoE layers
            assert all(m["dispatcher"] == "AllToAllDispatcher" and m["payload"] == payload
                       for m in moe["layers"]), (case, moe)


def test_exact_scales_reaches_the_experts_and_the_ep_dispatcher(ranks):
    # float8.exact_scales = true: every GroupedExperts and (EP = 2) every AllToAllDispatcher
    # has exact_scales True; with exact_scales = false, both False.
    for r in ranks:
        for case, exact in (("float8_exact", True), ("bf16_inexact", False)):
            layers = r[f"moe_{case}"]["layers"]
            assert all(m["experts_exact_scales"] is exact for m in layers), (case, layers)
            assert all(m["dispatcher_exact_scales"] is exact for m in layers), (case, layers)


def test_job_seed_sets_the_initial_weights(ranks):
    # Two builds with job.seed = 1 are bit-equal; every weight matrix of a job.seed = 2
    # build differs from them (vectors are constants: norm scales 1, biases 0).
    for r in ranks:
        s = r["seed"]
        assert s["n_matrices"] > 10, s
        assert s["same_seed_equal"] == s["n_params"], s
        assert s["other_seed_differs"] == s["n_matrices"], s


def test_max_norm_clips_the_gradient_before_the_optimizer_step(ranks):
    # AdamW's first update is lr * g / (|g| + eps): clipped to a global norm of 1e-9,
    # every |g| is far below eps = 1e-8 and the weights barely move (measured: 1.6e-4 of
    # the unclipped update); unclipped (max_norm = 0), each weight moves by about lr a step.
    for r in ranks:
        clipped, unclipped = r["clipped"]["update_norm"], r["unclipped"]["update_norm"]
        assert unclipped > 0.1, unclipped
        assert clipped < 1e-2 * unclipped, (clipped, unclipped)


def test_router_bias_update_rate_moves_the_biases_in_steps_of_the_rate(ranks):
    # rate 0.01 over 3 steps: each router's expert_bias is a sum of +-0.01 (or 0) per step,
    # so every entry is an integer multiple of 0.01, and some are non-zero.
    for r in ranks:
        for run in ("clipped", "unclipped"):
            biases = r[run]["biases"]
            assert len(biases) == 3, biases
            entries = [b for bias in biases for b in bias]
            assert any(b != 0.0 for b in entries), (run, biases)
            for b in entries:
                k = round(b / RATE)
                assert abs(k) <= STEPS and abs(b - k * RATE) < 1e-6, (run, b)
    assert ranks[0]["unclipped"]["biases"] == ranks[1]["unclipped"]["biases"]  # all-reduced


def test_metrics_get_the_tokens_of_an_accumulated_step_and_the_lr_each_step_used(ranks):
    from ep_fp8.train.optim import lr_factor

    # tokens_per_step is every rank's grad_accum micro-batches: 2 x 2 x 16 x 2 = 128.
    expected_lrs = [LR * lr_factor(s, STEPS, WARMUP, 0.1) for s in range(STEPS)]
    for r in ranks:
        for run in ("clipped", "unclipped"):
            seen = r[run]
            assert seen["step"] == STEPS
            assert seen["tokens_per_step"] == WORLD * BATCH * SEQ * ACCUM, seen
            # The lr optimizer.step() ran with, step by step (warm-up: 1/3, 2/3, 1 x lr) ...
            assert seen["lr_used"] == pytest.approx(expected_lrs, rel=1e-12), seen
            # ... is the lr logged for that step.
            assert [rec["step"] for rec in seen["records"]] == list(range(1, STEPS + 1))
            assert [rec["lr"] for rec in seen["records"]] == seen["lr_used"], seen
