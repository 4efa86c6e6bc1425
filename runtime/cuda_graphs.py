"""Decode steps as CUDA graphs: one replay instead of thousands of kernel launches.

On a GPU the eager decode step is launch-bound: about 5,000 torch ops and two Triton launches
per linear, each costing CPU time while the GPU waits (docs/architecture.md, "On CUDA:
measured"). A decode-only step (every sequence brings one token and samples) has a shape set
by two numbers, the sequences and the longest context; padded to a bucket of each, its forward
is captured once per bucket pair and replayed. Everything the forward reads keeps its address:
the KV pool and the adapter slot buffers (written in place by loads), and this module's
persistent inputs, into which each step's metadata goes with one host-to-device copy.

A captured forward must take no path that depends on the values of those inputs, so the
batch is marked `static`: LoRA layers run their static op over every slot at full rank and
always apply the bias/DoRA rows (`lora_layer.MultiLoRALinear`). Padding rows are the base model
(slot 0) on token 0 at position 0; their K/V go to the pool's null block, which every real
query reads only masked.

With the compiled model path (`compiled.py`) the captured forward is the compiled one, so a
replay runs inductor's fused kernels between the opaque LoRA and attention ops.

`capture=False` runs the same static forward eagerly: that is how it is tested without a GPU
(against the eager step and PEFT). A capture that fails is logged once, and decode steps then
take the ordinary eager path.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence

import torch

from .batch_context import AttentionBatch, BatchContext, static_lora_batch, use_context
from .batching import AttentionGroup
from .compiled import no_new_compiles
from .kv_cache import KVPool, blocks_for
from .triton_attention import PagedSeqs

log = logging.getLogger(__name__)

MIN_CONTEXT_BUCKET = 64


def buckets(largest: int, smallest: int = 1) -> list[int]:
    """Powers of two from `smallest` up to and including `largest` (itself, if no power of two).

    >>> buckets(24), buckets(2048, 64)
    ([1, 2, 4, 8, 16, 24], [64, 128, 256, 512, 1024, 2048])
    """
    out, b = [], smallest
    while b < largest:
        out.append(b)
        b *= 2
    return [*out, largest]


def fits(bucket_list: Sequence[int], n: int) -> int:
    """The smallest bucket holding n."""
    return next(b for b in bucket_list if b >= n)


class StaticDecodeStep:
    """Persistent inputs, batch context and (once captured) the graph of one (batch, context)
    bucket. `meta` holds [4, rows] (each row's token, position, adapter slot and pool slot to
    write) then what attention reads: with `paged` (the Triton kernel) each row's (row, 1, cached
    tokens) and its block table [rows, context / block_size], else [rows, context] (the pool
    slots of its context, gathered for SDPA, whose masks are made from the positions on the
    device). It is filled on the host and copied at once."""

    FIELDS = 4

    def __init__(self, model: Callable[..., object], pool: KVPool, device: torch.device, rows: int,
                 context: int, windows: Sequence[int] = (), paged: bool = False, lora_layers: tuple = ()) -> None:
        self.model, self.rows, self.context, self.device, self.paged = model, rows, context, device, paged
        tail = rows * (3 + blocks_for(context, pool.block_size)) if paged else rows * context
        size = rows * self.FIELDS + tail
        self.meta = torch.zeros(size, dtype=torch.long, device=device)
        self.host = torch.zeros(size, dtype=torch.long, pin_memory=device.type == "cuda")
        self.tokens, self.positions, self.slots, self.write_index = self.meta[:self.FIELDS * rows].view(self.FIELDS, rows)
        rows_index = torch.arange(rows, device=device)
        lora = static_lora_batch(self.slots)
        self.run_table = lora.run_table
        if paged:
            seqs, tables = self._paged_views(self.meta)
            attention = AttentionBatch(pool.k, pool.v, self.write_index, (),
                                       PagedSeqs(tables, seqs, 1, pool.block_size))
            self.masks: dict[int | None, torch.Tensor] = {}
        else:
            self.kv_index = self.meta[self.FIELDS * rows:].view(rows, context)
            self.key_positions = torch.arange(context, device=device)
            # One persistent mask per sliding window (None: the whole context), rewritten before each replay.
            self.masks = {w: torch.zeros(rows, 1, 1, context, dtype=torch.bool, device=device)
                          for w in (None, *windows)}
            group = AttentionGroup(rows_index[:, None], self.kv_index, self.masks, None, rows_index)
            attention = AttentionBatch(pool.k, pool.v, self.write_index, (group,))
        self.ctx = BatchContext(lora, attention, lora_layers)
        self.keep = rows_index
        self.logits: torch.Tensor | None = None
        self.graph: torch.cuda.CUDAGraph | None = None

    def _paged_views(self, meta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(seqs [rows, 3], tables [rows, blocks]) in `meta` or its host copy."""
        tail = meta[self.FIELDS * self.rows:]
        return tail[:3 * self.rows].view(self.rows, 3), tail[3 * self.rows:].view(self.rows, -1)

    def fill(self, items: Sequence, block_size: int) -> None:
        """Write the step's decode items (blocks, past, tokens, slot) into the persistent inputs;
        rows past len(items) are padding (base model, token 0 at position 0, on the null block)."""
        self.host.zero_()
        fields = self.host[:self.FIELDS * self.rows].view(self.FIELDS, self.rows)
        n = len(items)
        fields[:3, :n] = torch.tensor([[it.tokens[0] for it in items], [it.past for it in items],
                                       [it.slot for it in items]])
        past = fields[1, :n]
        width = max(len(it.blocks) for it in items)
        tables = torch.tensor([[*it.blocks, *[0] * (width - len(it.blocks))] for it in items])  # [n, blocks]
        fields[3, :n] = tables.gather(1, past[:, None] // block_size)[:, 0] * block_size + past % block_size
        if self.paged:
            seqs, host_tables = self._paged_views(self.host)
            seqs[:, 0] = torch.arange(self.rows)
            seqs[:, 1] = 1
            seqs[:n, 2] = past
            host_tables[:n, :width] = tables
        else:
            kv_index = self.host[self.FIELDS * self.rows:].view(self.rows, self.context)
            keys = torch.arange(min(self.context, width * block_size))
            pool_slots = tables[:, keys // block_size] * block_size + keys % block_size  # [n, keys]
            kv_index[:n, :len(keys)] = torch.where(keys[None, :] <= past[:, None], pool_slots, 0)
        self.meta.copy_(self.host)  # blocking: the host buffer is rewritten by the next fill

    def forward(self) -> torch.Tensor:
        """The static forward over the current inputs (what a capture records) -> logits [rows, vocab]."""
        if not self.paged:
            self._write_masks()
        self.run_table[:, 2].copy_(self.slots)
        with use_context(self.ctx), no_new_compiles():
            out = self.model(input_ids=self.tokens[None], position_ids=self.positions[None],
                             use_cache=False, logits_to_keep=self.keep)
        return out.logits[0]

    def _write_masks(self) -> None:
        causal = self.masks[None].view(self.rows, -1)
        torch.le(self.key_positions[None, :], self.positions[:, None], out=causal)
        for window, mask in self.masks.items():
            if window is not None:  # the last `window` keys: position > query position - window
                torch.logical_and(causal, self.key_positions[None, :] > (self.positions - window)[:, None],
                                  out=mask.view(self.rows, -1))

    @torch.inference_mode()
    def capture(self, pool_handle) -> None:
        """Record `forward` as a CUDA graph (after warm-up runs on a side stream, which also
        compile the Triton kernels and make cuBLAS's workspaces)."""
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for _ in range(2):
                self.forward()
        torch.cuda.current_stream(self.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool_handle):
            self.logits = self.forward()
        self.graph = graph

    def run(self) -> torch.Tensor:
        if self.graph is None:
            return self.forward()
        self.graph.replay()
        return self.logits


class DecodeGraphs:
    """The static decode steps of one engine, by (batch, context) bucket: all captured by
    `capture_all` when `capture`, else run as eager static forwards. With `paged` attention (the
    Triton kernel reads block tables of a fixed width) the context needs no buckets: one per batch
    bucket."""

    def __init__(self, model: torch.nn.Module, pool: KVPool, device: torch.device, max_batch: int,
                 max_context: int, capture: bool, windows: Sequence[int] = (), paged: bool = False) -> None:
        self.pool, self.device, self.capture = pool, device, capture
        # What the static steps run: the model, or it compiled (`use_forward`, by the runner)
        self.model_forward: Callable[..., object] = model
        self.lora_layers: tuple = ()
        self.windows, self.paged = tuple(windows), paged
        self.batch_buckets = buckets(max_batch)
        self.context_buckets = ([max_context] if paged
                                else buckets(max_context, min(MIN_CONTEXT_BUCKET, max_context)))
        self.steps: dict[tuple[int, int], StaticDecodeStep] = {}
        self.pool_handle = torch.cuda.graph_pool_handle() if capture else None
        self.failed: str | None = None  # why capturing stopped (then every step runs eagerly)
        self.static_steps = 0  # decode steps served here

    def use_forward(self, forward: Callable[..., object], lora_layers: tuple) -> None:
        """Run the static steps made from now on through `forward` (the compiled model: its
        fused kernels are what a capture records), whose opaque ops find `lora_layers`."""
        self.model_forward, self.lora_layers = forward, lora_layers

    def serves(self, items: Sequence) -> bool:
        """A decode-only step that fits the largest buckets."""
        return (self.failed is None and 0 < len(items) <= self.batch_buckets[-1]
                and all(len(it.tokens) == 1 and it.wants_logits for it in items)
                and max(it.past for it in items) < self.context_buckets[-1])

    def _step(self, rows: int, context: int) -> StaticDecodeStep:
        key = (rows, context)
        step = self.steps.get(key)
        if step is None:
            step = self.steps[key] = StaticDecodeStep(self.model_forward, self.pool, self.device, rows, context,
                                                      self.windows, self.paged, self.lora_layers)
        return step

    def forward(self, items: Sequence) -> torch.Tensor:
        """Logits [len(items), vocab] of a decode-only step (items as ModelRunner orders them)."""
        n = len(items)
        step = self._step(fits(self.batch_buckets, n),
                          fits(self.context_buckets, max(it.past for it in items) + 1))
        step.fill(items, self.pool.block_size)
        self.static_steps += 1
        return step.run()[:n]

    @torch.inference_mode()
    def capture_all(self, null_item) -> None:
        """Capture every bucket pair, largest first (the graphs share one memory pool, which the
        largest sizes), with padding-only inputs; `null_item` is a decode item on the null block.
        A capture that fails sets `failed` (logged) and `serves` refuses every step from then on."""
        if not self.capture:
            return
        started = time.perf_counter()
        for context in reversed(self.context_buckets):
            for rows in reversed(self.batch_buckets):
                step = self._step(rows, context)
                step.fill([null_item], self.pool.block_size)
                try:
                    step.capture(self.pool_handle)
                except Exception as e:  # an op that cannot be captured: serve eagerly
                    self.failed = f"{type(e).__name__}: {e}"
                    log.warning("CUDA graph capture failed (batch %d, context %d); decode steps run "
                                "eagerly: %s", rows, context, self.failed)
                    return
        log.info("captured %d CUDA graphs of decode steps (batch up to %d, context up to %d) in %.1f s",
                 len(self.steps), self.batch_buckets[-1], self.context_buckets[-1],
                 time.perf_counter() - started)
