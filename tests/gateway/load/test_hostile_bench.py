"""`make bench-hostile`'s greedy client, shortened, in the suite: a two-worker gateway (in a
1 GiB cgroup where one can be made) with a client holding 16 requests in flight and
resending at once whatever it gets, beside a victim sending one photo at a time. The
bench measures latencies; here only counts are held, which do not depend on the machine's
speed: the victim is answered, and the greedy client gets answers at the pace of its
error budget, not as fast as two workers can refuse it (about 500 a second before)."""

from __future__ import annotations

from bench.hostile import SCENARIOS, run
from service.settings import Settings

from ...helpers import TritonEndpoint

SECONDS = 6.0


def test_a_greedy_client_is_paced_and_the_victim_served(gateway_triton: TritonEndpoint) -> None:
    greedy = next(s for s in SCENARIOS if s.name == "greedy")
    result = run(gateway_triton.grpc_url, greedy, "after", SECONDS, interval=0.8)
    assert result["gateway_alive"] and not result["oom_kills"], result
    assert result["ok_share"] >= 0.9, result
    answers = result["attacker_answers"]
    refused = sum(n for status, n in answers.items() if status != "200")
    # Per worker: the burst and what the budget earns, then one held answer per thread per
    # pause (16 threads over two workers), and slack for the round in flight at the end.
    fields = Settings.model_fields
    burst, rate, pause = (fields[n].default for n in ("error_burst", "error_rate_per_s", "error_pause_s"))
    bound = 2 * (burst + rate * SECONDS) + 16 * (SECONDS / pause + 1)
    assert 0 < refused <= bound, answers
