"""`loradock bench --cluster`: adapter-affine routing against Ray Serve's default routing.

Stub replicas stand in for engines (so it fits a small machine): each keeps an LRU of `slots`
adapters, a request for an adapter outside it is a cold load (`load_ms` of sleep), then the
request takes `service_ms`. With multiplexed routing the LRU is Ray Serve's own (the
`@serve.multiplexed` loader is the cold load) and the router sends each adapter to the replicas
holding it; with default routing the same LRU sits inside the replica and the router spreads
requests by queue length alone; "multiplexed+hot" is multiplexed routing with the ingress's hot
versions given several homes (cluster/hot.py: the top 2 by the last 1,000 requests, 2 homes
each). The workload is N adapters with power-law popularity (weight of the k-th most popular =
1 / k**alpha), sent by C concurrent clients.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections import Counter, OrderedDict
from dataclasses import asdict, dataclass, field
from pathlib import Path

import ray
from ray import serve

from .hot import HotVersions, version_of

ROUTINGS = ("multiplexed", "multiplexed+hot", "default")


@dataclass
class RoutingBenchConfig:
    adapters: int = 50
    """Adapters in the workload."""
    replicas: tuple[int, ...] = (2, 4)
    """Replica counts to measure."""
    slots: int = 8
    """Adapters one replica holds (device slots)."""
    requests: int = 2000
    """Requests per run."""
    clients: int = 16
    """Concurrent clients (closed loop)."""
    max_ongoing: int = 32
    """Requests in flight per replica (the app sets the engine's max_running, 32 by default). A
    replica at this limit makes the router send a request elsewhere, so a low one costs hits."""
    alpha: float = 1.0
    """Power-law exponent of adapter popularity."""
    load_ms: float = 20.0
    """Stub cold-load time."""
    service_ms: float = 5.0
    """Stub time per request."""
    seed: int = 0


@dataclass
class RoutingResult:
    routing: str
    replicas: int
    requests: int
    hit_rate: float
    cold_loads_per_1000: float
    replicas_per_adapter: float  # distinct replicas that loaded an adapter, mean over adapters
    ideal_hit_rate: float  # one LRU of replicas x slots over the same requests: perfect affinity
    seconds: float
    loads_by_replica: dict[str, int] = field(default_factory=dict)
    # of the busiest adapter's requests, the share its busiest replica served (1.0: one home)
    busiest_adapter_top_replica: float = 0.0


class _Lru:
    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.items: OrderedDict[str, None] = OrderedDict()

    def touch(self, key: str) -> bool:
        """True on a hit; on a miss inserts `key` (evicting the least recently used)."""
        if key in self.items:
            self.items.move_to_end(key)
            return True
        if len(self.items) >= self.capacity:
            self.items.popitem(last=False)
        self.items[key] = None
        return False


class StubReplica:
    """A replica that only models its adapter cache: loads cost `load_ms`, requests `service_ms`."""

    def __init__(self, slots: int, load_ms: float, service_ms: float) -> None:
        self._lru = _Lru(slots)
        self._load_s = load_ms / 1000
        self._service_s = service_ms / 1000
        self._loads: list[str] = []
        self._served: Counter[str] = Counter()
        self.name = serve.get_replica_context().replica_id.unique_id

        async def load(model_id: str) -> str:
            await asyncio.sleep(self._load_s)
            self._loads.append(version_of(model_id))
            return model_id

        self._multiplexed = serve.multiplexed(max_num_models_per_replica=slots)(load)

    async def __call__(self, adapter: str) -> str:
        model_id = serve.get_multiplexed_model_id()
        if model_id:  # Ray's LRU; its loader counts the loads
            await self._multiplexed(model_id)
        elif not self._lru.touch(adapter):
            await asyncio.sleep(self._load_s)
            self._loads.append(adapter)
        self._served[adapter] += 1
        await asyncio.sleep(self._service_s)
        return self.name

    def loads(self) -> tuple[str, list[str], dict[str, int]]:
        return self.name, list(self._loads), dict(self._served)


def workload(config: RoutingBenchConfig) -> list[str]:
    rng = random.Random(config.seed)
    names = [f"adapter-{i:02d}" for i in range(config.adapters)]
    weights = [1 / (k + 1) ** config.alpha for k in range(config.adapters)]
    return rng.choices(names, weights, k=config.requests)


def ideal_hit_rate(adapters: list[str], slots: int) -> float:
    """The hit rate of one LRU holding every replica's slots: what perfect affinity reaches."""
    lru = _Lru(slots)
    return sum(lru.touch(a) for a in adapters) / len(adapters)


async def _drive(handle, adapters: list[str], routing: str, clients: int) -> None:
    queue = list(reversed(adapters))
    hot = HotVersions()  # the ingress's defaults

    async def client() -> None:
        while queue:
            i, adapter = len(queue), queue.pop()
            if routing == "default":
                h = handle
            else:
                model_id = hot.model_id(adapter, str(i)) if routing == "multiplexed+hot" else adapter
                h = handle.options(multiplexed_model_id=model_id)
            await h.remote(adapter)

    await asyncio.gather(*(client() for _ in range(clients)))


def _loads(handle, replicas: int) -> dict[str, tuple[list[str], dict[str, int]]]:
    """Every replica's loads and requests served per adapter: asked until each replica answered
    (the router picks the replica)."""
    seen: dict[str, tuple[list[str], dict[str, int]]] = {}
    for _ in range(200 * replicas):
        name, loads, served = handle.loads.remote().result()
        seen[name] = (loads, served)
        if len(seen) == replicas:
            break
    return seen


def run_one(config: RoutingBenchConfig, routing: str, replicas: int) -> RoutingResult:
    deployment = serve.deployment(StubReplica, name="StubReplica").options(
        num_replicas=replicas, max_ongoing_requests=config.max_ongoing, ray_actor_options={"num_cpus": 0})
    app_name = f"routing-{routing}-{replicas}"
    handle = serve.run(deployment.bind(config.slots, config.load_ms, config.service_ms), name=app_name,
                       route_prefix=None)
    try:
        adapters = workload(config)
        start = time.perf_counter()
        asyncio.run(_drive(handle, adapters, routing, config.clients))
        seconds = time.perf_counter() - start
        reports = _loads(handle, replicas)
    finally:
        serve.delete(app_name)
    by_replica = {r: loads for r, (loads, _) in reports.items()}
    loads = sum(len(v) for v in by_replica.values())
    holders: dict[str, set[str]] = {}
    for replica, names in by_replica.items():
        for name in names:
            holders.setdefault(name, set()).add(replica)
    busiest = Counter(adapters).most_common(1)[0][0]
    busiest_served = [served.get(busiest, 0) for _, served in reports.values()]
    return RoutingResult(
        routing=routing, replicas=replicas, requests=len(adapters),
        hit_rate=1 - loads / len(adapters), cold_loads_per_1000=1000 * loads / len(adapters),
        replicas_per_adapter=sum(map(len, holders.values())) / max(1, len(holders)),
        ideal_hit_rate=ideal_hit_rate(adapters, replicas * config.slots), seconds=seconds,
        loads_by_replica={r: len(v) for r, v in sorted(by_replica.items())},
        busiest_adapter_top_replica=max(busiest_served) / max(1, sum(busiest_served)))


def run_routing_bench(config: RoutingBenchConfig, progress=print) -> list[RoutingResult]:
    """Every (replicas, routing) pair on a local Ray (started here unless one is running)."""
    started = not ray.is_initialized()
    if started:
        ray.init(include_dashboard=False, object_store_memory=200 * 2**20, log_to_driver=False,
                 configure_logging=False)
    results = []
    try:
        for replicas in config.replicas:
            for routing in ROUTINGS:
                progress(f"routing bench: {routing} routing, {replicas} replicas, {config.requests} requests ...")
                result = run_one(config, routing, replicas)
                progress(f"  hit rate {result.hit_rate:.1%}, {result.cold_loads_per_1000:.0f} cold loads "
                         f"per 1,000 requests ({result.seconds:.1f} s)")
                results.append(result)
    finally:
        serve.shutdown()
        if started:
            ray.shutdown()
    return results


def markdown(config: RoutingBenchConfig, results: list[RoutingResult]) -> str:
    lines = [
        f"Routing: {config.adapters} adapters, power-law popularity (alpha {config.alpha}), "
        f"{config.slots} slots and {config.max_ongoing} requests in flight per replica, "
        f"{config.requests} requests from {config.clients} clients, "
        f"stub replicas (cold load {config.load_ms:g} ms, request {config.service_ms:g} ms).",
        "",
        "| replicas | routing | hit rate | cold loads / 1,000 requests | replicas per adapter "
        "| busiest adapter on its busiest replica | one LRU of all slots | seconds |",
        "|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    lines += [f"| {r.replicas} | {r.routing} | {r.hit_rate:.1%} | {r.cold_loads_per_1000:.0f} | "
              f"{r.replicas_per_adapter:.2f} | {r.busiest_adapter_top_replica:.0%} | {r.ideal_hit_rate:.1%} | "
              f"{r.seconds:.1f} |" for r in results]
    return "\n".join(lines) + "\n"


def write_results(config: RoutingBenchConfig, results: list[RoutingResult], out_dir: Path,
                  name: str = "cluster-routing") -> dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / f"{name}.json", "markdown": out_dir / f"{name}.md"}
    paths["json"].write_text(json.dumps({"config": asdict(config), "results": [asdict(r) for r in results]},
                                        indent=2) + "\n")
    paths["markdown"].write_text(markdown(config, results))
    return paths
