"""Sample text from an exported model (python -m ep_fp8.train.export).

    python -m ep_fp8.generate model.pt --prompt "def fib(n):" [--max-new-tokens 200]
        [--temperature 0.8] [--top-k 50] [--samples 1] [--seed 0] [--device auto]
        [--no-cuda-graph]

Encodes the prompt with the tokenizer the run trained with (or --tokenizer), samples one
token at a time and prints the prompt and its continuation; a continuation stops early at
the tokenizer's end-of-document token. --samples N draws N continuations of the prompt
at once, as one batch (generate_samples). A model trained on synthetic data has no
tokenizer: give --prompt-ids 1,2,3 and read token ids back. The prompt runs through the
model once and each new token then costs one position, with a key-value cache
(ep_fp8.model.KVCache), as long as the context fits in max_seq_len tokens; on a GPU
that step is one CUDA graph replay (StepDecoder). Past max_seq_len, each new token runs
the model over the last max_seq_len tokens again (see generate). One prompt at a time,
on the model as exported: fine for checking what a run learned, not a serving path.
"""

from __future__ import annotations

import argparse
import math
import sys
import warnings

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel


# Attention kernels for decoding. Not cuDNN's: it builds an execution plan for every new
# shape (about 14 ms of host time per call on an H200), and the keys grow by one position
# per token; training's fixed shapes reuse their plan.
_DECODING_ATTENTION = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


