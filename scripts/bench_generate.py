#!/usr/bin/env python3
"""Decoding speed of ep_fp8.generate: tokens per second with and without the CUDA graph.

    python scripts/bench_generate.py --out outputs/bench_generate.json       # moe_1b, GPU
    python scripts/bench_generate.py --model debug --device cpu --new-tokens 8   # smoke test

Builds the preset with random weights (seed 0) in --dtype on --device, then for each
decoding mode draws --new-tokens greedy tokens after a prompt of --prompt-len random ids,
--repeats times, and reports the median tokens per second of the whole call (the prompt's
forward and, with the graph, its capture included); with --samples N each call draws N
continuations as one batch (generate_samples) and the rate counts all of their tokens.
Modes: `graph` (generate's default on a GPU: each one-position step one CUDA graph
replay) and `eager` (cuda_graph=False: the same cached steps launched one kernel at a
time); no `graph` where generate() would not capture the step
(ep_fp8.generate.graph_problem: MoE layers outside bf16 on SM90 or SM100), which the
output says. Whether both modes drew the same tokens is reported, with the first step's logits by both (random weights leave the logits close
enough for the kernels' rounding to swap greedy choices). Prints a table and writes JSON
with the device, torch version and date.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time

import torch

from torch.nn.attention import sdpa_kernel

from ep_fp8.generate import _DECODING_ATTENTION, StepDecoder, _device, generate_samples, graph_problem
from ep_fp8.model import PRESETS, KVCache, Transformer
from ep_fp8.paths import output_path_problem

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_mode(model, prompt: list[int], new_tokens: int, cuda_graph: bool,
              repeats: int, samples: int = 1) -> tuple[float, list[int]]:
    """(median tokens/s of `repeats` calls after one warm-up call, counting the tokens of
    all `samples` sequences, the first sequence's tokens)."""
    device = next(model.parameters()).device

    def call():
        return generate_samples(model, prompt, new_tokens, samples, temperature=0,
                                cuda_graph=cuda_graph)
    drawn = call()
    rates = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        again = call()
        _sync(device)
        rates.append(sum(map(len, again)) / (time.perf_counter() - start))
        if again != drawn:
            raise RuntimeError("greedy decoding drew different tokens from one call to the next")
    return statistics.median(rates), drawn[0]


def decoding_modes(model, device: torch.device) -> tuple[dict[str, bool], str]:
    """({mode: cuda_graph} to measure, why there is no `graph` mode or ''): `graph` only
    where generate() would capture the step (graph_problem); elsewhere its calls would
    run the eager steps under the graph's name."""
    if device.type != "cuda":
        return {"eager": False}, ""
    if problem := graph_problem(model, model.tok_embeddings.weight.dtype, device):
        return {"eager": False}, f"no graph mode: {problem}"
    return {"eager": False, "graph": True}, ""


@torch.no_grad()
def first_step_logits(model, prompt: list[int]) -> dict:
    """The logits of the first decoded position (the token after the prompt: its last
    one again) by the captured step and by an eager cached forward: their largest
    difference, and the spread and top-2 gap of the eager ones, which say how close to a
    tie greedy decoding is (random weights give nearly flat logits)."""
    device = next(model.parameters()).device
    ids = torch.tensor([prompt], device=device)
    eager = KVCache.for_model(model, 1, max_len=len(prompt) + 1)
    graphed = KVCache.for_model(model, 1, max_len=len(prompt) + 1)
    with sdpa_kernel(_DECODING_ATTENTION):
        steps = StepDecoder(model, graphed, capture=True)
        model(ids, cache=eager)
        model(ids, cache=graphed)
        want = model(ids[:, -1:], cache=eager)[0, -1]
        got = steps(prompt[-1])[0]
    top2 = want.topk(2).values
    return {"max_abs_diff": float((got - want).abs().max()),
            "spread": float(want.max() - want.min()), "top2_gap": float(top2[0] - top2[1])}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="moe_1b", choices=sorted(PRESETS))
    parser.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--prompt-len", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--samples", type=int, default=1,
                        help="sequences decoded together, as one batch")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    ns = parser.parse_args(argv)
    if ns.out and (problem := output_path_problem(ns.out)):
        parser.error(f"--out: {problem}")
    if min(ns.prompt_len, ns.new_tokens, ns.repeats, ns.samples) < 1:
        parser.error("--prompt-len, --new-tokens, --repeats and --samples must be >= 1")
    try:
        device = _device(ns.device)
    except ValueError as e:
        parser.error(str(e))
    args = PRESETS[ns.model]
    if ns.prompt_len + ns.new_tokens > args.max_seq_len:
        parser.error(f"--prompt-len + --new-tokens must fit the model's max_seq_len "
                     f"({args.max_seq_len}): this measures the cached steps")
    torch.manual_seed(0)
    model = Transformer(args).to(device, DTYPES[ns.dtype]).eval()
    prompt = torch.randint(0, args.vocab_size, (ns.prompt_len,),
                           generator=torch.Generator().manual_seed(1)).tolist()
    modes, skipped = decoding_modes(model, device)
    if skipped:
        print(f"note: {skipped}", flush=True)
    results = {}
    for name, graph in modes.items():
        rate, tokens = time_mode(model, prompt, ns.new_tokens, graph, ns.repeats, ns.samples)
        results[name] = {"tokens_per_s": rate, "tokens": tokens}
        print(f"{name:>6}: {rate:8.1f} tokens/s", flush=True)
    agree = len({tuple(r["tokens"]) for r in results.values()}) == 1
    if not agree:
        print("note: the modes drew different greedy tokens (close logits, rounding)")
    first = None
    if "graph" in results:
        print(f"graph / eager: {results['graph']['tokens_per_s'] / results['eager']['tokens_per_s']:.2f}x")
        first = first_step_logits(model, prompt)
        print(f"first step's logits, graph vs eager: max |diff| {first['max_abs_diff']:.3g} "
              f"(eager spread {first['spread']:.3g}, top-2 gap {first['top2_gap']:.3g})")
    record = {
        "model": ns.model, "dtype": ns.dtype, "prompt_len": ns.prompt_len,
        "new_tokens": ns.new_tokens, "repeats": ns.repeats, "samples": ns.samples,
        "tokens_agree": agree,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "results": {k: {"tokens_per_s": v["tokens_per_s"]} for k, v in results.items()},
        "first_step_logits": first, "graph_skipped": skipped or None,
    }
    if ns.out:
        os.makedirs(os.path.dirname(os.path.abspath(ns.out)), exist_ok=True)
        with open(ns.out, "w") as f:
            json.dump(record, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
