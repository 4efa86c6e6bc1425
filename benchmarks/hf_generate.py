"""Plain Hugging Face generation for the baselines: load the quantized base, run one static
batch with per-token timestamps, and serve a workload as FCFS static batches.

The three baselines (PEFT static mixed batches, PEFT naive swapping, base alone) differ
only in the model they pass and in how a batch picks its adapter, so they share this loop.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from loradock.registry.quantization import QuantizationRecipe, pin_bitsandbytes_cpu_kernel
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, GenerationConfig
from transformers.generation.streamers import BaseStreamer

from .metrics import RequestRecord
from .workload import BenchRequest

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_base(path: Path, quantize: str, dtype: str) -> torch.nn.Module:
    """The base model as the engine serves it (the same QuantizationRecipe, default double
    quantization included), on the engine's default device (CUDA when there is one)."""
    recipe = QuantizationRecipe.named(quantize, dtype)  # ValueError names an unknown quantization
    bnb = recipe.bnb_kwargs()
    model = AutoModelForCausalLM.from_pretrained(
        path, quantization_config=BitsAndBytesConfig(**bnb) if bnb is not None else None,
        dtype=DTYPES[dtype], device_map="cuda:0" if torch.cuda.is_available() else "cpu",
    )
    pin_bitsandbytes_cpu_kernel(model, recipe)  # the engine's 4-bit kernel on this CPU
    model.eval()
    return model


class StepClock(BaseStreamer):
    """Records when each decoding step's tokens come out of `generate`.

    `generate` first hands the streamer the prompt, then one [batch] tensor per step.
    """

    def __init__(self) -> None:
        self.step_times: list[float] = []
        self._saw_prompt = False

    def put(self, value: torch.Tensor) -> None:
        if self._saw_prompt:
            self.step_times.append(time.perf_counter())
        else:
            self._saw_prompt = True

    def end(self) -> None:
        pass


def left_padded(prompts: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """input_ids [batch, max_len] left-padded with `pad_id`, and the matching attention mask."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
        mask[row, width - len(prompt) :] = 1
    return ids, mask


def generate_static_batch(
    model: torch.nn.Module,
    batch: Sequence[tuple[BenchRequest, float]],
    pad_id: int,
    adapter_names: Sequence[str] | None = None,
) -> list[RequestRecord]:
    """Generate one static batch to its longest output (EOS ignored) and time every row.

    `batch` holds (request, issue time). A row's first token is the batch's first step;
    it ends at the step that produced its own last token, even though the batch runs on.
    `adapter_names` (one per row) selects PEFT's mixed-batch forward.
    """
    requests = [r for r, _ in batch]
    ids, mask = left_padded([r.prompt_token_ids for r in requests], pad_id)
    longest = max(r.max_new_tokens for r in requests)
    # eos_token_id=None: stop only at the length, as the engine does with ignore_eos.
    config = GenerationConfig(
        max_new_tokens=longest, min_new_tokens=longest, do_sample=False,
        eos_token_id=None, pad_token_id=pad_id,
    )
    clock = StepClock()
    extra = {"adapter_names": list(adapter_names)} if adapter_names is not None else {}
    try:
        with torch.inference_mode():
            model.generate(input_ids=ids.to(model.device), attention_mask=mask.to(model.device),
                           generation_config=config, streamer=clock, **extra)
    except Exception as e:  # one failed batch is reported as errors, the run goes on
        now = time.perf_counter()
        return [
            RequestRecord(r.index, r.adapter, len(r.prompt_token_ids), 0, t, None, now, error=f"{type(e).__name__}: {e}")
            for r, t in batch
        ]
    steps = clock.step_times
    return [
        RequestRecord(
            r.index, r.adapter, len(r.prompt_token_ids), r.max_new_tokens, issued, steps[0], steps[r.max_new_tokens - 1]
        )
        for r, issued in batch
    ]


BatchRunner = Callable[[Sequence[tuple[BenchRequest, float]]], list[RequestRecord]]


def serve_static_batches(
    requests: Sequence[BenchRequest],
    batch_size: int,
    clients: int,
    run_batch: BatchRunner,
    on_done: Callable[[int], None] = lambda n: None,
) -> list[RequestRecord]:
    """Serve `requests` first-come first-served in static batches of at most `batch_size`.

    Open loop (requests carry arrival times): a request is issued at its arrival and
    waits for the next batch. Closed loop: `clients` clients each issue their next
    request when their previous one finishes (at its own last token).
    """
    open_loop = bool(requests) and requests[0].arrival_s is not None
    start = time.perf_counter()
    upcoming = deque(requests)
    waiting: deque[tuple[BenchRequest, float]] = deque()
    if not open_loop:
        for _ in range(min(clients, len(upcoming))):
            waiting.append((upcoming.popleft(), start))
    records: list[RequestRecord] = []
    while waiting or upcoming:
        if open_loop:
            now = time.perf_counter() - start
            while upcoming and upcoming[0].arrival_s <= now:
                req = upcoming.popleft()
                waiting.append((req, start + req.arrival_s))
            if not waiting:
                time.sleep(max(0.0, upcoming[0].arrival_s - now))
                continue
        batch = [waiting.popleft() for _ in range(min(batch_size, len(waiting)))]
        done = run_batch(batch)
        records.extend(done)
        on_done(len(done))
        if not open_loop:
            for rec in sorted(done, key=lambda r: r.end_s):
                if upcoming:
                    waiting.append((upcoming.popleft(), rec.end_s))
    return records
