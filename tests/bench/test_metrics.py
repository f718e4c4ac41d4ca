"""summarize() on small runs worked out by hand, and run_metadata()'s shape."""

from __future__ import annotations

import datetime
import json

import pytest

from loraserve.bench.metrics import RequestRecord, describe, run_metadata, summarize


def run() -> list[RequestRecord]:
    """Three completed requests (TTFT 1, 2, 7 s) and one refused."""
    return [
        # TTFT 1, TPOT (3 - 1) / 4 = 0.5, end to end 3
        RequestRecord(0, "a", 0.0, sent_s=0.0, first_token_s=1.0, finish_s=3.0, output_tokens=5),
        # TTFT 2, TPOT (4 - 3) / 2 = 0.5, end to end 3
        RequestRecord(1, "b", 1.0, sent_s=1.0, first_token_s=3.0, finish_s=4.0, output_tokens=3),
        # TTFT 7, one token: no TPOT, end to end 7
        RequestRecord(2, None, 2.0, sent_s=2.0, first_token_s=9.0, finish_s=9.0, output_tokens=1),
        RequestRecord(3, "a", 3.0, sent_s=3.0, finish_s=3.1, error="HTTP 429: queue full"),
    ]


def test_counts_and_rates() -> None:
    summary = summarize(run(), duration_s=10.0)
    assert (summary["requests"], summary["completed"], summary["errors"]) == (4, 3, 1)
    assert summary["error_messages"] == {"HTTP 429: queue full": 1}
    assert summary["duration_s"] == 10.0
    assert summary["throughput_req_s"] == pytest.approx(0.3)
    assert summary["output_tokens_per_s"] == pytest.approx(0.9)  # 5 + 3 + 1 tokens


def test_latencies_count_from_the_scheduled_arrival() -> None:
    summary = summarize(run(), duration_s=10.0)
    # TTFT [1, 2, 7]: p90 sits 0.8 of the way from 2 to 7, p99 0.98 of the way.
    assert summary["ttft_s"] == pytest.approx({"mean": 10 / 3, "p50": 2.0, "p90": 6.0, "p99": 6.9})
    assert summary["tpot_s"] == pytest.approx({"mean": 0.5, "p50": 0.5, "p90": 0.5, "p99": 0.5})
    assert summary["e2e_s"]["p50"] == pytest.approx(3.0)
    assert summary["e2e_s"]["mean"] == pytest.approx(13 / 3)


def test_a_late_send_counts_against_ttft() -> None:
    """Queueing in the client is latency too: TTFT is not measured from the send."""
    record = RequestRecord(
        0, "a", 1.0, sent_s=4.0, first_token_s=5.0, finish_s=6.0, output_tokens=2
    )
    assert summarize([record], 5.0)["ttft_s"]["p50"] == pytest.approx(4.0)


@pytest.mark.parametrize("slo, attained", [(6.0, 0.5), (7.0, 0.75), (0.5, 0.0)])
def test_slo_attainment_is_over_all_requests_errors_missing(slo: float, attained: float) -> None:
    assert summarize(run(), 10.0, slo_ttft_s=slo)["slo_attainment"] == pytest.approx(attained)


def test_a_request_failing_after_its_first_token_is_a_miss() -> None:
    broken = RequestRecord(0, "a", 0.0, first_token_s=0.1, finish_s=0.2, output_tokens=1, error="x")
    summary = summarize([broken], 1.0)
    assert (summary["completed"], summary["errors"], summary["slo_attainment"]) == (0, 1, 0.0)
    assert summary["ttft_s"]["p50"] is None


def test_an_empty_run_has_no_statistics() -> None:
    summary = summarize([], 0.0)
    assert summary["throughput_req_s"] == 0.0 and summary["slo_attainment"] is None
    assert summary["ttft_s"] == {"mean": None, "p50": None, "p90": None, "p99": None}
    json.dumps(summary, allow_nan=False)  # plain JSON, no NaN


def test_describe_one_value() -> None:
    assert describe([2.5]) == {"mean": 2.5, "p50": 2.5, "p90": 2.5, "p99": 2.5}


def test_run_metadata_says_when_where_and_which_tree() -> None:
    metadata = run_metadata()
    json.dumps(metadata, allow_nan=False)
    assert datetime.datetime.fromisoformat(metadata["date"]).tzinfo is not None
    machine = metadata["machine"]
    assert machine["cpu_count"] >= 1 and machine["platform"] and machine["processor"]
    assert isinstance(machine["gpus"], list)
    commit = metadata["git_commit"]
    assert commit is None or (len(commit) == 40 and int(commit, 16) >= 0)
    assert metadata["git_dirty"] in (None, True, False)
