"""Conversations -> token ids and labels, with the loss on assistant tokens only.

Prompts are rendered with the base tokenizer's own chat template, so training
sees exactly the format serving will use. The assistant spans are found by
rendering prefixes of the conversation: the text of assistant turn i runs from
the end of `messages[:i]` rendered with the generation prompt to the end of
`messages[:i+1]` (trailing whitespace excluded, the end-of-turn token included).
That needs a template whose renderings of longer prefixes extend shorter ones;
templates that rewrite earlier turns are refused rather than mis-masked.

`cutoff_len` means what it means in LLaMA-Factory: the conversation is a series of
(prompt, answer) token pairs (the prompt runs from the end of the previous answer to the
start of this one), and each pair in turn is cut to the budget left, shared between its
prompt and its answer by `infer_seqlen`: an answer shorter than half the budget is kept
whole and the prompt is cut from its end; pairs that find no budget left are dropped.
"""

from __future__ import annotations

from dataclasses import dataclass

from .datasets import Conversation
from .errors import DatasetError

IGNORE_INDEX = -100  # label value that cross-entropy skips


@dataclass
class Example:
    """One training sequence: token ids and per-token labels (IGNORE_INDEX = no loss)."""

    input_ids: list[int]
    labels: list[int]


@dataclass
class TokenizedSplit:
    examples: list[Example]
    truncated: int  # examples cut to cutoff_len
    dropped_no_target: int  # examples whose assistant tokens were all cut away
    tokens: int  # total tokens after cutting


def render_with_spans(tokenizer, conversation: Conversation) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans of its assistant turns."""
    if not getattr(tokenizer, "chat_template", None):
        raise DatasetError(
            "the base model's tokenizer has no chat template; loradock renders prompts with it "
            "(add chat_template.jinja to the base model directory)"
        )

    def render(messages: Conversation, generation_prompt: bool = False) -> str:
        return tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=generation_prompt
        )

    full = render(conversation)
    spans = []
    for i, message in enumerate(conversation):
        if message["role"] != "assistant":
            continue
        prompt, through = render(conversation[:i], True), render(conversation[: i + 1])
        if not (through.startswith(prompt) and full.startswith(through)):
            raise DatasetError(
                "the base model's chat template renders a conversation differently from its "
                "prefixes, so assistant tokens cannot be located for loss masking"
            )
        start, end = len(prompt), len(through.rstrip())
        spans.append((start, end))
    return full, spans


def infer_seqlen(source_len: int, target_len: int, cutoff_len: int) -> tuple[int, int]:
    """(prompt, answer) lengths after cutting a pair to `cutoff_len` (LLaMA-Factory's rule).

    >>> infer_seqlen(100, 10, 50)  # a short answer is kept whole, the prompt gets the rest
    (40, 10)
    >>> infer_seqlen(10, 100, 50)  # a short prompt is kept whole, the answer gets the rest
    (10, 40)
    >>> infer_seqlen(60, 40, 50)   # both long: shared in proportion
    (30, 20)
    """
    if target_len * 2 < cutoff_len:
        max_target_len = cutoff_len
    elif source_len * 2 < cutoff_len:
        max_target_len = cutoff_len - source_len
    else:
        max_target_len = int(cutoff_len * (target_len / (source_len + target_len)))
    new_target_len = min(max_target_len, target_len)
    new_source_len = min(max(cutoff_len - new_target_len, 0), source_len)
    return new_source_len, new_target_len


def tokenize_conversation(tokenizer, conversation: Conversation, cutoff_len: int) -> tuple[Example, bool]:
    """Token ids and labels for one conversation, cut to `cutoff_len`; returns (example, was_cut)."""
    text, spans = render_with_spans(tokenizer, conversation)
    # The template already wrote any special tokens, so the tokenizer must not add more.
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    starts = [s for s, _e in offsets]
    labels = [
        tok if any(start <= s < end for start, end in spans) else IGNORE_INDEX
        for tok, s in zip(ids, starts, strict=True)
    ]
    # Token boundaries of each (prompt, answer) pair; a token belongs where its first character is.
    bounds, at = [], 0
    for start, end in spans:
        a = _first_token_at(starts, start, at)
        b = _first_token_at(starts, end, a)
        bounds.append((at, a, b))
        at = b
    keep: list[int] = []
    total, cut = 0, False
    for i, (p0, a0, b0) in enumerate(bounds):
        if total >= cutoff_len:
            cut = True
            break
        source_len, target_len = infer_seqlen(a0 - p0, b0 - a0, cutoff_len - total)
        cut |= source_len < a0 - p0 or target_len < b0 - a0
        keep += [*range(p0, p0 + source_len), *range(a0, a0 + target_len)]
        total += source_len + target_len
        if i == len(bounds) - 1 and b0 < len(ids):  # text after the last answer (a newline), if it fits
            room = max(0, cutoff_len - total)
            keep += list(range(b0, b0 + min(room, len(ids) - b0)))
            cut |= room < len(ids) - b0
    return Example([ids[i] for i in keep], [labels[i] for i in keep]), cut


def _first_token_at(starts: list[int], char: int, lo: int) -> int:
    """Index of the first token (from `lo`) whose first character is at or after `char`."""
    i = lo
    while i < len(starts) and starts[i] < char:
        i += 1
    return i


def tokenize_split(tokenizer, conversations: list[Conversation], cutoff_len: int) -> TokenizedSplit:
    """Tokenize a split; examples left with no assistant tokens after cutting are dropped (counted)."""
    examples, truncated, dropped = [], 0, 0
    for conv in conversations:
        example, cut = tokenize_conversation(tokenizer, conv, cutoff_len)
        truncated += cut
        if all(label == IGNORE_INDEX for label in example.labels):
            dropped += 1
            continue
        examples.append(example)
    return TokenizedSplit(examples, truncated, dropped, sum(len(e.input_ids) for e in examples))
