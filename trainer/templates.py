"""Conversations -> token ids and labels, with the loss on assistant tokens only.

Prompts are rendered with the base tokenizer's own chat template, so training
sees exactly the format serving will use. The assistant spans are found by
rendering prefixes of the conversation: the text of assistant turn i runs from
the end of `messages[:i]` rendered with the generation prompt to the end of
`messages[:i+1]` (trailing whitespace excluded, the end-of-turn token included).
That needs a template whose renderings of longer prefixes extend shorter ones;
templates that rewrite earlier turns are refused rather than mis-masked.
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


def tokenize_conversation(tokenizer, conversation: Conversation, cutoff_len: int) -> tuple[Example, bool]:
    """Token ids and labels for one conversation, cut to `cutoff_len`; returns (example, was_cut)."""
    text, spans = render_with_spans(tokenizer, conversation)
    # The template already wrote any special tokens, so the tokenizer must not add more.
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    labels = [
        tok if any(start <= s < end for start, end in spans) else IGNORE_INDEX
        for tok, (s, _e) in zip(ids, offsets, strict=True)
    ]
    cut = len(ids) > cutoff_len
    return Example(ids[:cutoff_len], labels[:cutoff_len]), cut


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
