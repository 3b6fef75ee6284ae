"""scripts/bench_dispatch.py: argument checks that name the argument, before any work."""
import pytest

from .conftest import load_script


@pytest.mark.parametrize("args, message", [
    (["--dim", "0"], "--dim must be >= 1, got 0"),
    (["--tokens", "-5"], "--tokens must be >= 1, got -5"),
    (["--iters", "0"], "--iters must be >= 1, got 0"),
    (["--warmup", "-1"], "--warmup must be >= 0, got -1"),
    (["--top-k", "9", "--experts", "8"], "--top-k (9) exceeds --experts (8)"),
])
def test_bad_sizes_name_the_argument(capsys, args, message):
    with pytest.raises(SystemExit) as exit_info:
        load_script("bench_dispatch").main(args)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
