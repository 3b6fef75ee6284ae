"""The training loop end to end on gloo CPU ranks with the real model: the loss falls with
EP = 2 and float8 experts; EP = 2 and EP = 1 agree; resuming (on the same or another world
size) reproduces the uninterrupted run; SIGTERM saves and stops; NaN stops with the step.

Two spawns (2 ranks, then 1 rank) run every scenario; module fixtures hold their output.
"""

import functools
import json
import math
import os

import pytest

from ep_fp8.train.checkpoint import MARKER
from ep_fp8.train.metrics import METRIC_KEYS
from tests._dist import run_ranks
from tests.train._train_worker import run_plan

pytestmark = pytest.mark.slow

# Relative tolerances, with what they cover:
# EP = 2 vs EP = 1 (float32 on the CPU, float8 off): the same math with expert gradients
# summed in another order (one grouped matmul over both ranks' rows vs two partial sums
# reduce-scattered); measured <= 1e-7 over 20 steps, 1e-5 leaves room for other BLAS.
# Also used for gradient accumulation against one larger batch.
EP_RTOL = 1e-5
# Resume on the same layout: the same operations on the same restored values.
RESUME_RTOL = 1e-6
# Resume on 1 rank with twice the batch: one mean over 8 rows instead of the mean of two
# means over 4, and unsharded weights; float32 reordering only.
RESHARD_RTOL = 1e-5

VALIDATION = ["--validation.enabled=true", "--validation.interval=8", "--validation.batches=2"]
TWO_RANK_PLAN = [
    {"name": "ep2", "overrides": ["--parallel.ep=2", "--checkpoint.enabled=true",
                                  "--checkpoint.interval=10"]},
    {"name": "ep1", "overrides": ["--parallel.ep=1"]},
    {"name": "accum", "overrides": ["--parallel.ep=2", "--training.batch_size=2",
                                    "--training.grad_accum=2"]},
    {"name": "resumed", "overrides": ["--parallel.ep=2", "--checkpoint.enabled=true",
                                      "--checkpoint.interval=10"] + VALIDATION,
     "resume_from": ["ep2", 10]},
    # ep2 with validation every 8 steps (and at 20): the training must not change.
    {"name": "ep2_val", "overrides": ["--parallel.ep=2", "--checkpoint.enabled=true",
                                      "--checkpoint.interval=10"] + VALIDATION},
    # Logged every 4th step and evaluated at every step: the step it stops after must be
    # logged and evaluated all the same.
    {"name": "sigterm", "overrides": ["--parallel.ep=2", "--checkpoint.enabled=true",
                                      "--checkpoint.interval=100", "--metrics.log_every=4",
                                      "--validation.enabled=true", "--validation.interval=1",
                                      "--validation.batches=1"],
     "sigterm_after": 3},
    # Another run holds the folder: both ranks refuse before loading or writing anything.
    {"name": "locked", "overrides": ["--parallel.ep=2", "--checkpoint.enabled=true"],
     "resume_from": ["ep2", 10], "locked_by_another_run": True},
    # The debug recipe's path: EP = 2, float8 experts (emulated) with a float8 payload.
    {"name": "ep2_float8", "overrides": ["--parallel.ep=2", "--float8.enabled=true",
                                         "--float8.dispatch_payload=float8"]},
    # Resumed with another data seed: it goes on, and says that the order changed.
    {"name": "resumed_other_data", "overrides": ["--parallel.ep=2", "--checkpoint.enabled=true",
                                                 "--data.seed=7", "--training.steps=11"],
     "resume_from": ["ep2", 10], "capture": True},
    # Rank 1 sees no checkpoint where rank 0 sees step 10 (a folder that is not shared):
    # both refuse, rather than one resuming and the other starting over.
    {"name": "resume_unseen", "overrides": ["--parallel.ep=2", "--checkpoint.enabled=true"],
     "resume_from": ["ep2", 10], "checkpoint_listing_on_rank": {1: "none"}},
    # Rank 1 cannot list the checkpoint folder: both refuse, rather than rank 0 waiting.
    {"name": "resume_unreadable", "overrides": ["--parallel.ep=2", "--checkpoint.enabled=true"],
     "resume_from": ["ep2", 10], "checkpoint_listing_on_rank": {1: "unreadable"}},
    # One path, other files on each rank (node-local disks): a config error on both ranks.
    {"name": "data_per_rank", "overrides": ["--parallel.ep=2", "--data.source=text",
                                            "--data.path=~/data.txt", "--model.vocab_size=257"],
     "home_text": "abcdefgh" * 64},
]
ONE_RANK_PLAN = [
    # The same 16 held-out sequences as ep2_val's, read by one rank in batches of 8.
    {"name": "val_1rank", "overrides": ["--parallel.ep=1", "--training.batch_size=8"] + VALIDATION},
    {"name": "resumed_1rank", "overrides": ["--parallel.ep=1", "--training.batch_size=8",
                                            "--checkpoint.enabled=true"],
     "resume_from": ["ep2", 10]},
    {"name": "nan", "overrides": ["--optimizer.lr=1e30", "--lr_schedule.warmup_steps=0",
                                  "--training.max_norm=0"]},
    # A checkpoint of another model size: a config error, and nothing written.
    {"name": "resume_misfit", "overrides": ["--parallel.ep=1", "--checkpoint.enabled=true",
                                            "--model.dim=32"],
     "resume_from": ["ep2", 10]},
]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("runs"))
    # A rank that fails alone leaves the others in a collective: pg_timeout fails them.
    run_ranks(functools.partial(run_plan, root=root, plan=TWO_RANK_PLAN), 2, timeout=600,
              pg_timeout=180)
    # The 1-rank resume reads the 2-rank run's checkpoint: a second spawn, after the first.
    run_ranks(functools.partial(run_plan, root=root, plan=ONE_RANK_PLAN), 1, timeout=600,
              pg_timeout=180)
    return root


def metrics(root, name):
    """(header, {step: record}) of a run that must have finished without an error."""
    for result in results(root, name, 1):
        assert "error" not in result, result["error"]
    with open(os.path.join(root, name, "metrics.jsonl")) as f:
        lines = [json.loads(line) for line in f]
    return lines[0]["run"], {r["step"]: r for r in lines[1:] if "loss" in r}


def results(root, name, world):
    out = []
    for rank in range(world):
        with open(os.path.join(root, name, f"result-rank{rank}.json")) as f:
            out.append(json.load(f))
    return out


def assert_refused_on_every_rank(root, name, world, phrases, left):
    """Every rank of run `name` raised a ConfigError holding each of `phrases`, and the run
    folder holds only `left` (nothing of the run written)."""
    for result in results(root, name, world):
        error = result.get("error", "")
        assert "ConfigError" in error and all(p in error for p in phrases), result
    assert sorted(os.listdir(os.path.join(root, name))) == left


def assert_close_losses(a, b, steps, rtol):
    for step in steps:
        for key in ("loss", "grad_norm"):
            x, y = a[step][key], b[step][key]
            assert abs(x - y) <= rtol * abs(x), f"step {step} {key}: {x} vs {y} (rtol {rtol})"


def test_loss_falls_over_20_steps_with_ep2_and_float8_experts(runs):
    run, rec = metrics(runs, "ep2_float8")
    assert run["world_size"] == 2 and run["config"]["parallel"]["ep"] == 2
    assert run["config"]["float8"]["dispatch_payload"] == "float8"
    assert sorted(rec) == list(range(1, 21))
    assert all(set(r) == set(METRIC_KEYS) for r in rec.values())
    first = sum(rec[s]["loss"] for s in (1, 2, 3)) / 3
    last = sum(rec[s]["loss"] for s in (18, 19, 20)) / 3
    assert last < first - 0.5, (first, last)          # from ~5.55 (ln 256) downwards
    assert all(r["load_imbalance"] >= 1.0 for r in rec.values())


def test_ep2_and_ep1_give_the_same_losses(runs):
    _, ep2 = metrics(runs, "ep2")
    _, ep1 = metrics(runs, "ep1")
    assert_close_losses(ep2, ep1, range(1, 21), EP_RTOL)


def test_two_accumulated_half_batches_equal_one_full_batch(runs):
    # Per step both runs see the same 8 global samples (4 per rank as one micro-batch, or
    # 2 per rank in each of two); only the order of the float32 sums differs.
    _, accum = metrics(runs, "accum")
    _, full = metrics(runs, "ep2")
    assert_close_losses(full, accum, range(1, 21), EP_RTOL)


def test_resume_reproduces_the_uninterrupted_run(runs):
    run, resumed = metrics(runs, "resumed")
    _, full = metrics(runs, "ep2")
    assert run["resumed_from_step"] == 10
    assert sorted(resumed) == list(range(11, 21))
    assert_close_losses(full, resumed, range(11, 21), RESUME_RTOL)
    assert resumed[11]["lr"] == full[11]["lr"]                 # the schedule resumed too
    # ep2_val is ep2 with validation: the resumed run evaluates as it did at 16 and 20.
    (result,), (full_val,) = results(runs, "resumed", 1), results(runs, "ep2_val", 1)
    assert [v["step"] for v in result["validation"]] == [16, 20]
    for a, b in zip(result["validation"], full_val["validation"][1:]):
        assert a["step"] == b["step"] and abs(a["val_loss"] - b["val_loss"]) <= RESUME_RTOL * b["val_loss"]


def test_resume_on_one_rank_with_ep1_reproduces_the_two_rank_ep2_run(runs):
    run, resumed = metrics(runs, "resumed_1rank")
    _, full = metrics(runs, "ep2")
    assert run["world_size"] == 1 and run["resumed_from_step"] == 10
    assert_close_losses(full, resumed, range(11, 21), RESHARD_RTOL)
    # The expert load counted on one rank equals the two ranks' counts summed: the same
    # tokens routed alike, so the same imbalance (a rank-local count would differ).
    for step in range(11, 21):
        assert full[step]["load_imbalance"] == pytest.approx(resumed[step]["load_imbalance"],
                                                             rel=1e-6), step


def test_sigterm_finishes_the_step_saves_and_stops_every_rank(runs):
    r0, r1 = results(runs, "sigterm", 2)
    step = r0["step"]
    assert r0 == r1                                            # both ranks stopped together
    assert 3 <= step < 20 and "SIGTERM" in r0["stopped"]
    assert r0["checkpoint"].endswith(f"step-{step}")
    assert os.path.isfile(os.path.join(r0["checkpoint"], MARKER))
    _, rec = metrics(runs, "sigterm")
    assert max(rec) == step
    assert [v["step"] for v in r0["validation"]] == list(range(1, step + 1))


def test_nan_loss_stops_the_run_naming_the_step(runs):
    (result,) = results(runs, "nan", 1)
    assert "error" in result and "at step" in result["error"], result
    step = int(result["error"].split("at step ")[1].split(":")[0])
    with open(os.path.join(runs, "nan", "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f][1:]
    assert [r["step"] for r in records] == list(range(1, step + 1))   # the failed step too
    assert all(math.isfinite(r["loss"]) for r in records[:-1])
    assert not (math.isfinite(records[-1]["loss"]) and math.isfinite(records[-1]["grad_norm"]))


def test_resuming_from_a_checkpoint_of_another_model_is_a_config_error_that_writes_nothing(runs):
    (result,) = results(runs, "resume_misfit", 1)
    error = result.get("error", "")
    assert "ConfigError" in error and "cannot resume" in error and "Size mismatch" in error, result
    assert "checkpoints/step-10 could not be loaded into this model" in error
    assert sorted(os.listdir(os.path.join(runs, "resume_misfit"))) == ["checkpoints", "result-rank0.json"]


def test_a_run_folder_held_by_another_run_is_refused_on_every_rank(runs):
    assert_refused_on_every_rank(
        runs, "locked", 2, ["another run is using", "held by host elsewhere pid 4242"],
        [".lock", "checkpoints", "result-rank0.json", "result-rank1.json"])   # no config.toml, no metrics


def test_ranks_that_see_different_newest_checkpoints_all_refuse_to_resume(runs):
    assert_refused_on_every_rank(
        runs, "resume_unseen", 2,
        ["cannot resume: the ranks see different newest checkpoints",
         "(rank 1: None; rank 0: ", "resume_unseen/checkpoints/step-10)", "one shared file system"],
        ["checkpoints", "result-rank0.json", "result-rank1.json"])


def test_a_checkpoint_folder_one_rank_cannot_read_is_refused_on_every_rank(runs):
    assert_refused_on_every_rank(
        runs, "resume_unreadable", 2,
        ["cannot resume: the checkpoint folder cannot be read (rank 1: [Errno 13] Permission denied"],
        ["checkpoints", "result-rank0.json", "result-rank1.json"])


def test_a_resume_with_other_data_goes_on_and_says_so(runs):
    (result, _) = results(runs, "resumed_other_data", 2)
    assert result.get("step") == 11, result
    printed = result["printed"]
    assert "resumed from" in printed and "[data] differs from the checkpoint's (saved with " \
        "synthetic vocab 256 branching 4, seq_len 32, seed 0 (rng v2); now synthetic vocab 256 " \
        "branching 4, seq_len 32, seed 7 (rng v2)): its position, 80 samples," in printed, printed


def test_ranks_that_read_different_files_stop_with_a_config_error_on_every_rank(runs):
    assert_refused_on_every_rank(
        runs, "data_per_rank", 2,
        ["the ranks read different data (rank 1: 1025 tokens", "rank 0: 513 tokens"],
        ["result-rank0.json", "result-rank1.json"])   # nothing written


def test_validation_logs_held_out_losses_and_changes_nothing_in_training(runs):
    _, ep2 = metrics(runs, "ep2")
    _, ep2_val = metrics(runs, "ep2_val")
    clock = ("tokens_per_s", "tokens_per_s_per_gpu", "time_s")
    assert sorted(ep2_val) == sorted(ep2) == list(range(1, 21))
    for step in ep2:   # bit for bit, but for the clock
        assert ({k: v for k, v in ep2_val[step].items() if k not in clock}
                == {k: v for k, v in ep2[step].items() if k not in clock}), step
    with open(os.path.join(runs, "ep2_val", "metrics.jsonl")) as f:
        logged = [json.loads(line) for line in f if "val_loss" in line]
    assert [r["step"] for r in logged] == [8, 16, 20]
    two, one = results(runs, "ep2_val", 2), results(runs, "val_1rank", 1)
    assert two[0]["validation"] == two[1]["validation"] == logged   # every rank, the same
    # One rank with batches of 8 reads the same 16 sequences and trains the same steps as
    # two ranks with 4 each (float32 reordering only; measured <= 1e-7 relative).
    for a, b in zip(logged, one[0]["validation"]):
        assert a["step"] == b["step"] and abs(a["val_loss"] - b["val_loss"]) <= 1e-5 * a["val_loss"]
    assert logged[-1]["val_loss"] < logged[0]["val_loss"] - 0.3   # it learns what it is tested on
