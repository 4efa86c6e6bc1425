"""Engine steps as CUDA graphs: one replay instead of thousands of kernel launches.

On a GPU an eager step is launch-bound: about 5,000 torch ops and two Triton launches per
linear, each costing CPU time while the GPU waits (docs/architecture.md, "On CUDA: measured").
Two kinds of step are captured, each padded to a bucket and recorded once per bucket at start:

- **decode steps** (every sequence brings one token and samples): their shape is set by the
  sequences and the longest context, one graph per (batch, context) bucket (per batch bucket
  with the paged kernel, which needs no context buckets);
- **mixed steps** (prompt chunks, alone or beside decode tokens), with the paged kernel only:
  one graph per token bucket up to `MAX_MIXED_TOKENS`, whose sequence rows hold every sequence
  the scheduler can run. Larger steps run uncaptured: their launches are spread over many tokens.

Everything the forward reads keeps its address: the KV pool and the adapter slot buffers
(written in place by loads), and this module's persistent inputs, into which each step's
metadata goes with one host-to-device copy.

A captured forward must take no path that depends on the values of those inputs, so the batch
is marked `static`: LoRA layers run their static op over a run table of fixed size (the step's
runs cut into pieces of 16 tokens, `batching.run_pieces`; every slot) and always apply the
bias/DoRA rows (`lora_layer.MultiLoRALinear`). Padding rows are the base model (slot 0)
on token 0 at position 0, whose K/V go to the pool's null block; they belong to sequence rows no
step uses, so attention writes every row.

With the compiled model path (`compiled.py`) the captured forward is the compiled one, so a
replay runs inductor's fused kernels between the opaque LoRA and attention ops.

`capture=False` runs the same static forwards eagerly: that is how they are tested without a GPU
(against the eager step and PEFT). A capture that fails is logged once, and the steps of its kind
then take the ordinary eager path.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence

import torch

from . import batching
from .batch_context import (
    STATIC_RUN_PIECE,
    AttentionBatch,
    BatchContext,
    static_lora_batch,
    use_context,
)
from .batching import AttentionGroup
from .compiled import no_new_compiles
from .kv_cache import KVPool, blocks_for
from .triton_attention import PagedSeqs

log = logging.getLogger(__name__)

MIN_CONTEXT_BUCKET = 64
# Token buckets of captured mixed steps: powers of two from 16 up to 512 (or max_batch_tokens).
MIN_MIXED_TOKENS, MAX_MIXED_TOKENS = 16, 512


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


def padding_seqs(first: int, tokens: int, spare: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Padding rows first..first + tokens spread over `spare` unused sequence rows, so attention
    writes them too: (first row, rows) of each, one row apiece and the last taking the rest.

    >>> [t.tolist() for t in padding_seqs(5, 3, 4)], [t.tolist() for t in padding_seqs(5, 3, 2)]
    ([[5, 6, 7], [1, 1, 1]], [[5, 6], [1, 2]])
    """
    used = min(spare, tokens)
    if tokens and not used:
        raise ValueError("padding rows need a spare sequence row")
    lens = torch.ones(used, dtype=torch.long)
    if used:
        lens[-1] += tokens - used
    return first + torch.arange(used), lens


