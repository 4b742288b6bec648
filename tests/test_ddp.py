"""Data-parallel local learning with 2 CPU processes (gloo), launched by Lightning's subprocess launcher."""

import pytest

from benchmarks.ddp import ranks_identical, run


def _run_two(path):
    """The 2-process run with the default rule (learned readouts for this MLP).

    One retry when a rank dies from a signal (seen once: a gloo abort at start-up).
    """
    try:
        return run(path, 2, 16, "tpsgd_ddp", rule="auto")
    except RuntimeError as err:
        if "exited with -" not in str(err):
            raise
        print(f"retrying after: {err}")
        return run(path, 2, 16, "tpsgd_ddp", rule="auto")


@pytest.mark.slow
def test_two_processes_stay_bit_identical_and_match_one_process(tmp_path):
    two = _run_two(tmp_path / "two")
    assert ranks_identical(tmp_path / "two", 2)
    one = run(tmp_path / "one", 1, 32, "tpsgd", rule="auto")  # the same global batch in one process
    assert two["steps"] == one["steps"]
    assert abs(two["acc"] - one["acc"]) < 0.05, (two, one)
