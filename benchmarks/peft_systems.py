"""The Hugging Face baselines, each run by a worker process on the same quantized base:

- `peft-static`: PeftModel holding every adapter the workload uses; FCFS static
  batches of loradock's running limit, mixed adapters via `generate(adapter_names=...)`.
- `peft-naive`: the same PeftModel, one request at a time, `set_adapter` before each.
- `base-only`: the plain base at the same static batch size, no adapters (LoRA overhead).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from loradock.registry import Registry
from peft import PeftModel

from .cputime import CpuMeter
from .hf_generate import BatchRunner, generate_static_batch, load_base, serve_static_batches
from .job import Job
from .metrics import RequestRecord
from .workload import BenchRequest, without_adapters

BASE_ROW = "__base__"  # PEFT's name for "no adapter" in a mixed batch

Progress = Callable[[int], None]


def adapter_label(index: int | None) -> str:
    return BASE_ROW if index is None else f"a{index}"


def load_peft(job: Job) -> PeftModel:
    """The quantized base with every adapter the workload uses, each loaded from its registry version."""
    registry = Registry(job.home)
    used = sorted({r.adapter for r in job.requests if r.adapter is not None})
    if not used:
        raise ValueError("the PEFT baselines need a workload with adapters")
    base = load_base(job.base_path, job.quantize, job.dtype)
    paths = {i: registry.resolve(job.adapter_refs[i]).path for i in used}
    model = PeftModel.from_pretrained(base, paths[used[0]], adapter_name=adapter_label(used[0]))
    for i in used[1:]:
        model.load_adapter(paths[i], adapter_name=adapter_label(i))
    model.eval()
    return model


def pad_id_of(model: torch.nn.Module) -> int:
    config = model.config
    for candidate in (config.pad_token_id, config.eos_token_id, 0):
        if isinstance(candidate, list):
            candidate = candidate[0] if candidate else None
        if candidate is not None:
            return int(candidate)
    return 0


def warm_up(run_batch: BatchRunner, request: BenchRequest) -> None:
    """One short generation through the system's own path, so first-call costs
    (allocations, lazy init) stay out of the timings."""
    run_batch([(BenchRequest(-1, request.adapter, request.prompt_token_ids[:16], 2), 0.0)])


def metered(extra: dict, work: Callable[[], list[RequestRecord]]) -> list[RequestRecord]:
    """Run the workload, recording its CPU seconds in `extra["workload_cpu_s"]`."""
    with CpuMeter() as cpu:
        records = work()
    extra["workload_cpu_s"] = cpu.seconds
    return records


def run_peft_static(job: Job, progress: Progress, extra: dict) -> list[RequestRecord]:
    """FCFS static batches of `max_running`, each one mixed-adapter `generate(adapter_names=...)`."""
    model = load_peft(job)
    pad = pad_id_of(model)

    def run_batch(batch):
        return generate_static_batch(model, batch, pad, [adapter_label(r.adapter) for r, _ in batch])

    warm_up(run_batch, job.requests[0])
    return metered(extra, lambda: serve_static_batches(job.requests, job.max_running, job.clients,
                                                       run_batch, progress))


def run_peft_naive(job: Job, progress: Progress, extra: dict) -> list[RequestRecord]:
    """One request at a time; `set_adapter` switches the active adapter before each."""
    model = load_peft(job)
    pad = pad_id_of(model)

    def run_one(batch):
        (request, _), = batch
        if request.adapter is None:
            with model.disable_adapter():
                return generate_static_batch(model, batch, pad)
        model.set_adapter(adapter_label(request.adapter))
        return generate_static_batch(model, batch, pad)

    warm_up(run_one, job.requests[0])
    return metered(extra, lambda: serve_static_batches(job.requests, 1, job.clients, run_one, progress))


def run_base_only(job: Job, progress: Progress, extra: dict) -> list[RequestRecord]:
    """The same requests without adapters, static batches of `max_running` on the bare base."""
    model = load_base(job.base_path, job.quantize, job.dtype)
    pad = pad_id_of(model)
    requests = without_adapters(job.requests)

    def run_batch(batch):
        return generate_static_batch(model, batch, pad)

    warm_up(run_batch, requests[0])
    return metered(extra, lambda: serve_static_batches(requests, job.max_running, job.clients,
                                                       run_batch, progress))
