"""Token selection: greedy by default; temperature, top-k, top-p; per-request seeds.

Each sampling request owns a `torch.Generator`, so a seeded request draws the same
tokens whatever else shares its batch.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

import torch

from .errors import InvalidRequestError
from .transfer import to_device
from .types import STRUCTURED_KINDS, SamplingParams

# Below this temperature, logits / T overflows float32; the limit T -> 0 is greedy anyway.
GREEDY_BELOW_TEMPERATURE = 1e-5
MAX_TOP_LOGPROBS = 20  # alternatives per token, as OpenAI's top_logprobs
# Far beyond useful penalties (~1-2); a factor near 0 (or huge) turns float32 logits into inf and
# the sampling distribution into NaN, so a request asking for one is refused, not failed.
REPETITION_PENALTY_RANGE = (0.01, 100.0)


def validate_sampling(params: SamplingParams) -> None:
    """Raise InvalidRequestError naming the first bad field."""
    def bad(field: str, why: str) -> InvalidRequestError:
        return InvalidRequestError(f"sampling.{field}: {why}")

    if params.max_new_tokens is not None and (
            not isinstance(params.max_new_tokens, int) or isinstance(params.max_new_tokens, bool)
            or params.max_new_tokens < 1):
        raise bad("max_new_tokens", f"must be a positive integer (or None: until the context is full), "
                                    f"got {params.max_new_tokens!r}")
    if not math.isfinite(params.temperature) or params.temperature < 0:
        raise bad("temperature", f"must be >= 0 (0 = greedy), got {params.temperature!r}")
    if not math.isfinite(params.top_p) or not 0 < params.top_p <= 1:
        raise bad("top_p", f"must be in (0, 1], got {params.top_p!r}")
    if not isinstance(params.top_k, int) or params.top_k < 0:
        raise bad("top_k", f"must be an integer >= 0 (0 = off), got {params.top_k!r}")
    if params.seed is not None and (not isinstance(params.seed, int) or not 0 <= params.seed < 2**63):
        raise bad("seed", f"must be an integer in [0, 2^63), got {params.seed!r}")
    if any(not isinstance(s, str) or s == "" for s in params.stop):
        raise bad("stop", "stop strings must be non-empty strings")
    for name in ("logprobs", "prompt_logprobs"):
        value = getattr(params, name)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool)
                                  or not 0 <= value <= MAX_TOP_LOGPROBS):
            raise bad(name, f"must be an integer in [0, {MAX_TOP_LOGPROBS}] (alternatives per token), got {value!r}")
    low, high = REPETITION_PENALTY_RANGE
    if not low <= params.repetition_penalty <= high:  # also refuses NaN
        raise bad("repetition_penalty", f"must be in [{low:g}, {high:g}] (1 = off), got {params.repetition_penalty!r}")
    for name in ("frequency_penalty", "presence_penalty"):
        value = getattr(params, name)
        if not math.isfinite(value) or not -2 <= value <= 2:
            raise bad(name, f"must be in [-2, 2], got {value!r}")
    if any(not math.isfinite(bias) or not -100 <= bias <= 100 for _, bias in params.logit_bias):
        raise bad("logit_bias", "biases must be in [-100, 100]")
    structured = params.structured
    if structured is not None and (structured.kind not in STRUCTURED_KINDS or (
            structured.kind == "choice" and (not structured.value or not all(structured.value)))):
        raise bad("structured", f"kind must be one of {', '.join(STRUCTURED_KINDS)} (a choice of non-empty "
                                f"strings), got {structured!r}")
    if not isinstance(params.min_tokens, int) or params.min_tokens < 0 or (
            params.max_new_tokens is not None and params.min_tokens > params.max_new_tokens):
        raise bad("min_tokens", f"must be an integer in [0, max_new_tokens], got {params.min_tokens!r}")


def check_token_ids(params: SamplingParams, vocab_size: int) -> None:
    """The token ids a request names (logit_bias, stop_token_ids) are in the vocabulary."""
    for name, ids in (("logit_bias", [t for t, _ in params.logit_bias]), ("stop_token_ids", params.stop_token_ids)):
        bad = [t for t in ids if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < vocab_size]
        if bad:
            raise InvalidRequestError(f"sampling.{name}: {bad[:5]} not in the vocabulary [0, {vocab_size})")


class Sampler:
    """One request's way of picking its next token: its logits processors (`process`), then
    greedy or a draw with its own generator (`sample_rows` does the whole step's rows at once).
    `batched_greedy`: plain greedy, which the engine takes from the step's one argmax."""

    def __init__(self, params: SamplingParams, device: torch.device, end_ids: set[int] = frozenset()) -> None:
        self.params = params
        self.greedy = params.temperature < GREEDY_BELOW_TEMPERATURE
        self.processors = LogitsProcessors(params, end_ids) if LogitsProcessors.wanted(params) else None
        self.batched_greedy = self.greedy and self.processors is None
        # A seeded request draws from its own generator; the others share one (`shared_generator`),
        # so their noise comes in one call whatever the batch.
        self.generator: torch.Generator | None = None
        if not self.greedy and params.seed is not None:
            self.generator = torch.Generator(device=device).manual_seed(params.seed)

    def process(self, logits: torch.Tensor, prompt_ids: list[int] = (), output_ids: list[int] = ()) -> torch.Tensor:
        """This request's row of logits [vocab] after its processors (penalties, bias, min_tokens)."""
        return logits if self.processors is None else self.processors(logits, prompt_ids, output_ids)

    def __call__(self, logits: torch.Tensor, prompt_ids: list[int] = (), output_ids: list[int] = ()) -> int:
        """One token from one row (the engine samples its rows together with `sample_rows`)."""
        return int(sample_rows(self.process(logits, prompt_ids, output_ids)[None], [self])[0])


def sample_rows(logits: torch.Tensor, samplers: Sequence[Sampler]) -> torch.Tensor:
    """One token id per row of `logits` [n, vocab] (processors already applied), each row by its
    sampler, as one batch on the logits' device: greedy rows take the argmax; the others are
    divided by their temperature, cut to their top-k and top-p (`nucleus`, over one sort of the
    batch, only when a row asks for either), and draw by the exponential race: the argmax of
    p / E with E ~ Exp(1), which picks token i with probability p_i (as a multinomial draw
    does). A seeded row's E comes from its own generator, so its draws are the same whatever
    shares its batch; the other rows' come from one call. Nothing is read back here: the engine reads every row's token
    at once. -> [n] long.

    >>> g = SamplingParams(temperature=0.0)
    >>> sample_rows(torch.tensor([[0.0, 3.0, 1.0]]), [Sampler(g, torch.device("cpu"))]).tolist()
    [1]
    >>> hot = Sampler(SamplingParams(temperature=1.0, seed=1, top_k=1), torch.device("cpu"))
    >>> sample_rows(torch.tensor([[0.0, 3.0, 1.0]]), [hot]).tolist()  # top_k=1: only the best can come
    [1]
    """
    tokens = logits.argmax(dim=-1)
    drawn = [i for i, s in enumerate(samplers) if not s.greedy]
    if not drawn:
        return tokens
    device = logits.device
    rows = to_device(drawn, device)
    params = [samplers[i].params for i in drawn]
    vocab = logits.shape[-1]
    scaled = logits.index_select(0, rows).float() / to_device([p.temperature for p in params], device)[:, None]
    noise = torch.empty(len(drawn), vocab, device=device).exponential_(generator=shared_generator(device))
    for j, i in enumerate(drawn):  # seeded rows: their own generator's noise
        if samplers[i].generator is not None:
            noise[j].exponential_(generator=samplers[i].generator)
    noise.clamp_min_(torch.finfo(torch.float32).tiny)
    ks = [p.top_k if 0 < p.top_k < vocab else vocab for p in params]
    if all(k == vocab for k in ks) and all(p.top_p >= 1.0 for p in params):
        probs = torch.softmax(scaled, dim=-1)
    else:  # in vocabulary order again, so a row's noise meets the same tokens whichever path it takes
        ordered, order = scaled.sort(dim=-1, descending=True)
        kept = nucleus(ordered, to_device(ks, device), to_device([p.top_p for p in params], device))
        probs = torch.zeros_like(kept).scatter_(1, order, torch.softmax(kept, dim=-1))
    return tokens.index_copy(0, rows, (probs / noise).argmax(dim=-1))


_shared: dict[torch.device, torch.Generator] = {}


def shared_generator(device: torch.device) -> torch.Generator:
    """The generator of unseeded draws on `device`, seeded at random once per process (torch's
    default generator starts from the same seed in every process)."""
    generator = _shared.get(device)
    if generator is None:
        generator = _shared[device] = torch.Generator(device=device).manual_seed(random.getrandbits(63))
    return generator


def nucleus(ordered: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Rows of logits sorted in descending order [n, vocab] with -inf past each row's top_k
    (vocab: all) and past its nucleus: a token goes when the tokens before it already reach
    top_p of the probability left after top-k (the first always stays, even when top_p rounds
    to 0). Per row the same tokens as `filter_logits` keeps, save for ties at the k-th value.

    >>> nucleus(torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])), torch.tensor([4]), torch.tensor([0.7])).exp()
    tensor([[0.5000, 0.3000, 0.0000, 0.0000]])
    """
    positions = torch.arange(ordered.shape[-1], device=ordered.device)
    cut = ordered.masked_fill(positions[None, :] >= top_k[:, None], float("-inf"))
    probs = torch.softmax(cut, dim=-1)
    drop = probs.cumsum(dim=-1) - probs >= top_p[:, None]
    drop[:, 0] = False
    return cut.masked_fill(drop, float("-inf"))


class LogitsProcessors:
    """Repetition, frequency and presence penalties, logit bias and min_tokens on one request's
    logits [vocab], in vLLM's order, before temperature."""

    @staticmethod
    def wanted(params: SamplingParams) -> bool:
        return bool(params.repetition_penalty != 1 or params.frequency_penalty or params.presence_penalty
                    or params.logit_bias or params.min_tokens)

    def __init__(self, params: SamplingParams, end_ids: set[int]) -> None:
        self.params = params
        self.end_ids = sorted(set(end_ids) | set(params.stop_token_ids))  # what min_tokens holds back
        self.bias: tuple[torch.Tensor, torch.Tensor] | None = None

    def __call__(self, logits: torch.Tensor, prompt_ids: list[int], output_ids: list[int]) -> torch.Tensor:
        p, logits = self.params, logits.float().clone()
        device = logits.device
        if p.repetition_penalty != 1 and (prompt_ids or output_ids):
            seen = to_device(sorted(set(prompt_ids) | set(output_ids)), device)
            values = logits[seen]
            logits[seen] = torch.where(values > 0, values / p.repetition_penalty, values * p.repetition_penalty)
        if (p.frequency_penalty or p.presence_penalty) and output_ids:
            counts = torch.bincount(to_device(output_ids, device), minlength=logits.shape[0]).float()
            logits -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).float()
        if p.logit_bias:
            if self.bias is None:
                ids, values = zip(*p.logit_bias, strict=True)
                self.bias = (to_device(ids, device), to_device(values, device))
            logits.index_add_(0, *self.bias)
        if len(output_ids) < p.min_tokens and self.end_ids:
            logits[to_device(self.end_ids, device)] = float("-inf")
        return logits


def filter_logits(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Set logits outside the top-k / nucleus (top-p) to -inf.  logits [vocab] -> [vocab]. The
    one-row spec of `nucleus` (which works on sorted rows, the whole batch at once)."""
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cumulative = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
        # Drop a token when the tokens before it already reach top_p (the first always stays).
        drop_sorted = cumulative - torch.softmax(sorted_logits, dim=-1) >= top_p
        drop_sorted[0] = False  # a top_p that rounds to 0 in float32 must still keep the top token
        drop = torch.zeros_like(drop_sorted).scatter(0, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits
