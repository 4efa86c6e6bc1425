"""One forward pass over a packed ragged batch: every scheduled sequence's new tokens in one row."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from . import batching
from .batch_context import BatchContext, LoRABatch, SeqSpan, SlotGroups, use_context
from .kv_cache import SequenceKV


@dataclass(frozen=True)
class StepItem:
    """One sequence's part of a step."""

    kv: SequenceKV
    tokens: Sequence[int]  # new tokens: a prompt chunk or the last sampled token
    slot: int  # adapter slot, 0 = base model
    wants_logits: bool  # the chunk ends the known tokens, so the next token is sampled


@dataclass(frozen=True)
class StepLogits:
    """The step's next-token logits: one row per item that wanted them."""

    logits: torch.Tensor  # [n_sample, vocab] float32
    rows: list[int | None]  # item index -> row in `logits`, None for mid-prefill items

    def row(self, item: int) -> torch.Tensor | None:
        r = self.rows[item]
        return None if r is None else self.logits[r]


def lora_batch(token_slots: torch.Tensor, device: torch.device) -> LoRABatch:
    """The LoRA layers' view of a step from its token -> slot map [T]."""
    slot_list = token_slots.tolist()
    segments = batching.find_segments(slot_list)
    layout = batching.slot_groups(slot_list, segments)

    def as_tensor(index: list[int] | None) -> torch.Tensor | None:
        return None if index is None else torch.tensor(index, dtype=torch.long, device=device)

    return LoRABatch(
        token_slots=token_slots.to(device),
        segments=tuple(segments),
        slots_present=tuple(sorted({s for s in slot_list if s != 0})),
        groups=SlotGroups(
            layout.lo, layout.hi, layout.width, as_tensor(layout.rows), as_tensor(layout.blocked),
            len(slot_list) if layout.blocked is None else len(layout.blocked), tuple(layout.long_runs),
        ),
    )


class ModelRunner:
    """Runs the (LoRA-wrapped) model on packed steps. One call = one model forward."""

    def __init__(self, model: torch.nn.Module, device: torch.device) -> None:
        self.model = model
        self.device = device

    @torch.inference_mode()
    def forward(self, items: Sequence[StepItem]) -> StepLogits:
        """Run one packed step and commit each item's new tokens to its KV cache."""
        order = batching.order_by_slot([it.slot for it in items])  # group tokens by adapter
        ordered = [items[i] for i in order]
        chunk_lens = [len(it.tokens) for it in ordered]
        input_ids, cu_lens = batching.pack_tokens([it.tokens for it in ordered])  # [T], [n + 1]
        positions = batching.position_ids([it.kv.length for it in ordered], chunk_lens)  # [T]
        token_slots = batching.token_slots([it.slot for it in ordered], chunk_lens)  # [T]
        keep = batching.sample_indices(cu_lens, [it.wants_logits for it in ordered])  # [n_sample]
        lora = lora_batch(token_slots, self.device)
        spans = tuple(SeqSpan(it.kv, cu_lens[i], cu_lens[i + 1]) for i, it in enumerate(ordered))
        with use_context(BatchContext(lora=lora, seqs=spans)):
            out = self.model(
                input_ids=input_ids[None].to(self.device),
                position_ids=positions[None].to(self.device),
                use_cache=False,
                logits_to_keep=torch.tensor(keep, dtype=torch.long, device=self.device),
            )
        for it, n in zip(ordered, chunk_lens, strict=True):
            it.kv.advance(n)
        rows: list[int | None] = [None] * len(items)
        row = 0
        for i, it in zip(order, ordered, strict=True):
            if it.wants_logits:
                rows[i] = row
                row += 1
        return StepLogits(out.logits[0].float(), rows)
