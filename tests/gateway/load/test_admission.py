"""Admission control's arithmetic (service/admission.py), on a clock the test moves, and
the deadline's parsing (service/deadlines.py). The stack under overload is tested in
test_overload.py."""

from __future__ import annotations

import asyncio
import contextvars
import math

import pytest

from service import deadlines
from service.admission import Admission
from service.errors import InvalidRequest
from service.model_load import ACTIVE_S, SAMPLE_BUSY_S, ModelLoad


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def serve(load: ModelLoad, clock: Clock, requests: int, service_s: float, concurrency: int = 1) -> None:
    """``requests`` requests, ``concurrency`` at a time, each batch taking ``service_s``."""
    for _ in range(0, requests, concurrency):
        for _ in range(concurrency):
            load.enter(1)
        clock.now += service_s
        for _ in range(concurrency):
            load.leave(1, latency_s=service_s)


def model(objective_s: float = 0.5, initial_limit: int = 8, min_limit: int = 1) -> tuple[ModelLoad, Clock]:
    clock = Clock()
    return ModelLoad(objective_s, initial_limit, min_limit, clock=clock), clock


def test_rate_is_completions_per_busy_second_and_idle_time_does_not_count() -> None:
    load, clock = model()
    assert load.rate is None and load.limit == 8
    serve(load, clock, 10, 0.1)  # 10/s while busy
    clock.now += 60  # a quiet minute
    serve(load, clock, 10, 0.1)
    assert load.rate == pytest.approx(10.0)


def test_answers_within_the_objective_raise_a_limit_in_use() -> None:
    load, clock = model(objective_s=0.5, initial_limit=4)
    serve(load, clock, 40, 0.1, concurrency=4)  # the whole limit in use, answers in 0.1 s
    assert load.limit > 4
    grown = load.limit
    serve(load, clock, 40, 0.1, concurrency=1)  # one at a time: the limit is not in use
    assert load.limit == grown


def test_answers_past_the_objective_cut_the_limit_once_per_round_trip() -> None:
    load, clock = model(objective_s=0.5, initial_limit=10)
    for _ in range(5):
        load.enter(1)
    clock.now += 1.0
    for _ in range(5):  # five late answers in the same instant: one cut
        load.leave(1, latency_s=1.0)
    assert load.limit == 8
    serve(load, clock, 3, 1.0)  # later round trips: a cut each
    assert load.limit < 8
    for _ in range(50):
        serve(load, clock, 1, 1.0)
    assert load.limit == 1  # never below the floor


def test_failures_feed_neither_the_limit_nor_the_rate() -> None:
    load, clock = model(initial_limit=4)
    for _ in range(20):
        load.enter(1)
        clock.now += 0.001
        load.leave(1, latency_s=None)  # instant failures look like a fast server
    assert load.rate is None and load.limit == 4


def test_refuses_past_the_limit_with_retry_after_from_the_rate() -> None:
    clock = Clock()
    admission = Admission(objective_s=0.5, initial_limit=2, min_limit=1)
    load = admission.load("m")
    load.clock = clock
    serve(load, clock, 20, 0.25)  # 4/s, one at a time: the limit stays 2
    assert load.limit == 2
    with admission.admitted(["m"], 1), admission.admitted(["m"], 1):
        refusal = admission.refusal(["m"], 1, None)
        assert refusal is not None and refusal.reason == "capacity" and refusal.model == "m"
        assert refusal.retry_after_s == math.ceil(2 / 4)
    assert admission.refusal(["m"], 1, None) is None


def test_an_idle_model_always_admits_even_a_large_request() -> None:
    admission = Admission(objective_s=0.5, initial_limit=2)
    assert admission.refusal(["m"], 144, budget_s=0.001) is None


def test_a_request_whose_deadline_cannot_be_met_is_refused_at_once() -> None:
    clock = Clock()
    admission = Admission(objective_s=10.0, initial_limit=8)
    load = admission.load("m")
    load.clock = clock
    serve(load, clock, 20, 0.5)  # 2/s
    with admission.admitted(["m"], 1):
        assert admission.refusal(["m"], 1, budget_s=5.0) is None  # 1 s expected
        refusal = admission.refusal(["m"], 1, budget_s=0.8)
        assert refusal is not None and refusal.reason == "deadline"


def test_a_per_request_ensemble_takes_places_in_all_its_models_or_none() -> None:
    admission = Admission(objective_s=0.5, initial_limit=1, min_limit=1)
    with admission.admitted(["a"], 1):
        refusal = admission.refusal(["b", "a"], 1, None)
        assert refusal is not None and refusal.model == "a"
        assert admission.load("b").in_flight == 0  # nothing taken in b
    with admission.admitted(["a", "b"], 1) as ticket:
        assert (admission.load("a").in_flight, admission.load("b").in_flight) == (1, 1)
        ticket.complete()
    assert (admission.load("a").in_flight, admission.load("b").in_flight) == (0, 0)


