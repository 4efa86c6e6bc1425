"""Orchestrate one benchmark run: prepare the base and adapters, run every system in its own
worker process over the same workload, and gather the figures the report is made of."""

from __future__ import annotations

import json
import logging
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from loradock.registry import AdapterVersion, BaseInfo, NotFoundError, Registry

from loradock.bases import DEFAULT_BASE_NAME, import_base

from .adapters import publish_random_adapters
from .job import Job, JobResult
from .limit import machine_limit
from .metrics import ratio, summarize
from .registry_ops import bench_registry_ops
from .synthetic_base import SYNTHETIC_1B, make_synthetic_base
from .workload import (
    ATTN_TARGETS,
    MLP_TARGETS,
    AdapterSpec,
    WorkloadSpec,
    adapter_specs,
    make_workload,
)

log = logging.getLogger(__name__)

SYSTEMS = ("loradock", "loradock-grpc", "loradock-http", "peft-static", "peft-naive", "base-only")
# Systems whose figures do not depend on the number of adapters: measured once per run.
ADAPTER_FREE = ("base-only",)
# Cold loads and alias moves use the heaviest adapter kind of the workload.
COLD_RANK, COLD_TARGETS = 16, ATTN_TARGETS + MLP_TARGETS


@dataclass
class BenchConfig:
    """Everything one run depends on (recorded in the results, so a run describes itself)."""

    name: str = "latest"
    base: str = DEFAULT_BASE_NAME
    adapters: list[int] = field(default_factory=lambda: [32])
    requests: int = 64
    clients: int = 32
    rate: float | None = None
    max_running: int = 32
    seed: int = 0
    prompt_len: tuple[int, int] = (16, 128)
    output_len: tuple[int, int] = (16, 64)
    quantize: str = "nf4"
    dtype: str = "float32"
    systems: tuple[str, ...] = SYSTEMS
    cold_samples: int = 5
    registry_versions: int = 10_000
    registry_names: int = 100
    step_rounds: int = 3  # alternated adapter/base rounds of the decode-step probe
    threads: int = 1  # torch threads per system (see thread_env)
    headline_adapters: int = 32  # the N the flat summary and the targets refer to

    def __post_init__(self) -> None:
        unknown = sorted(set(self.systems) - set(SYSTEMS))
        if unknown:
            raise ValueError(f"unknown systems {unknown}; choose from {', '.join(SYSTEMS)}")
        if not self.adapters or min(self.adapters) < 1:
            raise ValueError("--adapters needs one or more counts >= 1")
        for label in ("requests", "clients", "max_running", "cold_samples", "threads", "step_rounds"):
            if getattr(self, label) < (0 if label == "cold_samples" else 1):
                raise ValueError(f"{label} must be positive, got {getattr(self, label)}")
        if self.registry_versions < 0:
            raise ValueError("registry_versions must be >= 0 (0 skips the registry timing)")

    @property
    def headline(self) -> int:
        return self.headline_adapters if self.headline_adapters in self.adapters else max(self.adapters)


def ensure_base(user: Registry, bench: Registry, name: str) -> BaseInfo:
    """The base inside the benchmark registry: copied from the user's registry when it is
    there, else imported (the default SmolLM2 is converted from the packaged GGUF)."""
    if bench.has_base(name):
        return bench.base(name)
    if user.has_base(name):
        info, _ = import_base(bench, user.base(name).path, name=name)
        return info
    if name == SYNTHETIC_1B:
        return make_synthetic_base(bench, ensure_base(user, bench, DEFAULT_BASE_NAME))
    if name != DEFAULT_BASE_NAME:
        raise NotFoundError(f"base {name!r} is in neither {user.root} nor {bench.root}; "
                            "add it with `loradock bases add SOURCE --name NAME`")
    log.info("importing the default base %s (about 30 s, once)", name)
    info, _ = import_base(bench)
    return info


@dataclass
class Prepared:
    """The adapters a run uses, published once and shared by every N."""

    workload: list[AdapterVersion]
    cold: list[AdapterVersion]
    alias: AdapterVersion


