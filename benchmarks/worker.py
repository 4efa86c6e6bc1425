"""Run one system over one workload in this process and write its records as JSON.

    python -m loradock.benchmarks.worker JOB.json RESULT.json

The orchestrator starts one worker per system so each peak RSS belongs to that system
alone. Progress goes to stderr; a system that cannot start is reported in the result
(`error`), not as a crash, so the rest of the run goes on.
"""

from __future__ import annotations

import importlib
import json
import logging
import resource
import sys
import traceback
from pathlib import Path

from tqdm import tqdm

from .job import Job, JobResult

# system name -> "module:function" (imported lazily: the baselines need no engine, and back)
RUNNERS = {
    "loradock": "loradock_systems:run_engine",
    "loradock-grpc": "loradock_systems:run_grpc",
    "loradock-http": "http_system:run_http",
    "peft-static": "peft_systems:run_peft_static",
    "peft-naive": "peft_systems:run_peft_naive",
    "base-only": "peft_systems:run_base_only",
}


def peak_rss_mb(who: int = resource.RUSAGE_SELF) -> float:
    """Peak resident set size in MiB (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(who).ru_maxrss / 1024


def run_job(job: Job) -> JobResult:
    module_name, func_name = RUNNERS[job.system].split(":")
    extra: dict = {}
    bar = tqdm(total=len(job.requests), desc=job.system, unit="req", file=sys.stderr, leave=False)
    try:
        runner = getattr(importlib.import_module(f"{__package__}.{module_name}"), func_name)
        records = runner(job, bar.update, extra)
    except Exception as e:
        traceback.print_exc()
        return JobResult(job.system, [], peak_rss_mb(), extra, error=f"{type(e).__name__}: {e}")
    finally:
        bar.close()
    # A runner may report the peak of what it measures (the gRPC server's, or the in-process
    # engine's before its probes started engines of their own); then keep this whole process's.
    own = peak_rss_mb()
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():  # device memory, for systems in this process
        extra.setdefault("peak_gpu_mb", torch.cuda.max_memory_allocated() / 2**20)
    if "peak_rss_mb" in extra:
        extra["worker_peak_rss_mb"] = own
    return JobResult(job.system, records, extra.pop("peak_rss_mb", own), extra)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        print("usage: python -m loradock.benchmarks.worker JOB.json RESULT.json", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    result = run_job(Job.load(Path(args[0])))
    Path(args[1]).write_text(json.dumps(result.to_json()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
