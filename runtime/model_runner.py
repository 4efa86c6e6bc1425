"""One forward pass over a packed ragged batch: every scheduled sequence's new tokens in one row."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from . import batching
from .batch_context import AttentionBatch, BatchContext, LoRABatch, use_context
from .compiled import STEP_SHAPES, compile_model, no_new_compiles, one_graph_for_every_size
from .cuda_graphs import StepGraphs
from .kv_cache import KVPool
from .lora_layer import iter_wrapped
from .triton_attention import paged_seqs


@dataclass(frozen=True)
class StepItem:
    """One sequence's part of a step."""

    blocks: Sequence[int]  # its block table, already holding past + len(tokens) tokens
    past: int  # tokens already in the KV cache
    tokens: Sequence[int]  # new tokens: a prompt chunk, a recompute chunk or the last sampled token
    slot: int  # adapter slot, 0 = base model
    wants_logits: bool  # the chunk ends the known tokens, so the next token is sampled
    all_logits: bool = False  # every token's logits (the prompt's log probabilities are wanted)
    # its one token (PENDING) is still on the device: row `fed_from` of the last step's sampled tokens
    fed_from: int | None = None


@dataclass(frozen=True)
class StepLogits:
    """The step's next-token logits: one row per item that wanted them."""

    logits: torch.Tensor  # [n_rows, vocab] float32
    rows: list[int | None]  # item index -> its sampling row in `logits`, None for mid-prefill items
    # item index -> row of its first token when every token's logits were kept (all_logits)
    first_rows: list[int | None] | None = None

    def row(self, item: int) -> torch.Tensor | None:
        r = self.rows[item]
        return None if r is None else self.logits[r]


def lora_batch(slot_list: Sequence[int], device: torch.device) -> LoRABatch:
    """The LoRA layers' view of a step from its token -> slot map [T]."""
    runs = batching.find_runs(slot_list)
    return LoRABatch(
        token_slots=torch.tensor(list(slot_list), dtype=torch.long, device=device),
        runs=tuple(runs),
        run_table=torch.tensor([(start, end - start, slot) for start, end, slot in runs] or [(0, 0, 0)],
                               dtype=torch.int32, device=device),
        longest_run=max((end - start for start, end, _ in runs), default=0),
        slots_present=tuple(sorted({s for s in slot_list if s != 0})),
        groups=batching.slot_groups(slot_list, runs, device),
    )


def attention_batch(pool: KVPool, items: Sequence[StepItem], cu_lens: Sequence[int],
                    device: torch.device, windows: Sequence[int] = (), paged: bool = False) -> AttentionBatch:
    """The attention function's view of a step: pool slots to write, and either the block tables
    the paged kernel reads (`paged`) or one group per SDPA call, with a mask per sliding window
    in `windows`."""
    bs = pool.block_size
    tables = batching.block_tables([it.blocks for it in items]).to(device)  # [n, blocks]
    chunks = [len(it.tokens) for it in items]
    positions = batching.position_ids([it.past for it in items], chunks).to(device)  # [T]
    owner = torch.repeat_interleave(torch.arange(len(items), device=device),
                                    torch.tensor(chunks, device=device))  # [T] sequence of each token
    write_index = batching.slot_index(tables[owner], positions[:, None], bs).view(-1)  # [T]
    if paged:
        return AttentionBatch(pool.k, pool.v, write_index, (), paged_seqs(
            cu_lens[:-1], [it.past for it in items], chunks, tables, bs))
    groups = []
    for members in ([i for i, n in enumerate(chunks) if n == 1], [i for i, n in enumerate(chunks) if n > 1]):
        if members:
            groups.append(batching.attention_group(
                [cu_lens[i] for i in members], [items[i].past for i in members], [chunks[i] for i in members],
                tables[members], bs, windows))
    return AttentionBatch(pool.k, pool.v, write_index, tuple(groups))