class StepDecoder:
    """One decoding step of `model` at a time, past the positions `cache` (a KVCache of
    B sequences) holds: `decoder(tokens)` takes each sequence's next token (an int when
    B is 1, else a sequence of B ints) at position cache.length, returns their logits
    (B, vocab_size) float32 and advances cache.length by one.

    The tokens and the position go into tensors on the device and the step runs
    `model(tokens, cache=cache.at(position))` (ep_fp8.model.StepCache): the same kernels
    on the same tensors at every position. With `capture` (CUDA only) that step is
    captured once in a CUDA graph and each call replays it: one launch instead of several
    hundred, which is what an eager step of a small batch costs on the host. Without
    it the step runs eagerly (the same arithmetic). The returned logits live in the
    graph's memory: read them before the next call. Inference only: call under
    torch.no_grad. Raises ValueError when `cache` is not a KVCache, or `capture` is asked
    off a CUDA device; a call, ValueError when the cache is full or the tokens are not
    one per sequence.
    """

    def __init__(self, model, cache, *, capture: bool) -> None:
        from ep_fp8.model.cache import KVCache

        if not isinstance(cache, KVCache):
            raise ValueError(f"StepDecoder takes a KVCache, got {type(cache).__name__}")
        if capture and cache.device.type != "cuda":
            raise ValueError(f"a CUDA graph needs the model on a CUDA device, not {cache.device}")
        self.model, self.cache, self.graph = model, cache, None
        self.tokens = torch.zeros((cache.batch_size, 1), dtype=torch.int64, device=cache.device)
        self.position = torch.zeros((), dtype=torch.int64, device=cache.device)
        self.step = cache.at(self.position)
        if capture:
            self._capture()

    def _run(self) -> torch.Tensor:
        return self.model(self.tokens, cache=self.step)[:, -1]

    def _capture(self) -> None:
        # The warm-up and the capture write keys and values at the slot of position
        # cache.length, which the next forward (the prompt's, or the first step) writes
        # again before any step reads it.
        self.position.fill_(self.cache.length)
        side = torch.cuda.Stream(self.cache.device)
        side.wait_stream(torch.cuda.current_stream(self.cache.device))
        with torch.cuda.stream(side):        # kernels compiled and tuned outside the capture
            for _ in range(2):
                self._run()
        torch.cuda.current_stream(self.cache.device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = self._run()

    def __call__(self, tokens: int | list[int]) -> torch.Tensor:
        if self.cache.length >= self.cache.max_len:
            raise ValueError(f"position {self.cache.length} is past the cache's size "
                             f"({self.cache.max_len} positions)")
        B = self.cache.batch_size
        if isinstance(tokens, int) and B == 1:
            self.tokens.fill_(tokens)
        elif not isinstance(tokens, int) and len(tokens) == B:
            self.tokens.copy_(torch.tensor(tokens, dtype=torch.int64).view(B, 1))
        else:
            raise ValueError(f"a step takes one token per sequence ({B}), got {tokens!r}")
        self.position.fill_(self.cache.length)
        if self.graph is None:
            logits = self._run()
        else:
            self.graph.replay()
            logits = self.logits
        self.cache.length += 1
        return logits


def graph_problem(model, dtype: torch.dtype, device: torch.device) -> str:
    """Why generate() cannot capture `model`'s decoding steps in a CUDA graph with
    activations of `dtype` on `device`; '' when it can: on a GPU, unless the model has MoE
    layers and torch's grouped matmul would read their group offsets on the host there
    (any dtype but bf16, or a GPU other than SM90 and SM100)."""
    from ep_fp8.ops.backends import grouped_mm_on_device

    if device.type != "cuda":
        return f"CUDA graphs need a CUDA device, not {device}"
    if any(block.moe is not None for block in model.layers) \
            and not grouped_mm_on_device(dtype, device):
        return (f"the experts' grouped matmul in {dtype} on this GPU reads its group offsets "
                f"on the host (one device kernel only in bfloat16 on SM90 or SM100)")
    return ""


def _graph_note(model, device: torch.device) -> str:
    """The command line's note when `model`'s steps on GPU `device` run without a CUDA
    graph ('' when they have one): why, and, where a bf16 model would have one there, that
    an export with --dtype bfloat16 would."""
    from ep_fp8.ops.backends import grouped_mm_on_device

    dtype = model.tok_embeddings.weight.dtype
    if not (problem := graph_problem(model, dtype, device)):
        return ""
    note = f"note: decoding without a CUDA graph: {problem}"
    if dtype != torch.bfloat16 and grouped_mm_on_device(torch.bfloat16, device):
        note += "; a model exported with --dtype bfloat16 decodes with one"
    return note


def _step_decoder(model, cache, cuda_graph: bool) -> StepDecoder | None:
    """The StepDecoder generate() uses for single-token steps: a captured one where
    `cuda_graph` and graph_problem allow, else None (steps run as ordinary cached
    forwards, as they also do, after a warning, if the capture fails)."""
    if not cuda_graph or graph_problem(model, cache.dtype, cache.device):
        return None
    try:
        return StepDecoder(model, cache, capture=True)
    except RuntimeError as e:
        torch.cuda.synchronize(cache.device)
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        warnings.warn(f"decoding without a CUDA graph: its capture failed ({reason})",
                      stacklevel=3)
        return None


def generate(model, prompt: list[int], max_new_tokens: int, *, temperature: float = 1.0,
             top_k: int = 0, allowed: int | None = None, stop: int | None = None,
             generator: torch.Generator | None = None, cuda_graph: bool = True) -> list[int]:
    """The tokens that `model` (an ep_fp8.model.Transformer) continues `prompt` with: at
    most `max_new_tokens`, each drawn from the softmax of the last position's logits over
    `temperature` (0: the most likely token), restricted to the `top_k` most likely (0: all)
    and to ids below `allowed` (None: the whole vocabulary); ends after `stop` when drawn.
    Seeded by `generator` (on the model's device). Raises ValueError on an empty prompt, an
    id outside the vocabulary, a negative setting or an `allowed` below 1.

    Each token is drawn from the logits of the model run over the last max_seq_len tokens
    of the context (positions from 0). While the context fits, a KVCache makes that one
    forward of the prompt (its last max_seq_len tokens) and then one position per token;
    the logits equal those of the whole-context forward up to rounding. Once the cache is
    full, the window slides by one token per new token, which moves every position in it
    (and what each attends to), so cached keys and values no longer apply: each further
    token empties the cache and runs the last max_seq_len tokens again, as the loop
    without a cache did. The tokens are those of that loop, `model(context[-max_seq_len:])`
    per token, unless two logits are close enough for the rounding of the cached path (in
    float32 about 1e-7 of their size; more in bf16) to swap them.

    With `cuda_graph`, where graph_problem() allows (a GPU; MoE layers in bf16 on SM90 or
    SM100), the one-position steps while the context fits run as one CUDA graph
    (StepDecoder), captured before the prompt's forward: the same logits up to rounding,
    at a fraction of an eager step's host time. It is generate_samples() with one sample."""
    return generate_samples(model, prompt, max_new_tokens, 1, temperature=temperature,
                            top_k=top_k, allowed=allowed, stop=stop, generator=generator,
                            cuda_graph=cuda_graph)[0]


@torch.no_grad()
def generate_samples(model, prompt: list[int], max_new_tokens: int, samples: int, *,
                     temperature: float = 1.0, top_k: int = 0, allowed: int | None = None,
                     stop: int | None = None, generator: torch.Generator | None = None,
                     cuda_graph: bool = True) -> list[list[int]]:
    """`samples` continuations of `prompt`, drawn as one batch of that many sequences, each
    as generate() draws its one: from its own sequence's logits (the rows of a batch do not
    mix in the model), one draw per sequence per step from `generator` (sample_next). A
    sequence ends after `stop`; the batch runs until every sequence has ended or has
    `max_new_tokens`. One sample is generate()'s continuation. Raises what generate()
    raises, and ValueError when `samples` is not an int >= 1."""
    vocab, window = model.args.vocab_size, model.args.max_seq_len
    if not prompt:
        raise ValueError("the prompt holds no token")
    if not all(isinstance(t, int) and 0 <= t < vocab for t in prompt):
        raise ValueError(f"prompt ids must be ints in [0, {vocab}), got {prompt[:8]}...")
    if max_new_tokens < 0 or not (math.isfinite(temperature) and temperature >= 0) or top_k < 0:
        raise ValueError(f"max_new_tokens ({max_new_tokens}), temperature ({temperature}) and "
                         f"top_k ({top_k}) must be >= 0 (and the temperature finite)")
    if allowed is not None and not (isinstance(allowed, int) and allowed >= 1):
        raise ValueError(f"allowed must be None or an int >= 1, got {allowed!r}")
    if not (isinstance(samples, int) and samples >= 1):
        raise ValueError(f"samples must be an int >= 1, got {samples!r}")
    allowed = vocab if allowed is None else min(allowed, vocab)
    from ep_fp8.model.cache import KVCache

    device = next(model.parameters()).device
    context = list(prompt[-window:])            # the last `window` tokens, alike in every sequence
    # Room for every position this call can reach, at most the window.
    cache = KVCache.for_model(model, samples, max_len=min(window, len(context) + max_new_tokens))
    pending = [context] * samples               # what the cache has not seen yet, per sequence
    steps = None        # runs the one-position steps while the context fits, if not None
    if max_new_tokens > 1 and len(context) < window:
        with sdpa_kernel(_DECODING_ATTENTION):
            steps = _step_decoder(model, cache, cuda_graph)
    drawn: list[list[int]] = [[] for _ in range(samples)]    # every sequence's tokens
    ended = [False] * samples                   # drew `stop`: later draws are not kept
    kept = [0] * samples                        # how many of drawn[i] are its continuation
    for _ in range(max_new_tokens):
        with sdpa_kernel(_DECODING_ATTENTION):
            if steps is not None and cache.length > 0:   # one position after cached ones
                logits = steps([p[0] for p in pending])
            else:
                ids = torch.tensor(pending, dtype=torch.int64, device=device)
                logits = model(ids, cache=cache)[:, -1]
        tokens = sample_next(logits, temperature, top_k, allowed, generator)
        for i, token in enumerate(tokens):
            drawn[i].append(token)
            if not ended[i]:
                kept[i] += 1
                ended[i] = token == stop
        if all(ended):
            break
        # An ended sequence goes on with the batch (its shape is fixed); its draws are dropped.
        if cache.length < window:
            pending = [[t] for t in tokens]
        else:                   # full: the window slides, every position moves
            cache.reset()
            pending = [(context + d)[-window:] for d in drawn]
    return [d[:k] for d, k in zip(drawn, kept)]


def sample_next(logits: torch.Tensor, temperature: float, top_k: int, allowed: int,
                generator: torch.Generator | None = None) -> int | list[int]:
    """Token ids drawn from `logits`: an int from a 1-D (vocab,) tensor, one per row (a
    list) from a (B, vocab) one. Ids below `allowed` only, then the `top_k` largest of
    those (0: all; ties at the k-th value are kept), then softmax(logits / `temperature`);
    `temperature` 0 takes the largest."""
    logits = logits[..., :allowed].float()
    if temperature == 0:
        return logits.argmax(-1).tolist()
    if 0 < top_k < allowed:   # cut before scaling: a huge temperature would flatten the ranks
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    # From the largest: a tiny temperature then sends the others to -inf (greedy), not to nan.
    logits = (logits - logits.amax(-1, keepdim=True)) / temperature
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1).tolist()


