"""Registry operations timed at scale: publish, list and resolve with many versions.

A scratch registry (deleted afterwards) receives `n_versions` publishes of one tiny
real PEFT adapter (rank 1 on a single projection, so the figures are the registry's
own cost: validation, hashing, fsync, locking, renames), spread over `n_names` names.
"""

from __future__ import annotations

import random
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from loradock.registry import BaseInfo, Registry
from peft import LoraConfig
from tqdm import tqdm

from .adapters import lora_layout, random_lora_tensors, write_adapter
from .metrics import percentile


def tiny_adapter(base: BaseInfo, out_dir: Path) -> Path:
    """A rank-1 LoRA on layer 0's q_proj only: valid for the base, a few KB on disk."""
    config = LoraConfig(r=1, lora_alpha=2, target_modules=r"model\.layers\.0\.self_attn\.q_proj",
                        lora_dropout=0.0, task_type="CAUSAL_LM", base_model_name_or_path=base.name)
    return write_adapter(out_dir, config, random_lora_tensors(lora_layout(base.path, config), seed=0))


def timed_ms(fn: Callable[[], object], repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t0) * 1e3)
    return out


def bench_registry_ops(scratch_parent: Path, base: BaseInfo, n_versions: int,
                       n_names: int = 100, samples: int = 200, seed: int = 0) -> dict:
    """Publish `n_versions` versions over `n_names` names into a scratch registry sharing
    `base`, then time list / resolve at that size. Returns milliseconds."""
    n_names = max(1, min(n_names, n_versions))
    root = Path(tempfile.mkdtemp(prefix="registry-ops-", dir=scratch_parent))
    try:
        registry = Registry(root)
        (root / "bases").mkdir()
        (root / "bases" / base.name).symlink_to(base.path, target_is_directory=True)
        src = tiny_adapter(base, root / "src")
        names = [f"ops-{i:04d}" for i in range(n_names)]
        publish_ms = []
        for i in tqdm(range(n_versions), desc="registry publish", unit="version", leave=False):
            t0 = time.perf_counter()
            registry.publish(src, names[i % n_names], base=base.name)
            publish_ms.append((time.perf_counter() - t0) * 1e3)
        registry.tag(f"{names[0]}@1", "prod")
        rng = random.Random(seed)
        per_name = n_versions // n_names
        picks = [(rng.choice(names), rng.randint(1, per_name)) for _ in range(samples)]
        resolve_latest = [timed_ms(lambda n=n: registry.resolve(n), 1)[0] for n, _ in picks]
        resolve_exact = [timed_ms(lambda n=n, v=v: registry.resolve(f"{n}@{v}"), 1)[0] for n, v in picks]
        resolve_alias = timed_ms(lambda: registry.resolve(f"{names[0]}@prod"), samples)
        listed = len(registry.list())
        list_ms = timed_ms(registry.list, 3)
        versions_ms = timed_ms(lambda: registry.versions(names[0]), 3)
        last = publish_ms[-max(1, len(publish_ms) // 10):]  # the last 10%: publishing into a full registry
        return {
            "versions": n_versions,
            "names": n_names,
            "listed_names": listed,
            "publish_p50_ms": percentile(publish_ms, 50),
            "publish_p99_ms": percentile(publish_ms, 99),
            "publish_last10pct_p50_ms": percentile(last, 50),
            "publish_total_s": sum(publish_ms) / 1e3,
            "list_ms": statistics.median(list_ms),
            "versions_of_one_name_ms": statistics.median(versions_ms),
            "resolve_latest_p50_ms": percentile(resolve_latest, 50),
            "resolve_latest_p99_ms": percentile(resolve_latest, 99),
            "resolve_version_p50_ms": percentile(resolve_exact, 50),
            "resolve_alias_p50_ms": percentile(resolve_alias, 50),
        }
    finally:
        shutil.rmtree(root, ignore_errors=True)
