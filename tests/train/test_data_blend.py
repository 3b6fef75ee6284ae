"""[data] blend: several corpora drawn in proportion to blend_weights, each walking its own
windows; the config's checks; a blend through prepared token files, a resume and a run."""

import math
import shutil
from collections import Counter

import pytest
import torch

from ep_fp8.train import data
from ep_fp8.train.config import ConfigError, load_config, read_config
from ep_fp8.train.data import (BLEND_BLOCK, BlendedSource, DataLoader, TokenFileSource,
                               blend_counts, build_source)
from ep_fp8.train.token_file import write_token_file
from tests._paths import ROOT
from tests.train import test_loop_corners
from tests.train.test_token_file import _quiet

SEQ = 16
one_rank = test_loop_corners.one_rank   # the fixture: a one-process gloo group for train()


def _text_corpus(folder, letter, n_files=3, chars=400):
    """Files of one letter each (the corpus is told by its samples' tokens)."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n_files):
        (folder / f"{i}.txt").write_text(letter * (chars + 17 * i))
    return str(folder / "*.txt")


def _letters_of(samples):
    """The corpus of each sample: its letter (a window may start on an end-of-document)."""
    return [chr(int(row[row != 256][0])) for row in samples]


def _config(tmp_path, *overrides):
    return load_config(None, ["--data.source=text", f"--training.seq_len={SEQ}",
                              "--model.vocab_size=257", f"--job.output_dir={tmp_path / 'runs'}",
                              *overrides], world_size=1)


def _blend(tmp_path, weights=(3, 1), letters="ab"):
    paths = [_text_corpus(tmp_path / c, c) for c in letters]
    return _config(tmp_path, f"--data.blend={paths!r}".replace("'", '"'),
                   f"--data.blend_weights={list(weights)}")


@pytest.mark.parametrize("weights", [[1, 1], [3, 1], [1, 2, 4], [0.7, 0.2, 0.1], [1e3, 1, 1], [BLEND_BLOCK - 1, 1],
                                     [1 / 3, 1 / 3, 1 / 3]])
def test_blend_counts_fill_the_block_within_one_of_each_quota(weights):
    counts = blend_counts(weights)
    quotas = [w / math.fsum(weights) * BLEND_BLOCK for w in weights]
    assert sum(counts) == BLEND_BLOCK
    assert all(0 < c and abs(c - q) < 1 for c, q in zip(counts, quotas)), (counts, quotas)


@pytest.mark.parametrize("weights, message", [
    ([1, 0], "finite and > 0"), ([1, -2], "finite and > 0"), ([1, float("inf")], "finite"),
    ([1, float("nan")], "finite"), ([], "finite"), ([1e308, 1e308], "add up to a finite number"), ([BLEND_BLOCK * 2, 1], r"blend_weights\[1\] = 1 is below 1/4096"),
])
def test_blend_counts_refuse_weights_that_would_not_draw_a_corpus(weights, message):
    with pytest.raises(ValueError, match=message):
        blend_counts(weights)


def test_every_block_holds_each_corpus_its_count_in_a_shuffled_order(tmp_path):
    source = build_source(_blend(tmp_path, weights=(3, 1)))
    assert isinstance(source, BlendedSource) and source.counts == [3072, 1024]
    letters = _letters_of(source.get(list(range(3 * BLEND_BLOCK))))
    for b in range(3):
        block = letters[b * BLEND_BLOCK:(b + 1) * BLEND_BLOCK]
        assert Counter(block) == {"a": 3072, "b": 1024}
    # shuffled: every 64-sample batch of the first block holds both corpora, near 3:1
    batches = [Counter(letters[i:i + 64])["a"] for i in range(0, BLEND_BLOCK, 64)]
    assert 0 < min(batches) and max(batches) < 64 and abs(sum(batches) / len(batches) - 48) < 1
    assert letters[:BLEND_BLOCK] != letters[BLEND_BLOCK:2 * BLEND_BLOCK]   # each block its order


def test_each_corpus_yields_its_own_samples_in_order_as_if_it_were_alone(tmp_path):
    """The k-th sample drawn from a corpus is its own sample k: every window of the
    corpus once per epoch, in the order of that corpus as corpus i of a blend."""
    a_path, b_path = _text_corpus(tmp_path / "a", "a"), _text_corpus(tmp_path / "b", "b", n_files=1)
    cfg = _config(tmp_path, f'--data.blend=["{a_path}", "{b_path}"]', "--data.blend_weights=[1, 1]")
    blend = build_source(cfg)
    alone = [TokenFileSource(p, "text", "bytes", SEQ, seed=0) for p in (a_path, b_path)]
    for i, source in enumerate(alone):
        source.as_blend_corpus(i)
    n = 2 * BLEND_BLOCK + 100   # into the third block; b (25 windows) runs through many epochs
    got = blend.get(list(range(n)))
    drawn = {0: [], 1: []}
    for i in range(n):
        c, k = blend.locate(i)
        drawn[c].append(k)
        assert torch.equal(got[i], alone[c].get([k])[0]), i
    for c in (0, 1):
        assert drawn[c] == list(range(len(drawn[c])))   # in order, none skipped or repeated


def test_corpora_of_as_many_windows_are_walked_in_orders_of_their_own(tmp_path):
    source = build_source(_blend(tmp_path, weights=(1, 1)))
    a, b = source.sources
    assert a.n_windows == b.n_windows > 50
    order = [[s._window(k) for k in range(a.n_windows)] for s in (a, b)]
    assert sorted(order[0]) == sorted(order[1]) == list(range(a.n_windows)) and order[0] != order[1]
    assert a.fingerprint.endswith("corpus 0 of a blend") and b.fingerprint.endswith("corpus 1 of a blend")


def test_a_sample_is_the_same_whichever_batch_rank_or_order_asks_for_it(tmp_path):
    source = build_source(_blend(tmp_path, weights=(1, 2, 4), letters="abc"))
    with pytest.raises(ValueError, match="a blend needs one weight per corpus, got 3 corpora and 2 weights"):
        BlendedSource(source.sources, [1, 2], seed=0)
    with pytest.raises(ValueError, match="got 0 corpora and 0 weights"):
        BlendedSource([], [], seed=0)
    assert source.get([]).shape == (0, SEQ + 1)
    with pytest.raises(ValueError, match="sample index must be >= 0, got -1"):
        source.get([3, -1])
    indices = [5, BLEND_BLOCK * 7 + 3, 9000, 4, 3 * BLEND_BLOCK - 1, 10**12, 5]
    together = source.get(indices)
    fresh = build_source(_blend(tmp_path, weights=(1, 2, 4), letters="abc"))
    for i, index in enumerate(indices):
        assert torch.equal(fresh.get([index])[0], together[i])
    one = DataLoader(source, batch_size=6, rank=0, world=1)
    two = [DataLoader(fresh, batch_size=3, rank=r, world=2) for r in range(2)]
    for _ in range(3):
        assert torch.equal(one.next()[0], torch.cat([loader.next()[0] for loader in two]))


def test_a_blend_of_one_corpus_is_that_corpus_as_path(tmp_path):
    path = _text_corpus(tmp_path / "a", "a")
    alone = build_source(_config(tmp_path, f"--data.path={path}"))
    one = build_source(_config(tmp_path, f'--data.blend=["{path}"]', "--data.blend_weights=[5]"))
    assert not isinstance(one, BlendedSource) and one.fingerprint == alone.fingerprint
    assert torch.equal(one.get(list(range(40))), alone.get(list(range(40))))


def test_the_fingerprint_changes_with_the_counts_and_a_resume_says_so(tmp_path):
    a, b = build_source(_blend(tmp_path, weights=(3, 1))), build_source(_blend(tmp_path, weights=(1, 1)))
    assert a.fingerprint != b.fingerprint and "3072 per block" in a.fingerprint
    # The counts fix the samples: weights in the same ratio give the same fingerprint, and
    # weights that print alike but round to other counts do not.
    assert build_source(_blend(tmp_path, weights=(6, 2))).fingerprint == a.fingerprint
    near = [build_source(_blend(tmp_path, weights=(1000.5 * f, 3095.5))) for f in (1 - 1e-9, 1 + 1e-9)]
    assert near[0].counts != near[1].counts and near[0].fingerprint != near[1].fingerprint
    run = DataLoader(a, batch_size=4, rank=0, world=1)
    run.next()
    same, other = DataLoader(a, 4, 0, 1), DataLoader(b, 4, 0, 1)
    same.load_state_dict(run.state_dict())
    other.load_state_dict(run.state_dict())
    assert same.resume_note == ""
    first4 = Counter(a.locate(i)[0] for i in range(4))
    assert other.resume_note == ("[data] blend counts per block [3072, 1024] -> [2048, 2048] from "
                                 "sample 4: each corpus continues at its next sample (drawn so "
                                 f"far: {[first4[0], first4[1]]})")
    # A checkpoint of a release that saved no blend position: the note of other data.
    older = DataLoader(build_source(_blend(tmp_path, weights=(1, 1))), 4, 0, 1)
    older.load_state_dict({k: v for k, v in run.state_dict().items() if not k.startswith("blend_")})
    assert "differs from the checkpoint's" in older.resume_note


def _corpus_draws(source, start, stop, drawn):
    """Appends to drawn[c] the index within corpus c of each of samples start .. stop - 1."""
    for i in range(start, stop):
        c, k = source.locate(i)
        drawn[c].append(k)


def test_a_blend_resumed_with_other_weights_continues_every_corpus_at_its_next_sample(tmp_path):
    """Weights changed at a resume (twice, mid-block): no corpus repeats or skips a sample,
    each block from the resumed position on holds the new counts, and resuming with the
    same weights again continues exactly as the run that went on."""
    first = build_source(_blend(tmp_path, weights=(3, 1, 1), letters="abc"))
    run = DataLoader(first, 8, 0, 1)
    s1, s2 = BLEND_BLOCK + 1000, 3 * BLEND_BLOCK + 777
    drawn = {0: [], 1: [], 2: []}
    _corpus_draws(first, 0, s1, drawn)
    run.samples_seen = s1
    second = build_source(_blend(tmp_path, weights=(1, 2, 5), letters="abc"))
    resumed = DataLoader(second, 8, 0, 1)
    resumed.load_state_dict(run.state_dict())
    assert "-> [512, 1024, 2560] from sample 5096: each corpus continues" in resumed.resume_note
    _corpus_draws(second, s1, s2, drawn)
    with pytest.raises(ValueError, match="sample 5095 precedes sample 5096, where the blend's "
                                         "current counts begin"):
        second.locate(s1 - 1)
    blocks = [Counter(second.locate(s1 + b * BLEND_BLOCK + i)[0] for i in range(BLEND_BLOCK))
              for b in range(2)]
    assert all([blk[c] for c in range(3)] == [512, 1024, 2560] for blk in blocks)
    resumed.samples_seen = s2
    third = build_source(_blend(tmp_path, weights=(1, 1, 1), letters="abc"))
    again = DataLoader(third, 8, 0, 1)
    again.load_state_dict(resumed.state_dict())
    _corpus_draws(third, s2, s2 + 2 * BLEND_BLOCK, drawn)
    for c in range(3):
        assert drawn[c] == list(range(len(drawn[c]))), c    # none repeated, none skipped
    # The same weights resumed once more: the continuation of the run that went on.
    twin = DataLoader(build_source(_blend(tmp_path, weights=(1, 1, 1), letters="abc")), 8, 0, 1)
    again.samples_seen = s2 + 5000
    twin.load_state_dict(again.state_dict())
    assert twin.resume_note == ""
    later = range(s2 + 5000, s2 + 5000 + 300)
    assert [twin.source.locate(i) for i in later] == [third.locate(i) for i in later]
    assert torch.equal(twin.next()[0], again.next()[0])


def test_a_blend_of_other_corpora_resumes_with_the_note_of_other_data(tmp_path):
    run = DataLoader(build_source(_blend(tmp_path, weights=(3, 1), letters="ab")), 4, 0, 1)
    run.next()
    other = DataLoader(build_source(_blend(tmp_path, weights=(3, 1), letters="ac")), 4, 0, 1)
    other.load_state_dict(run.state_dict())
    assert "differs from the checkpoint's" in other.resume_note
    assert other.source.locate(0) == run.source.locate(0)    # the position kept, counts from 0


def test_a_blend_of_token_files_gives_the_samples_of_the_same_blend_of_text(tmp_path):
    a_path, b_path = _text_corpus(tmp_path / "a", "a"), _text_corpus(tmp_path / "b", "b")
    outs = [str(tmp_path / f"{c}.tokens") for c in "ab"]
    for path, out in zip((a_path, b_path), outs):
        write_token_file(path, "text", "bytes", out, progress=_quiet)
    text = build_source(_config(tmp_path, f'--data.blend=["{a_path}", "{b_path}"]',
                                "--data.blend_weights=[2, 1]"))
    tokens = build_source(_config(tmp_path, "--data.source=tokens", f'--data.blend=["{outs[0]}", "{outs[1]}"]',
                                  "--data.blend_weights=[2, 1]"))
    assert tokens.fingerprint == text.fingerprint
    assert text.seconds >= 0 and tokens.seconds is None   # the start-up note on slow tokenizing
    assert torch.equal(tokens.get(list(range(300))), text.get(list(range(300))))


def test_the_config_refuses_a_blend_that_cannot_be_read_as_asked(tmp_path, word_tokenizer):
    a_path, b_path = _text_corpus(tmp_path / "a", "a"), _text_corpus(tmp_path / "b", "b")
    blend = f'--data.blend=["{a_path}", "{b_path}"]'
    cases = [
        ([blend, "--data.blend_weights=[1]"], "one weight per \\[data\\] blend entry: got 1 weight"),
        (["--data.blend_weights=[1, 2]", f"--data.path={a_path}"], "got 2 weight\\(s\\) for 0 entries"),
        ([blend, "--data.blend_weights=[1, 1]", f"--data.path={a_path}"], "are both set"),
        ([blend, "--data.blend_weights=[1, 0]"], "finite and > 0"),
        ([f'--data.blend=["{a_path}", ""]', "--data.blend_weights=[1, 1]"], "holds an empty path"),
        ([f'--data.blend=["{a_path}", "{tmp_path}/nothing/*.txt"]', "--data.blend_weights=[1, 1]"],
         "blend\\[1\\]: data path .* matches no file"),
        ([f'--data.blend=["{a_path}", "{tmp_path}/a/1.txt"]', "--data.blend_weights=[1, 1]"],
         "blend\\[1\\] .* and \\[data\\] blend\\[0\\] .* both hold"),
    ]
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "copy.txt").write_text((tmp_path / "a" / "1.txt").read_text())   # a's file, renamed
    cases += [
        ([f'--data.blend=["{a_path}", "{tmp_path}/c/*.txt"]', "--data.blend_weights=[1, 1]"],
         "blend\\[1\\] .* holds copies of files of \\[data\\] blend\\[0\\] .* \\(.*copy.txt' of .*1.txt'; "
         "1 file\\(s\\), 100% of its bytes\\)"),
        (["--data.blend=[a/*.txt, b/*.txt]"], "write a TOML list"),
    ]
    for overrides, message in cases:
        with pytest.raises(ConfigError, match=message):
            _config(tmp_path, *overrides)
    with pytest.raises(ConfigError, match="\\[data\\] blend = .* is set, but \\[data\\] source = \"synthetic\""):
        load_config(None, [blend, "--data.blend_weights=[1, 1]"])
    (tmp_path / "c" / "own.txt").write_text("c" * 20 * len((tmp_path / "c" / "copy.txt").read_text()))
    _config(tmp_path, f'--data.blend=["{a_path}", "{tmp_path}/c/*.txt"]', "--data.blend_weights=[1, 1]")   # 5%: boilerplate
    with pytest.raises(ConfigError, match="needs \\[data\\] path .* or \\[data\\] blend"):
        _config(tmp_path)
    # token files of two tokenizers cannot be one stream of ids
    outs = [str(tmp_path / "a.tokens"), str(tmp_path / "w.tokens")]
    write_token_file(a_path, "text", "bytes", outs[0], progress=_quiet)
    (tmp_path / "words.txt").write_text("x y " * 100)
    write_token_file(str(tmp_path / "words.txt"), "text", word_tokenizer({"x": 0, "y": 1}),
                     outs[1], progress=_quiet)
    shutil.copy(outs[0], tmp_path / "a_copy.tokens")   # the same token file under another name
    with pytest.raises(ConfigError, match="blend\\[1\\] .* holds copies of files of \\[data\\] blend\\[0\\] .*tokens'\\)"):
        _config(tmp_path, "--data.source=tokens", f'--data.blend=["{outs[0]}", "{tmp_path / "a_copy.tokens"}"]',
                "--data.blend_weights=[1, 1]")
    with pytest.raises(ConfigError, match="blend\\[1\\] .* has 2 tokens and end of document None, "
                                          "\\[data\\] blend\\[0\\] .* 257 and 256"):
        _config(tmp_path, "--data.source=tokens", f'--data.blend=["{outs[0]}", "{outs[1]}"]',
                "--data.blend_weights=[1, 1]")


def test_held_out_files_of_any_corpus_of_the_blend_are_refused(tmp_path):
    a_path, b_path = _text_corpus(tmp_path / "a", "a"), _text_corpus(tmp_path / "b", "b")
    (tmp_path / "held").mkdir()
    (tmp_path / "held" / "copy.txt").write_text((tmp_path / "b" / "2.txt").read_text())
    base = [f'--data.blend=["{a_path}", "{b_path}"]', "--data.blend_weights=[1, 1]",
            "--validation.enabled=true"]
    with pytest.raises(ConfigError, match="share 1 file"):
        _config(tmp_path, *base, f"--validation.path={tmp_path / 'b' / '1.txt'}")
    with pytest.raises(ConfigError, match="are copies of files of \\[data\\] blend"):
        _config(tmp_path, *base, f"--validation.path={tmp_path / 'held' / 'copy.txt'}")


def test_a_run_trains_on_a_blend_and_its_config_file_reads_back(tmp_path, one_rank, monkeypatch, capsys):
    """A short run on a blend writes a config.toml that loads to the same blend, a resume
    of it continues without a note about the data, and one with other weights says that
    each corpus continues."""
    drawn = []
    real_get = BlendedSource.get
    monkeypatch.setattr(BlendedSource, "get", lambda self, idx: drawn.extend(idx) or real_get(self, idx))
    a_path, b_path = _text_corpus(tmp_path / "a", "a"), _text_corpus(tmp_path / "b", "b")
    blend = [f'--data.blend=["{a_path}", "{b_path}"]', "--data.blend_weights=[3, 1]",
             "--data.source=text", "--model.vocab_size=257", "--checkpoint.enabled=true",
             "--checkpoint.interval=2", "--metrics.log_every=1"]
    out = test_loop_corners._train(tmp_path, "--training.steps=2", *blend)
    assert out["step"] == 2 and drawn == list(range(len(drawn))) and len(drawn) >= 2
    saved = read_config(str(tmp_path / "run" / "config.toml"))
    assert (saved.data.blend, saved.data.blend_weights) == ([a_path, b_path], [3.0, 1.0])
    capsys.readouterr()
    out = test_loop_corners._train(tmp_path, "--training.steps=3", *blend)
    said = "".join(capsys.readouterr())
    assert "resumed from step 2" in said and "differs from the checkpoint" not in said
    assert out["step"] == 3 and out["records"][-1]["step"] == 3
    assert math.isfinite(out["records"][-1]["loss"])
    # Other weights: the blend's position went through the checkpoint and each corpus goes on.
    reweighted = [o if not o.startswith("--data.blend_weights") else "--data.blend_weights=[1, 3]"
                  for o in blend]
    out = test_loop_corners._train(tmp_path, "--training.steps=4", *reweighted)
    said = "".join(capsys.readouterr())
    assert "-> [1024, 3072] from sample" in said and "each corpus continues at its next sample" in said
    assert "differs from the checkpoint" not in said and out["step"] == 4


def test_the_blend_module_names_its_block_in_the_docs():
    doc = (ROOT / "docs" / "config.md").read_text()
    assert f"block g div {data.BLEND_BLOCK}" in doc and f"1/{data.BLEND_BLOCK}" in doc
