"""first_problem and first_difference: one verdict for all ranks."""

from ep_fp8.parallel.agree import first_difference, first_problem
from tests._dist import run_ranks


def test_without_a_process_group_a_rank_keeps_its_own_verdict():
    assert first_problem("") == "" and first_problem("bad file") == "bad file"
    assert first_difference("anything") == ""


def _worker(rank, world):
    return first_problem({0: "", 1: "rank 1: bad", 2: "rank 2: bad too"}[rank])


def test_every_rank_gets_the_first_problem_in_rank_order():
    assert run_ranks(_worker, 3, timeout=120) == ["rank 1: bad"] * 3


def _difference_worker(rank, world):
    return (first_difference({0: "a", 1: "a", 2: "b"}[rank]), first_difference("same"))


def test_every_rank_learns_which_rank_first_differs_from_rank_0():
    assert run_ranks(_difference_worker, 3, timeout=120) == [("rank 2: b; rank 0: a", "")] * 3
