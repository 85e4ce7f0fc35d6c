"""The workers' shared board of clients (service/board.py): a client one worker serves counts
as sharing the model in every worker, so that a greedy client on worker B gets its share,
not the whole limit, while a victim is served by worker A."""

from __future__ import annotations

import multiprocessing
import os
from pathlib import Path

import pytest

from service.admission import Admission
from service.board import ACTIVE_S, HOLD_S, SLOTS, Board, client_hash, default_path


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def two_workers(tmp_path: Path) -> tuple[Board, Board, Clock]:
    clock = Clock()
    path = tmp_path / "board"
    return Board(path, clock), Board(path, clock), clock


def test_a_client_one_worker_serves_is_seen_by_the_other(two_workers: tuple[Board, Board, Clock]) -> None:
    a, b, clock = two_workers
    a.note("inception_v4", "addr:10.0.0.1")
    assert b.clients("inception_v4") == {client_hash("addr:10.0.0.1")}
    assert b.clients("inception_resnet_v1") == set()  # per model
    clock.now += ACTIVE_S + 0.1
    assert b.clients("inception_v4") == set()  # gone quiet


def test_a_noted_client_takes_one_slot_and_stale_slots_are_reused(
    two_workers: tuple[Board, Board, Clock],
) -> None:
    a, b, clock = two_workers
    for _ in range(5):
        a.note("m", "c")
        b.note("m", "c")
    assert int((a.table["key"] != 0).sum()) == 1
    clock.now += ACTIVE_S + 1
    for n in range(SLOTS):
        a.note("m", f"client-{n}")  # every slot, the stale one included
    assert len(b.clients("m")) > SLOTS * 0.8  # a nearly full table drops some, never fails


def test_a_single_worker_has_no_board() -> None:
    assert Board.for_workers(1) is None


def test_the_board_is_named_after_the_workers_parent() -> None:
    assert default_path().name == f"inception-gateway-board-{os.getppid()}"


def test_the_first_worker_to_stop_removes_the_file(tmp_path: Path) -> None:
    path = tmp_path / "board"
    a, b = Board(path), Board(path)
    a.note("m", "c")
    a.close()
    assert not path.exists()
    assert b.clients("m")  # the other keeps its mapping
    b.close()


def note_in_another_process(path: str) -> None:
    Board(Path(path)).note("m", "victim")


def test_another_process_writes_what_this_one_reads(tmp_path: Path) -> None:
    board = Board(tmp_path / "board")
    process = multiprocessing.get_context("spawn").Process(
        target=note_in_another_process, args=(str(tmp_path / "board"),)
    )
    process.start()
    process.join(60)
    assert process.exitcode == 0
    assert board.clients("m") == {client_hash("victim")}


def test_admission_shares_a_model_with_the_other_workers_clients(
    two_workers: tuple[Board, Board, Clock],
) -> None:
    """Worker B sees only the greedy client; worker A serves the victim. With the board, B
    gives the greedy client half of its limit, not all of it."""
    worker_a, worker_b, clock = two_workers
    admission = Admission(objective_s=0.5, initial_limit=8)
    load = admission.load("m")
    load.clock = clock
    assert load.share("greedy") == 8
    admission.board = worker_b
    assert load.share("greedy") == 8  # no one else anywhere
    worker_a.note("m", "victim")
    assert load.active("greedy") == 2 and load.share("greedy") == 4
    with admission.admitted(["m"], 1, "greedy"):
        assert worker_a.clients("m") == {client_hash("victim"), client_hash("greedy")}


def test_a_hold_in_one_worker_counts_in_the_other(two_workers: tuple[Board, Board, Clock]) -> None:
    """A greedy client holding an image in worker A counts as holding one in worker B, so
    that while it shares the model it holds its share across the workers, not in each."""
    worker_a, worker_b, clock = two_workers
    in_a, in_b = Admission(objective_s=0.5, initial_limit=8), Admission(objective_s=0.5, initial_limit=8)
    in_a.board, in_b.board = worker_a, worker_b
    for admission in (in_a, in_b):
        load = admission.load("m")
        load.clock = clock
        load.rate = 8.0  # a slice of the objective computes one image: a share of one
    worker_b.note("m", "victim")
    with in_a.admitted(["m"], 1, "greedy"):
        assert worker_b.holding("m", "greedy")
        assert in_b.load("m").held("greedy") == 1
        refusal = in_b.refusal(["m"], 1, None, "greedy")
        assert refusal is not None and refusal.reason == "share"
        assert in_b.refusal(["m"], 1, None, "victim") is None
    assert not worker_b.holding("m", "greedy")  # given back: B admits it again
    assert in_b.refusal(["m"], 1, None, "greedy") is None
    clock.now += 1000
    worker_a.note("m", "crashed", holding=True)
    clock.now += HOLD_S + 1  # a worker that died holding places leaves its mark for HOLD_S at most
    assert not worker_b.holding("m", "crashed")
