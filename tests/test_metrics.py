"""The server's Prometheus text exposition: cumulative buckets, labels, counter rules."""
import pytest

from difuse.runtime.metrics import Counter, Gauge, Histogram, Registry


def test_exposition_has_cumulative_buckets_escaped_labels_and_scraped_gauges():
    registry = Registry()
    requests = registry.add(Counter("requests_total", "requests", ("endpoint",)))
    latency = registry.add(Histogram("latency_seconds", "latency", (0.1, 1.0)))
    depth = [3]
    registry.add(Gauge("queue_depth", "waiting", lambda: depth[0]))
    requests.inc(endpoint='/v1/"x"')
    requests.inc(2, endpoint='/v1/"x"')
    for value in (0.05, 0.5, 5.0):
        latency.observe(value)
    depth[0] = 7
    lines = registry.exposition().splitlines()
    assert "# TYPE requests_total counter" in lines and "# TYPE latency_seconds histogram" in lines
    assert 'requests_total{endpoint="/v1/\\"x\\""} 3' in lines
    assert ['latency_seconds_bucket{le="0.1"} 1', 'latency_seconds_bucket{le="1"} 2',
            'latency_seconds_bucket{le="+Inf"} 3', "latency_seconds_sum 5.55", "latency_seconds_count 3"] == \
        [line for line in lines if line.startswith("latency_seconds_")]
    assert "queue_depth 7" in lines


def test_counters_reject_decrements_and_unknown_labels():
    counter = Counter("c_total", "c", ("reason",))
    with pytest.raises(ValueError, match="only increase"):
        counter.inc(-1, reason="stop")
    with pytest.raises(ValueError, match="takes labels"):
        counter.inc(status="200")