class StaticStep:
    """Persistent inputs, batch context and (once captured) the graph of one bucket: `rows` token
    rows, and `seqs` sequence rows for a mixed step (None: a decode step, one row per sequence).
    `meta` holds [4, rows] (each row's token, position, adapter slot and pool slot to write), the
    row whose logits each sequence keeps [seqs], the LoRA run table [runs, 3] (room for the step's
    runs in pieces: one per piece of the rows and one more per sequence), then what attention
    reads: with `paged` (the Triton kernel) each sequence's (first row, new tokens, cached tokens)
    and its block table [seqs, context / block_size]; else, decode steps only, [rows, context] (the
    pool slots of each row's context, gathered for SDPA, whose masks are made from the positions
    on the device); last, the rows of tokens still in flight and their rows in the last step's
    sampled tokens [2, seqs] (asynchronous scheduling). It is filled on the host, in one of two
    buffers by turns, and copied at once without waiting."""

    FIELDS = 4

    def __init__(self, model: Callable[..., object], pool: KVPool, device: torch.device, rows: int,
                 context: int, windows: Sequence[int] = (), paged: bool = False, lora_layers: tuple = (),
                 seqs: int | None = None) -> None:
        if seqs is not None and not paged:
            raise ValueError("a static step with prompt chunks needs the paged attention kernel")
        self.model, self.rows, self.context, self.device, self.paged = model, rows, context, device, paged
        self.seqs = rows if seqs is None else seqs
        self.runs = -(-rows // STATIC_RUN_PIECE) + self.seqs  # the most pieces the step's runs can make
        tail = self.seqs * (3 + blocks_for(context, pool.block_size)) if paged else rows * context
        size = rows * self.FIELDS + self.seqs + 3 * self.runs + tail + 2 * self.seqs
        self.meta = torch.zeros(size, dtype=torch.long, device=device)
        self.hosts = [torch.zeros(size, dtype=torch.long, pin_memory=device.type == "cuda") for _ in range(2)]
        self.fills = 0
        self.fed = 0  # tokens in flight the current inputs wait for
        self.tokens, self.positions, self.slots, self.write_index = self.meta[:self.FIELDS * rows].view(self.FIELDS, rows)
        self.keep, run_table = self._step_views(self.meta)
        lora = static_lora_batch(self.slots, run_table)
        self.masks: dict[int | None, torch.Tensor] = {}
        if paged:  # a decode step's kernel grid is one query block per sequence; a mixed one's, the bucket
            seq_rows, tables = self._paged_views(self.meta)
            attention = AttentionBatch(pool.k, pool.v, self.write_index, (), PagedSeqs(
                tables, seq_rows, 1 if seqs is None else rows, pool.block_size))
        else:
            rows_index = torch.arange(rows, device=device)
            self.kv_index = self._attention_tail(self.meta).view(rows, context)
            self.key_positions = torch.arange(context, device=device)
            # One persistent mask per sliding window (None: the whole context), rewritten before each replay.
            self.masks = {w: torch.zeros(rows, 1, 1, context, dtype=torch.bool, device=device)
                          for w in (None, *windows)}
            group = AttentionGroup(rows_index[:, None], self.kv_index, self.masks, None, rows_index)
            attention = AttentionBatch(pool.k, pool.v, self.write_index, (group,))
        self.ctx = BatchContext(lora, attention, lora_layers)
        self.logits: torch.Tensor | None = None
        self.graph: torch.cuda.CUDAGraph | None = None

    def _step_views(self, meta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(keep [seqs], run table [runs, 3]) in `meta` or its host copy."""
        at = self.FIELDS * self.rows
        return meta[at:at + self.seqs], meta[at + self.seqs:at + self.seqs + 3 * self.runs].view(self.runs, 3)

    def _attention_tail(self, meta: torch.Tensor) -> torch.Tensor:
        return meta[self.FIELDS * self.rows + self.seqs + 3 * self.runs:-2 * self.seqs]

    def _fed_views(self, meta: torch.Tensor) -> torch.Tensor:
        """[2, seqs]: rows of tokens in flight, and their rows in the last step's sampled tokens."""
        return meta[-2 * self.seqs:].view(2, self.seqs)

    def _paged_views(self, meta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(seqs [seqs, 3], tables [seqs, blocks]) in `meta` or its host copy."""
        tail = self._attention_tail(meta)
        return tail[:3 * self.seqs].view(self.seqs, 3), tail[3 * self.seqs:].view(self.seqs, -1)

    def fill(self, items: Sequence, block_size: int) -> None:
        """Write the step's items (blocks, past, tokens, slot) into the persistent inputs; rows
        past their tokens are padding (base model, token 0 at position 0, on the null block)."""
        host = self.hosts[self.fills % 2]
        self.fills += 1
        host.zero_()
        n, chunks, past = len(items), [len(it.tokens) for it in items], [it.past for it in items]
        tokens, cu_lens = batching.pack_tokens([it.tokens for it in items])
        used = len(tokens)
        fields = host[:self.FIELDS * self.rows].view(self.FIELDS, self.rows)
        positions = batching.position_ids(past, chunks)
        tables = batching.block_tables([it.blocks for it in items])  # [n, blocks]
        width = tables.shape[1]
        owner = torch.repeat_interleave(torch.arange(n), torch.tensor(chunks))  # [used] sequence of each row
        fields[0, :used], fields[1, :used] = tokens, positions
        slots = [it.slot for it in items]
        fields[2, :used] = torch.tensor(batching.token_slots(slots, chunks))
        fields[3, :used] = batching.slot_index(tables[owner], positions[:, None], block_size)[:, 0]
        keep, run_table = self._step_views(host)
        keep[:n] = torch.tensor(cu_lens[1:]) - 1
        runs = [(cu_lens[first], cu_lens[end], slot) for first, end, slot in batching.find_runs(slots)]
        pieces = batching.run_pieces(runs, STATIC_RUN_PIECE)  # padding rows need none: slot 0 adds nothing
        run_table[:len(pieces)] = torch.tensor(pieces)
        if self.paged:
            seqs, host_tables = self._paged_views(host)
            seqs[:n] = torch.tensor([cu_lens[:-1], chunks, past]).T
            starts, lens = padding_seqs(used, self.rows - used, self.seqs - n)
            seqs[n:n + len(starts), 0], seqs[n:n + len(starts), 1] = starts, lens
            host_tables[:n, :width] = tables
        else:
            kv_index = self._attention_tail(host).view(self.rows, self.context)
            keys = torch.arange(min(self.context, width * block_size))
            pool_slots = tables[:, keys // block_size] * block_size + keys % block_size  # [n, keys]
            kv_index[:n, :len(keys)] = torch.where(keys[None, :] <= positions[:n, None], pool_slots, 0)
        fed_rows, sources = batching.fed_rows(items)
        self.fed = len(fed_rows)
        if fed_rows:
            self._fed_views(host)[:, :self.fed] = torch.tensor([fed_rows, sources])
        # Not waiting: this buffer is written again two fills on, and by then the step that read
        # it has been read back (its copy precedes its sampling on the stream)
        self.meta.copy_(host, non_blocking=True)

    def feed(self, sampled: torch.Tensor | None) -> None:
        """Write the tokens in flight into the token rows, on the device, from the last step's
        `sampled` tokens (before a replay: not part of the graph)."""
        if not self.fed:
            return
        if sampled is None:
            raise ValueError(f"{self.fed} sequences wait for tokens in flight, and no sampled tokens were given")
        rows, sources = self._fed_views(self.meta)[:, :self.fed]
        self.tokens.index_copy_(0, rows, sampled.index_select(0, sources))

    def forward(self) -> torch.Tensor:
        """The static forward over the current inputs (what a capture records) -> logits [seqs, vocab]."""
        if not self.paged:
            self._write_masks()
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


class StepGraphs:
    """The static steps of one engine: decode steps by (batch, context) bucket (with `paged`
    attention, whose kernel reads block tables of a fixed width, by batch bucket alone) and, with
    `paged` attention, mixed steps by token bucket up to `max_tokens` (at most MAX_MIXED_TOKENS).
    All captured by `capture_all` when `capture`, else run as eager static forwards."""

    def __init__(self, model: torch.nn.Module, pool: KVPool, device: torch.device, max_batch: int,
                 max_context: int, capture: bool, windows: Sequence[int] = (), paged: bool = False,
                 max_tokens: int = 0) -> None:
        self.pool, self.device, self.capture, self.max_batch = pool, device, capture, max_batch
        # What the static steps run: the model, or it compiled (`use_forward`, by the runner)
        self.model_forward: Callable[..., object] = model
        self.lora_layers: tuple = ()
        self.windows, self.paged = tuple(windows), paged
        self.batch_buckets = buckets(max_batch)
        self.context_buckets = ([max_context] if paged
                                else buckets(max_context, min(MIN_CONTEXT_BUCKET, max_context)))
        top = min(max_tokens, MAX_MIXED_TOKENS, max_context)  # padding rows read the null block within a table
        self.token_buckets = buckets(top, min(MIN_MIXED_TOKENS, top)) if paged and top > 1 else []
        self.steps: dict[tuple[int, int], StaticStep] = {}  # decode steps by (batch, context)
        self.mixed: dict[int, StaticStep] = {}  # mixed steps by tokens
        self.pool_handle = torch.cuda.graph_pool_handle() if capture else None
        self.failed: str | None = None  # why capturing decode steps stopped (then they run eagerly)
        self.mixed_failed: str | None = None  # the same for mixed steps
        self.static_steps = 0  # decode steps served here
        self.mixed_steps = 0  # mixed steps served here

    def use_forward(self, forward: Callable[..., object], lora_layers: tuple) -> None:
        """Run the static steps made from now on through `forward` (the compiled model: its
        fused kernels are what a capture records), whose opaque ops find `lora_layers`."""
        self.model_forward, self.lora_layers = forward, lora_layers

    def serves(self, items: Sequence) -> bool:
        """A step that fits a bucket of its kind, keeps only sampling logits (no prompt log
        probabilities) and whose kind was not given up."""
        if not 0 < len(items) <= self.max_batch or any(it.all_logits for it in items) \
                or max(it.past + len(it.tokens) for it in items) > self.context_buckets[-1]:
            return False
        if _decode_only(items):
            return self.failed is None
        return (self.mixed_failed is None and bool(self.token_buckets)
                and sum(len(it.tokens) for it in items) <= self.token_buckets[-1])

    def _decode_step(self, rows: int, context: int) -> StaticStep:
        step = self.steps.get((rows, context))
        if step is None:
            step = self.steps[rows, context] = StaticStep(self.model_forward, self.pool, self.device, rows,
                                                          context, self.windows, self.paged, self.lora_layers)
        return step

    def _mixed_step(self, rows: int) -> StaticStep:
        step = self.mixed.get(rows)
        if step is None:  # room for every sequence, and a spare row for the padding
            step = self.mixed[rows] = StaticStep(self.model_forward, self.pool, self.device, rows,
                                                 self.context_buckets[-1], paged=True, lora_layers=self.lora_layers,
                                                 seqs=min(rows, self.max_batch + 1))
        return step

    def forward(self, items: Sequence, sampled: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [len(items), vocab] of a step `serves` took (items as ModelRunner orders them):
        each item's last token (a row of an item that samples nothing is not meant to be read).
        Tokens still in flight are read from `sampled` on the device (`batching.feed_sampled`)."""
        if _decode_only(items):
            step = self._decode_step(fits(self.batch_buckets, len(items)),
                                     fits(self.context_buckets, max(it.past for it in items) + 1))
            self.static_steps += 1
        else:
            step = self._mixed_step(fits(self.token_buckets, sum(len(it.tokens) for it in items)))
            self.mixed_steps += 1
        step.fill(items, self.pool.block_size)
        step.feed(sampled)
        return step.run()[:len(items)]

    @torch.inference_mode()
    def capture_all(self, null_item) -> None:
        """Capture every bucket, largest first (the graphs share one memory pool, which the
        largest sizes): mixed steps, then decode steps, with padding-only inputs (`null_item` is a
        decode item on the null block). A capture that fails is logged and gives up its kind."""
        if not self.capture:
            return
        started = time.perf_counter()
        self.mixed_failed = self._capture([self._mixed_step(rows) for rows in reversed(self.token_buckets)],
                                          null_item, "mixed steps")
        self.failed = self._capture([self._decode_step(rows, context) for context in reversed(self.context_buckets)
                                     for rows in reversed(self.batch_buckets)], null_item, "decode steps")
        log.info("captured CUDA graphs in %.1f s: %d of decode steps (batch up to %d, context up to %d), "
                 "%d of mixed steps (up to %d tokens)", time.perf_counter() - started, len(self.steps),
                 self.batch_buckets[-1], self.context_buckets[-1], len(self.mixed),
                 self.token_buckets[-1] if self.token_buckets else 0)

    def _capture(self, steps: Sequence[StaticStep], null_item, kind: str) -> str | None:
        """Capture `steps` in order -> why one failed (then none of them is replayed), or None."""
        for step in steps:
            step.fill([null_item], self.pool.block_size)
            try:
                step.capture(self.pool_handle)
            except Exception as e:  # an op that cannot be captured: serve eagerly
                why = f"{type(e).__name__}: {e}"
                log.warning("CUDA graph capture failed (%d rows); %s run eagerly: %s", step.rows, kind, why)
                return why
        return None


def _decode_only(items: Sequence) -> bool:
    return all(len(it.tokens) == 1 and it.wants_logits for it in items)