class ModelRunner:
    """Runs the (LoRA-wrapped) model on packed steps. One call = one model forward."""

    def __init__(self, model: torch.nn.Module, pool: KVPool, device: torch.device,
                 graphs: StepGraphs | None = None, windows: Sequence[int] = (), attention: str = "sdpa",
                 compiled: bool = False) -> None:
        self.model = model
        # The forward of steps outside the CUDA graphs: the model, or it compiled (compiled.py)
        self.model_forward = compile_model(model) if compiled else model
        self.compiled = compiled
        self.lora_layers = tuple(layer for _, layer in iter_wrapped(model))  # by boundary_index
        if graphs is not None:
            graphs.use_forward(self.model_forward, self.lora_layers)
        self._stance = contextlib.nullcontext  # no_new_compiles once `compile` has run
        self.pool = pool
        self.device = device
        self.graphs = graphs  # the steps it serves go there when set (CUDA graphs)
        self.windows = tuple(windows)  # the model's sliding windows (model_loader.sliding_windows)
        self.paged = attention == "triton"  # attention.pick_attention's choice

    def compile(self, blocks: Sequence[int]) -> float:
        """Compile the forward now (one graph for every step shape: compiled.STEP_SHAPES run
        with base tokens into `blocks`, which must hold 2 tokens), never again after: seconds."""
        started = time.perf_counter()
        with one_graph_for_every_size():
            for tokens, wants_logits, all_logits in STEP_SHAPES:
                self._packed_forward([StepItem(blocks, 0, [0] * tokens, 0, wants_logits, all_logits)], [0])
        self._stance = no_new_compiles
        return time.perf_counter() - started

    def serve_eagerly(self) -> None:
        """Give up the compiled forward (it failed to compile)."""
        self.model_forward, self.compiled, self._stance = self.model, False, contextlib.nullcontext
        if self.graphs is not None:
            self.graphs.use_forward(self.model, self.lora_layers)

    @torch.inference_mode()
    def forward(self, items: Sequence[StepItem], sampled: torch.Tensor | None = None) -> StepLogits:
        """Run one packed step; each item's new K/V land in the pool blocks it holds. `sampled`:
        the last step's sampled tokens on the device, which items with `fed_from` read."""
        order = batching.order_by_slot([it.slot for it in items])  # group tokens by adapter
        ordered = [items[i] for i in order]
        if self.graphs is not None and self.graphs.serves(ordered):
            # a copy: a graph's output is overwritten by its next replay
            logits = self.graphs.forward(ordered, sampled).to(torch.float32, copy=True)
            rows: list[int | None] = [None] * len(items)
            for row, i in enumerate(order):
                rows[i] = row if ordered[row].wants_logits else None
            return StepLogits(logits, rows)
        return self._packed_forward(ordered, order, sampled)

    @torch.inference_mode()
    def _packed_forward(self, ordered: Sequence[StepItem], order: Sequence[int],
                        sampled: torch.Tensor | None = None) -> StepLogits:
        """The step through the model (or it compiled): `ordered` are the items sorted by slot,
        `order` their indices in the step."""
        chunk_lens = [len(it.tokens) for it in ordered]
        input_ids, cu_lens = batching.pack_tokens([it.tokens for it in ordered])  # [T], [n + 1]
        positions = batching.position_ids([it.past for it in ordered], chunk_lens)  # [T]
        token_slots = batching.token_slots([it.slot for it in ordered], chunk_lens)  # [T]
        keep, last, first = batching.logit_rows(cu_lens, [it.wants_logits for it in ordered],
                                                [it.all_logits for it in ordered])
        ctx = BatchContext(lora=lora_batch(token_slots, self.device),
                           attention=attention_batch(self.pool, ordered, cu_lens, self.device, self.windows,
                                                     self.paged),
                           lora_layers=self.lora_layers)
        input_ids = input_ids.to(self.device)
        batching.feed_sampled(input_ids, ordered, sampled)
        with use_context(ctx), self._stance():
            out = self.model_forward(
                input_ids=input_ids[None],
                position_ids=positions[None].to(self.device),
                use_cache=False,
                logits_to_keep=torch.tensor(keep, dtype=torch.long, device=self.device),
            )
        rows: list[int | None] = [None] * len(ordered)
        first_rows: list[int | None] = [None] * len(ordered)
        for i, r, f in zip(order, last, first, strict=True):
            rows[i], first_rows[i] = r, f
        return StepLogits(out.logits[0].float(), rows, first_rows)