def prepare_adapters(bench: Registry, base: BaseInfo, config: BenchConfig) -> Prepared:
    # Named under the base (`<base>/bench-0000`): the benchmark registry keeps adapters between
    # runs, and a run on another base must not pick up adapters made for this one.
    prefix = f"{base.name}/bench"
    cold = [AdapterSpec(f"{prefix}-cold-{i:02d}", COLD_RANK, COLD_TARGETS) for i in range(config.cold_samples)]
    alias = AdapterSpec(f"{prefix}-alias", COLD_RANK, COLD_TARGETS)
    return Prepared(
        workload=publish_random_adapters(bench, base, adapter_specs(max(config.adapters), prefix), config.seed),
        cold=publish_random_adapters(bench, base, cold, config.seed + 1),
        alias=publish_random_adapters(bench, base, [alias], config.seed + 2, versions=2)[0],
    )


def vocab_size(base: BaseInfo) -> int:
    return int(json.loads((base.path / "config.json").read_text())["vocab_size"])


def thread_env(threads: int) -> dict[str, str]:
    """Pin the math libraries' thread count for a worker and any server it starts.

    Every system gets the same count. More threads than free cores is far worse than
    fewer: OpenMP threads spin waiting for each other (measured here on a busy 2-core
    machine, SmolLM2 NF4 decoding was 4.5x slower with 2 threads than with 1).
    """
    return {name: str(threads) for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}


def run_worker(job: Job, scratch: Path, threads: int) -> JobResult:
    """Run `job` in a fresh Python process (its own peak RSS) and read its result."""
    job_path, out_path = scratch / f"{job.system}.job.json", scratch / f"{job.system}.result.json"
    job.save(job_path)
    proc = subprocess.run([sys.executable, "-m", "loradock.benchmarks.worker", str(job_path), str(out_path)],
                          env={**os.environ, "LORADOCK_HOME": job.home, **thread_env(threads)})
    if proc.returncode != 0 or not out_path.exists():
        return JobResult(job.system, [], 0.0, error=f"worker exited with code {proc.returncode}")
    return JobResult.from_json(json.loads(out_path.read_text()))


def system_figures(result: JobResult) -> dict:
    """A system's summary, with CPU seconds of its workload and tokens per CPU-second."""
    summary = summarize(result.system, result.records, result.peak_rss_mb).to_json()
    summary["cpu_s"] = result.extra.get("workload_cpu_s", float("nan"))
    summary["tokens_per_cpu_s"] = ratio(summary["output_tokens"], summary["cpu_s"])
    if result.error:
        summary["errors"] = max(summary["errors"], 1)
    summary["failure"] = result.error
    summary["peak_gpu_mb"] = result.extra.get("peak_gpu_mb")
    return summary


class Runner:
    """Runs the systems of one benchmark for each number of adapters, sharing what can be shared."""

    def __init__(self, config: BenchConfig, bench: Registry, base: BaseInfo, prepared: Prepared,
                 scratch: Path) -> None:
        self.config, self.bench, self.base, self.scratch = config, bench, base, scratch
        self.refs = [v.ref for v in prepared.workload]
        self.cold = [v.ref for v in prepared.cold]
        self.alias = f"{prepared.alias.name}@1"
        # The limit's batch: what loradock can actually run at once in a closed loop of C clients.
        self.limit_batch = config.max_running if config.rate else min(config.max_running, config.clients)
        self.shared: dict[str, dict] = {}  # figures of ADAPTER_FREE systems, measured at the first N
        self._limit: dict | None = None

    def job(self, system: str, n: int, requests: list) -> Job:
        """A job whose adapter list is the first n workload adapters, then the probe adapters."""
        c = self.config
        headline = n == c.headline
        probes = {
            "cold_adapters": list(range(n, n + len(self.cold))) if headline else [],
            "step_adapters": [i % n for i in range(c.max_running)],  # distinct while n >= max_running
            "step_rounds": c.step_rounds,
            "step_ops_sizes": [1, 8, 32] if headline else [],
            "kv_concurrency": headline,
            "prefix_cache": headline,
            "alias_adapter": n + len(self.cold) if headline else None,
        }
        return Job(system=system, home=str(self.bench.root), base=self.base.name,
                   base_path=str(self.base.path), adapter_refs=self.refs[:n] + self.cold + [self.alias],
                   requests=requests, max_running=c.max_running, clients=c.clients, quantize=c.quantize,
                   dtype=c.dtype, max_slots=c.max_running, probes=probes)

    def run_n(self, n: int) -> dict:
        """Every system over the workload with n adapters."""
        c = self.config
        requests = make_workload(WorkloadSpec(
            n_adapters=n, n_requests=c.requests, seed=c.seed, prompt_len=c.prompt_len,
            output_len=c.output_len, rate=c.rate, vocab_size=vocab_size(self.base)))
        systems, extras = {}, {}
        for i, system in enumerate(c.systems, 1):
            if system in self.shared:
                systems[system] = self.shared[system]
                continue
            print(f"[{n} adapters] {i}/{len(c.systems)} {system}: {len(requests)} requests", file=sys.stderr)
            result = run_worker(self.job(system, n, requests), self.scratch, c.threads)
            systems[system], extras[system] = system_figures(result), result.extra
            if system in ADAPTER_FREE:
                self.shared[system] = systems[system]
        return assemble_run(n, systems, extras.get("loradock", {}), self.limit())

    def limit(self) -> dict:
        """The limit (limit.py), measured once per run in this process with the systems' thread count."""
        if self._limit is None:
            print(f"measuring the machine limit: the base's linear layers as bare float32 and "
                  f"bfloat16 matmuls at batch {self.limit_batch}", file=sys.stderr)
            self._limit = machine_limit(self.base.path, self.limit_batch, self.config.threads)
        return self._limit


