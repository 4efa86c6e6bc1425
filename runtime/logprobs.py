"""Log probabilities, computed for the requests of a step that asked, in one batched
log-softmax and top-k per step: of the generated tokens (`SamplingParams.logprobs`) and of the
prompt's tokens (`prompt_logprobs`, from every logit of the request's prefill chunks)."""

from __future__ import annotations

from collections.abc import Sequence as Seq
from typing import TYPE_CHECKING

import torch

from .types import TokenLogprob

if TYPE_CHECKING:
    from .model_runner import StepItem, StepLogits
    from .sequence import Sequence


def token_logprobs(logits: torch.Tensor, tokens: list[int], top: list[int]) -> list[TokenLogprob]:
    """For rows of `logits` [n, vocab] and the token chosen from each: its log probability and
    the `top[i]` most likely alternatives', in one batched log-softmax and top-k.

    >>> lp = token_logprobs(torch.tensor([[0.0, 0.0], [2.0, 0.0]]), [1, 1], [0, 1])
    >>> [(t.token_id, round(t.logprob, 3), [(i, round(v, 3)) for i, v in t.top]) for t in lp]
    [(1, -0.693, []), (1, -2.127, [(0, -0.127)])]
    """
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    chosen = logprobs.gather(1, torch.tensor(tokens, device=logits.device)[:, None])[:, 0].tolist()
    k = max(top, default=0)
    values, ids = (logprobs.topk(k, dim=-1) if k else (logprobs[:, :0], logprobs[:, :0].long()))
    values, ids = values.tolist(), ids.tolist()
    return [TokenLogprob(t, c, tuple(zip(i[:n], v[:n], strict=True)))
            for t, c, i, v, n in zip(tokens, chosen, ids, values, top, strict=True)]


def generated_logprobs(logits: torch.Tensor, sampled: Seq[tuple[Sequence, int, int]]) -> dict[str, TokenLogprob]:
    """request id -> the log probabilities of its token this step, for the (sequence, logits row,
    token) triples whose request asked."""
    wanted = [(seq, row, token) for seq, row, token in sampled if seq.request.sampling.logprobs is not None]
    if not wanted:
        return {}
    rows = torch.tensor([row for _, row, _ in wanted], device=logits.device)
    found = token_logprobs(logits.index_select(0, rows), [t for _, _, t in wanted],
                           [seq.request.sampling.logprobs for seq, _, _ in wanted])
    return {seq.request_id: lp for (seq, _, _), lp in zip(wanted, found, strict=True)}


def add_prompt_logprobs(step: StepLogits, seqs: Seq[Sequence], items: Seq[StepItem]) -> None:
    """For each chunk whose every logit was kept, append to its sequence the log probability of
    each next prompt token (position p's logits predict the token at p + 1); positions it already
    has (a recompute after preemption) are skipped."""
    rows, targets, top, owners = [], [], [], []
    for seq, item, first in zip(seqs, items, step.first_rows or [None] * len(items), strict=True):
        if first is None:
            continue
        for j in range(len(item.tokens)):
            position = item.past + j
            if len(seq.prompt_logprobs) <= position < len(seq.prompt_ids) - 1:
                rows.append(first + j)
                targets.append(seq.prompt_ids[position + 1])
                top.append(seq.request.sampling.prompt_logprobs)
                owners.append(seq)
    if rows:
        index = torch.tensor(rows, device=step.logits.device)
        for seq, lp in zip(owners, token_logprobs(step.logits.index_select(0, index), targets, top), strict=True):
            seq.prompt_logprobs.append(lp)