def _device(name: str) -> torch.device:
    """--device: 'auto' (cuda when there is a GPU, else cpu) or a device torch knows that
    this machine has; ValueError otherwise."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name!r} is not a device: give cpu, cuda, cuda:N or auto") from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {name}: give cpu, cuda, cuda:N or auto")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: this machine has no CUDA device (give cpu or auto)")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ValueError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA "
                         f"device(s)")
    return device


def main(argv: list[str] | None = None) -> int:
    from ep_fp8.train.export import exported_tokenizer, load_exported

    parser = argparse.ArgumentParser(prog="python -m ep_fp8.generate",
                                     description="Sample a continuation of a prompt from an "
                                                 "exported model.")
    parser.add_argument("model", help="a model file of python -m ep_fp8.train.export")
    prompt = parser.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt", help="the text to continue")
    prompt.add_argument("--prompt-ids", help="token ids to continue, comma-separated")
    parser.add_argument("--max-new-tokens", type=int, default=200)
    parser.add_argument("--temperature", type=float, default=0.8, help="0: the most likely token")
    parser.add_argument("--top-k", type=int, default=50, help="0: no limit")
    parser.add_argument("--samples", type=int, default=1,
                        help="continuations to draw, as one batch (default 1)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N, or auto")
    parser.add_argument("--no-cuda-graph", action="store_true",
                        help="decode with eager steps rather than one CUDA graph per step")
    parser.add_argument("--tokenizer", default=None,
                        help="'bytes' or a tokenizer.json (default: the run's)")
    ns = parser.parse_args(argv)
    try:
        if ns.samples < 1:
            raise ValueError(f"--samples must be >= 1, got {ns.samples}")
        device = _device(ns.device)
        model, meta = load_exported(ns.model, device)
        try:
            tok = exported_tokenizer(meta, ns.tokenizer)
        except ValueError as e:
            if ns.prompt is not None or ns.tokenizer is not None:
                raise ValueError(f"{ns.model!r}: {e}; give --tokenizer PATH, or sample token "
                                 f"ids with --prompt-ids") from None
            print(f"note: {e}: printing token ids", file=sys.stderr)   # ids need no tokenizer
            tok = None
        spec = ns.tokenizer or meta.get("tokenizer")
        if ns.prompt is not None:
            if tok is None:
                raise ValueError(f"{ns.model!r} records no tokenizer (a run on synthetic data, "
                                 f"or one whose tokenizer the export could not find): give "
                                 f"--prompt-ids, or --tokenizer")
            ids = tok.encode(ns.prompt)
        else:
            try:
                ids = [int(t) for t in ns.prompt_ids.split(",")]
            except ValueError:
                raise ValueError(f"--prompt-ids must be comma-separated ints, got "
                                 f"{ns.prompt_ids!r}") from None
        if tok is not None and tok.vocab_size > model.args.vocab_size:
            raise ValueError(f"tokenizer {spec!r} has {tok.vocab_size} tokens, the model "
                             f"{model.args.vocab_size}: it is not the run's tokenizer")
        if not ns.no_cuda_graph and device.type == "cuda" and (note := _graph_note(model, device)):
            print(note, file=sys.stderr)
        generator = torch.Generator(device=device).manual_seed(ns.seed)
        drawn = generate_samples(model, ids, ns.max_new_tokens, ns.samples,
                                 temperature=ns.temperature, top_k=ns.top_k,
                                 allowed=tok.vocab_size if tok else None,
                                 stop=tok.eos_id if tok else None, generator=generator,
                                 cuda_graph=not ns.no_cuda_graph)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for i, new in enumerate(drawn):
        if ns.samples > 1:
            print(f"--- sample {i + 1} of {ns.samples} ---")
        if tok is None:
            print(",".join(map(str, ids + new)))
        else:
            print(tok.decode(ids + [t for t in new if t != tok.eos_id]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