def test_only_a_completed_ticket_feeds_the_limit_and_the_rate() -> None:
    """A request that fails or is cancelled gives its places back and says nothing of how
    fast the server answers; a completed one reports its latency, admission to answer."""
    clock = Clock()
    admission = Admission(objective_s=0.5, initial_limit=4)
    load = admission.load("m")
    load.clock = clock
    for _ in range(3):  # the limit in use, answered late, but failed: no cut
        with pytest.raises(RuntimeError), admission.admitted(["m"], 2):
            clock.now += 1.0
            raise RuntimeError("Triton failed")
    assert (load.in_flight, load.limit) == (0, 4)
    with admission.admitted(["m"], 2) as ticket, admission.admitted(["m"], 2) as other:
        clock.now += 1.0  # past the objective
        ticket.complete()
        other.complete()
    assert (load.in_flight, load.limit) == (0, 3)  # cut once by a fifth: 4 * 0.8


def test_a_ticket_gives_its_places_back_once() -> None:
    admission = Admission(objective_s=0.5, initial_limit=4)
    with admission.admitted(["m"], 3) as ticket:
        assert admission.load("m").in_flight == 3
        ticket.leave()
        assert admission.load("m").in_flight == 0
    assert admission.load("m").in_flight == 0


def test_crops_weigh_as_many_images() -> None:
    admission = Admission(objective_s=1.0, initial_limit=40)
    with admission.admitted(["m"], 10):
        assert admission.refusal(["m"], 10, None) is None
        refusal = admission.refusal(["m"], 144, None)
        assert refusal is not None and refusal.reason == "capacity"


def test_a_sample_needs_busy_time_as_well_as_completions() -> None:
    load, clock = model()
    serve(load, clock, 10, SAMPLE_BUSY_S / 100)
    assert load.rate is None  # 10 completions in 5 ms of busy time: not yet a measurement


@pytest.mark.parametrize(
    ("given", "expected"), [(None, (30.0, False)), (2.5, (2.5, True)), (45.0, (30.0, False))]
)
def test_deadline_is_the_clients_capped_by_the_gateways(
    given: float | None, expected: tuple[float, bool]
) -> None:
    def check() -> None:
        deadline = deadlines.start(given, 30.0)
        assert (deadline.budget_s, deadline.client) == expected
        remaining = deadlines.remaining_s()
        assert remaining is not None and 0 < remaining <= expected[0]

    contextvars.Context().run(check)  # the deadline must not outlive this test
    assert deadlines.remaining_s() is None


@pytest.mark.parametrize("bad", [0.0, -1.0, math.nan, math.inf])
def test_deadline_must_be_a_positive_finite_number(bad: float) -> None:
    with pytest.raises(InvalidRequest):
        contextvars.Context().run(deadlines.start, bad, 30.0)


def test_work_is_cancelled_when_the_client_goes_away() -> None:
    """The disconnect cancels the work (in production: the gRPC call, which Triton drops)."""
    from starlette.requests import ClientDisconnect

    cancelled = asyncio.Event()

    async def work() -> str:
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return "answer"

    async def scenario() -> None:
        gone = asyncio.Event()

        async def receive() -> dict[str, object]:
            await gone.wait()
            return {"type": "http.disconnect"}

        asyncio.get_running_loop().call_later(0.05, gone.set)
        with pytest.raises(ClientDisconnect):
            await deadlines.unless_disconnected(receive, work())
        assert cancelled.is_set()

        async def never() -> dict[str, object]:
            await asyncio.sleep(60)
            return {}

        async def quick() -> str:
            return "answer"

        assert await deadlines.unless_disconnected(never, quick()) == "answer"

    asyncio.run(scenario())


def measured(admission: Admission, model_name: str, rate: float) -> ModelLoad:
    """The model's load with ``rate`` images per busy second already measured."""
    load = admission.load(model_name)
    load.rate = rate
    return load


def test_an_idle_model_refuses_what_its_measured_rate_cannot_answer_in_time() -> None:
    """144 crops at 10 images/s take 14.4 s: refused at once against a 10 s deadline, with
    the arithmetic in the refusal; admitted against 30 s."""
    admission = Admission(objective_s=0.5, initial_limit=8)
    measured(admission, "m", 10.0)
    refusal = admission.refusal(["m"], 144, budget_s=10.0)
    assert refusal is not None and refusal.reason == "deadline"
    assert "14.4 s" in refusal.detail and "144 image(s)" in refusal.detail
    assert admission.refusal(["m"], 144, budget_s=30.0) is None


def test_a_client_holding_every_place_cannot_keep_another_out() -> None:
    """A holds the whole limit; B, holding nothing, is admitted within its share; A is then
    refused past its share (half the limit) while B is served and for ACTIVE_S after B's
    last answer (B sends one request at a time), and admitted again once B has gone."""
    admission = Admission(objective_s=0.5, initial_limit=8)
    clock = Clock()
    admission.load("m").clock = clock
    greedy = [admission.admitted(["m"], 1, "a") for _ in range(8)]
    for ticket in greedy:
        ticket.__enter__()
    assert admission.refusal(["m"], 1, None, "a") is not None  # the limit is full
    assert admission.refusal(["m"], 1, None, "b") is None
    with admission.admitted(["m"], 1, "b"):
        refusal = admission.refusal(["m"], 1, None, "a")
        assert refusal is not None and refusal.reason == "share" and "fair share of 4" in refusal.detail
        assert admission.load("m").share("b") == 4
    for ticket in greedy[:4]:
        ticket.__exit__(None, None, None)
    assert admission.refusal(["m"], 1, None, "a") is not None  # B is between two requests
    clock.now += ACTIVE_S + 0.1
    assert admission.refusal(["m"], 1, None, "a") is None  # alone again, within the limit
    for ticket in greedy[4:]:
        ticket.__exit__(None, None, None)
    assert admission.load("m").clients == {}


def test_a_request_larger_than_a_share_is_refused_while_others_are_served() -> None:
    admission = Admission(objective_s=0.5, initial_limit=8)
    with admission.admitted(["m"], 1, "victim"):
        refusal = admission.refusal(["m"], 144, None, "crops")
        assert refusal is not None and refusal.reason == "share"


def test_a_timeout_is_a_miss_that_cuts_the_limit() -> None:
    clock = Clock()
    admission = Admission(objective_s=0.5, initial_limit=10)
    load = admission.load("m")
    load.clock = clock
    with admission.admitted(["m"], 1) as ticket:
        clock.now += 0.2
        ticket.time_out()
    assert load.limit == 8


def test_latency_counts_from_the_triton_call_not_the_upload_or_decode() -> None:
    """A request whose upload and decode took 5 s, then answered 0.1 s after it was sent,
    is within the objective: it does not cut the limit."""
    clock = Clock()
    admission = Admission(objective_s=0.5, initial_limit=4)
    load = admission.load("m")
    load.clock = clock
    for _ in range(4):
        with admission.admitted(["m"], 4) as ticket:
            clock.now += 5.0  # decoding
            ticket.begin()
            clock.now += 0.1
            ticket.complete()
    assert load.limit >= 4


def test_a_photo_beside_a_144_crop_request_waits_a_share_not_all_144() -> None:
    """At 10 images/s, 144 crops in flight would be 14.5 s ahead of a photo in a FIFO; sent
    in time slices (one crop a call at that rate beside another client), served in turn,
    the photo waits for the other client's share, what the model computes in a quarter of
    the objective (1 image): it is admitted against a 5 s deadline, not refused."""
    admission = Admission(objective_s=0.5, initial_limit=8)
    load = measured(admission, "m", 10.0)
    with admission.admitted(["m"], 144, "crops"):
        assert load.share("victim") == 1
        assert load.fair_wait_s("victim", 1) == pytest.approx(0.2)
        assert admission.refusal(["m"], 1, budget_s=5.0, client="victim") is None
        assert admission.refusal(["m"], 1, budget_s=0.1, client="victim") is not None


def test_beside_another_client_a_share_is_what_the_model_computes_in_a_slice() -> None:
    """At 8 images/s a quarter of the 0.5 s objective computes one image: a client sharing
    the model holds one, whatever its part of the limit; at 2,000 images/s (a GPU) the
    slice holds 250 and its part of the limit (16 // 2) is the bound."""
    for rate, expected in ((8.0, 1), (40.0, 5), (2000.0, 8)):
        admission = Admission(objective_s=0.5, initial_limit=16)
        load = measured(admission, "m", rate)
        load._limit = 16.0
        with admission.admitted(["m"], 1, "other"):
            assert load.share("greedy") == expected, rate
        assert load.share("greedy") == expected  # the other client left just now: still sharing
    alone = measured(Admission(objective_s=0.5, initial_limit=16), "m", 8.0)
    alone._limit = 16.0
    assert alone.share("greedy") == 16
