"""The application's arguments (`serve` config `args`) and the per-replica metrics page."""

from __future__ import annotations

import pytest

pytest.importorskip("ray")
from loradock.runtime.cluster.args import ClusterArgs
from loradock.runtime.metrics import Metrics


def test_string_args_from_serve_run_are_converted():
    args = ClusterArgs.from_mapping({"base": "b", "replicas": "3", "num_gpus": "1", "hub_pull": "true",
                                     "engine": '{"max_slots": 16, "max_running": 8}'})
    assert (args.replicas, args.num_gpus, args.hub_pull) == (3, 1.0, True)
    assert args.engine_config.max_slots == 16 and args.multiplexed_slots == 15
    assert args.autoscaling is None


def test_autoscaling_passes_through():
    args = ClusterArgs(base="b", replicas=2, min_replicas=1, max_replicas=4, engine={"max_running": 8})
    assert args.autoscaling == {"min_replicas": 1, "max_replicas": 4, "initial_replicas": 2,
                                "target_ongoing_requests": 4.0}


@pytest.mark.parametrize("values, message", [
    ({"base": "b", "replica": 2}, "unknown argument"),
    ({"base": "b", "replicas": "two"}, "replicas: 'two' is not a valid int"),
    ({"base": "b", "hub_pull": "maybe"}, "hub_pull"),
    ({"base": "b", "engine": {"max_slot": 4}}, "unknown EngineConfig field"),
    ({"base": "b", "replicas": 0}, "at least 1"),
    ({"base": "b", "min_replicas": 3, "max_replicas": 2}, "below min_replicas"),
])
def test_bad_args_are_named(values, message):
    with pytest.raises(ValueError, match=message):
        ClusterArgs.from_mapping(values)


def test_replica_counters_carry_a_replica_label():
    stats = {"r1": {"a@1": {"requests": 3, "loads": 1}, "<base>": {"requests": 2}},
             "r2": {"a@2": {"requests": 5, "loads": 1}}}
    page = Metrics(replica_stats=lambda: stats).render().decode()
    assert 'loradock_replica_requests_total{adapter="a",replica="r1",version="1"} 3.0' in page
    assert 'loradock_replica_requests_total{adapter="",replica="r1",version=""} 2.0' in page
    assert 'loradock_replica_requests_total{adapter="a",replica="r2",version="2"} 5.0' in page
    assert 'loradock_replica_loads_total{adapter="a",replica="r2",version="2"} 1.0' in page
