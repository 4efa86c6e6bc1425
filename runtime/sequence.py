"""`Sequence`: one admitted request's state inside the engine."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import Any

from .detokenize import TextStream
from .handle import RequestHandle
from .kv_cache import block_hashes
from .sampling import Sampler
from .types import FinishReason, GenerationRequest, ResolvedAdapter, TokenLogprob

PENDING = -1  # a token sampled on the device and not yet read back (Sequence.in_flight)


class SeqStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    request: GenerationRequest
    handle: RequestHandle
    prompt_ids: list[int]
    adapter: ResolvedAdapter | None  # None: the base model alone
    sampler: Sampler
    text: TextStream
    max_len: int  # prompt + max_new_tokens, capped by the engine's max_model_len
    status: SeqStatus = SeqStatus.WAITING
    output_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)  # per output token, when asked for
    matcher: Any = None  # structured outputs: the grammar matcher (structured.Grammars.matcher)
    # prompt_logprobs: the log probability of prompt token i + 1, for i < len(prompt) - 1
    prompt_logprobs: list[TokenLogprob] = field(default_factory=list)
    computed: int = 0  # tokens whose K/V are in the cache
    blocks: list[int] = field(default_factory=list)  # KV pool block table
    block_hashes: list[bytes] = field(default_factory=list)  # of its full blocks (prefix cache)
    slot: int = 0
    preemptions: int = 0
    submitted_at: float = field(default_factory=time.monotonic)
    admitted_at: float | None = None
    first_token_at: float | None = None
    # Sampled tokens not yet streamed (their text, event and, where one ends the sequence, its
    # result follow in Engine._send, once the next step's forward is launched): (token, its log
    # probability, why the sequence ends there or None)
    unsent: list[tuple[int, TokenLogprob | None, FinishReason | None]] = field(default_factory=list)
    sent: int = 0  # output tokens streamed
    # 1 while a token sampled for it is still on the device (asynchronous scheduling: the next
    # step runs before it is read back); it counts in num_tokens, and its place in
    # pending_tokens is PENDING, which the runner fills on the device
    in_flight: int = 0

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def num_tokens(self) -> int:
        """Its tokens, the one in flight included."""
        return len(self.prompt_ids) + len(self.output_ids) + self.in_flight

    @property
    def kv_context(self) -> str:
        """What besides the tokens decides this sequence's K/V: its adapter version."""
        return "" if self.adapter is None else f"{self.adapter.ref}:{self.adapter.digest}"

    def full_block_hashes(self, block_size: int) -> list[bytes]:
        """Prefix-cache hashes of every full block of its tokens (computed once, extended as it grows)."""
        known = len(self.prompt_ids) + len(self.output_ids)  # a token in flight has no hash yet
        if len(self.block_hashes) < known // block_size:
            block_hashes(self.kv_context, self.prompt_ids + self.output_ids, block_size, self.block_hashes)
        return self.block_hashes

    def finish_reason(self, last_token: int, eos_ids: set[int]) -> FinishReason | None:
        """Why the sequence ends now that `last_token` was generated and detokenized; None: it goes on."""
        if last_token in eos_ids and not self.request.sampling.ignore_eos:
            return FinishReason.EOS
        if self.matcher is not None and self.matcher.is_terminated():  # the grammar took its stop token
            return FinishReason.EOS
        if self.text.stopped or last_token in self.request.sampling.stop_token_ids:
            return FinishReason.STOP
        if self.num_tokens >= self.max_len:
            return FinishReason.LENGTH
        return None

    @property
    def reads_prefix_cache(self) -> bool:
        """False when the prompt's log probabilities are wanted: they need every prompt
        position's logits, so the whole prompt is computed."""
        return self.request.sampling.prompt_logprobs is None

    def needs_prompt_logits(self, chunk: int) -> bool:
        """Whether the next `chunk` tokens hold prompt positions whose log probabilities are
        wanted and not yet taken (a recompute after preemption takes none again)."""
        return (self.request.sampling.prompt_logprobs is not None
                and len(self.prompt_logprobs) < len(self.prompt_ids) - 1
                and self.computed + chunk > len(self.prompt_logprobs))

    @property
    def in_prefill(self) -> bool:
        """More than one token lacks its K/V: a prompt chunk, or a recompute after preemption."""
        return self.num_tokens - self.computed > 1

    def pending_tokens(self, limit: int) -> list[int]:
        """The next tokens to run through the model: a prompt chunk (after a preemption, the
        generated tokens follow the prompt), or the last sampled token (PENDING while in flight)."""
        start, end = self.computed, min(self.computed + limit, self.num_tokens)
        prompt = len(self.prompt_ids)
        if end <= prompt:
            return self.prompt_ids[start:end]
        tokens = self.prompt_ids[start:] + self.output_ids[max(start - prompt, 0):end - prompt]
        return tokens + [PENDING] * (end - start - len(tokens))