def run_benchmark(config: BenchConfig, user: Registry, bench: Registry) -> dict:
    """One full run; returns the results document (see report.py for how it is shown)."""
    started = time.time()
    bench.root.mkdir(parents=True, exist_ok=True)
    base = ensure_base(user, bench, config.base)
    print(f"benchmark {config.name!r}: base {base.name}, adapters {config.adapters}, "
          f"systems {', '.join(config.systems)}", file=sys.stderr)
    prepared = prepare_adapters(bench, base, config)
    with tempfile.TemporaryDirectory(prefix=".bench-", dir=bench.root) as tmp:
        runner = Runner(config, bench, base, prepared, Path(tmp))
        runs = [runner.run_n(n) for n in config.adapters]
    ops = None
    if config.registry_versions:
        print(f"registry operations at {config.registry_versions} versions", file=sys.stderr)
        ops = bench_registry_ops(bench.root, base, config.registry_versions, config.registry_names,
                                 seed=config.seed)
    return {
        "name": config.name,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        "duration_s": time.time() - started,
        "config": asdict(config),
        "machine": machine_info(),
        "base": {"name": base.name, "fingerprint": base.fingerprint, "parameters": base.num_parameters},
        "limit": runner.limit(),
        "runs": runs,
        "registry_ops": ops,
    }


def assemble_run(n: int, systems: dict, engine_extra: dict, limit: dict) -> dict:
    """One N's figures: per system, the ratios between systems, the fraction of the limit."""
    nan = float("nan")
    tps = {name: s["tokens_per_s"] for name, s in systems.items()}
    per_cpu = {name: s.get("tokens_per_cpu_s", nan) for name, s in systems.items()}

    def vs(figures: dict, a: str, b: str) -> float:
        return ratio(figures.get(a, nan), figures.get(b, nan))

    return {
        "n_adapters": n,
        "systems": systems,
        "ratios": {
            "loradock_vs_peft_static": vs(tps, "loradock", "peft-static"),
            "loradock_vs_peft_naive": vs(tps, "loradock", "peft-naive"),
            "grpc_vs_in_process": vs(tps, "loradock-grpc", "loradock"),
            "http_vs_grpc": vs(tps, "loradock-http", "loradock-grpc"),
            "peft_static_vs_base_only": vs(tps, "peft-static", "base-only"),
            "loradock_vs_base_only": vs(tps, "loradock", "base-only"),
            # the same comparisons in tokens per CPU-second: robust to other load on the machine
            "loradock_vs_peft_static_per_cpu": vs(per_cpu, "loradock", "peft-static"),
            "loradock_vs_peft_naive_per_cpu": vs(per_cpu, "loradock", "peft-naive"),
        },
        "fraction_of_limit": {name: ratio(v, limit.get("tokens_per_s", nan)) for name, v in tps.items()},
        "probes": engine_extra,
    }


def machine_info() -> dict:
    import torch

    return {
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }


def quick_config(**overrides) -> BenchConfig:
    """Small counts for a CI-level smoke run (under 3 minutes on 2 CPU cores)."""
    settings = dict(name="quick", adapters=[8], requests=8, clients=8, max_running=8,
                    prompt_len=(16, 48), output_len=(8, 16), cold_samples=2,
                    registry_versions=100, registry_names=10, headline_adapters=8, step_rounds=1)
    settings.update(overrides)
    return BenchConfig(**settings)
