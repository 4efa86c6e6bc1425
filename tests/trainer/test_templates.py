"""Prompt rendering with the base's chat template; loss only on assistant tokens."""

from __future__ import annotations

import pytest
from loradock.trainer.errors import DatasetError
from loradock.trainer.templates import IGNORE_INDEX, tokenize_conversation, tokenize_split
from transformers import AutoTokenizer

CONVERSATION = [
    {"role": "system", "content": "You answer in one word."},
    {"role": "user", "content": "Capital of France?"},
    {"role": "assistant", "content": "Paris"},
    {"role": "user", "content": "And of Italy, please?"},
    {"role": "assistant", "content": "Rome, of course."},
]


@pytest.fixture(scope="module")
def tokenizer(tiny_base):
    return AutoTokenizer.from_pretrained(tiny_base.path)


def runs(labels: list[int]) -> list[tuple[int, int]]:
    """[start, end) index ranges of consecutive labelled positions."""
    out, start = [], None
    for i, label in enumerate([*labels, IGNORE_INDEX]):
        if label != IGNORE_INDEX and start is None:
            start = i
        elif label == IGNORE_INDEX and start is not None:
            out.append((start, i))
            start = None
    return out


def test_labels_cover_exactly_the_assistant_turns(tokenizer):
    example, cut = tokenize_conversation(tokenizer, CONVERSATION, cutoff_len=512)
    ids, labels = example.input_ids, example.labels
    assert not cut
    assert ids == tokenizer(tokenizer.apply_chat_template(CONVERSATION, tokenize=False),
                            add_special_tokens=False)["input_ids"]
    # Token by token: a label is either the token itself or ignored, never anything else.
    for token, label in zip(ids, labels, strict=True):
        assert label in (token, IGNORE_INDEX)
    # The labelled runs are the assistant answers plus their end-of-turn token, in order.
    spans = runs(labels)
    assert [tokenizer.decode(ids[a:b]) for a, b in spans] == ["Paris<|im_end|>", "Rome, of course.<|im_end|>"]
    # Everything before each run is the prompt, ending with the assistant header (not learned).
    for a, _b in spans:
        assert tokenizer.decode(ids[:a]).endswith("<|im_start|>assistant\n")
    # User, system and the template's own text carry no loss.
    unlabelled = tokenizer.decode([t for t, label in zip(ids, labels, strict=True) if label == IGNORE_INDEX])
    assert "Capital of France?" in unlabelled and "You answer in one word." in unlabelled
    assert "Paris" not in unlabelled and "Rome" not in unlabelled


def test_conversation_without_system_uses_the_templates_default(tokenizer):
    example, _ = tokenize_conversation(tokenizer, CONVERSATION[1:3], cutoff_len=512)
    text = tokenizer.decode(example.input_ids)
    assert text.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    (span,) = runs(example.labels)
    assert tokenizer.decode(example.input_ids[span[0]:span[1]]) == "Paris<|im_end|>"


def test_cutoff_keeps_a_short_answer_whole_and_cuts_the_prompt_as_llama_factory_does(tokenizer):
    """Guards cutoff_len's LLaMA-Factory meaning: a plain cut from the end (the old rule) loses the
    answer of a conversation whose prompt is long; infer_seqlen keeps the answer and cuts the prompt."""
    short = CONVERSATION[1:3]
    full, was_cut = tokenize_conversation(tokenizer, short, cutoff_len=512)
    ((a, b),) = runs(full.labels)
    assert not was_cut and b - a < a  # the answer is shorter than its prompt
    cut, was_cut = tokenize_conversation(tokenizer, short, cutoff_len=a + 1)
    keep = a + 1 - (b - a)  # the prompt gets what the whole answer leaves
    assert was_cut and len(cut.input_ids) == a + 1
    assert cut.input_ids == full.input_ids[:keep] + full.input_ids[a:b]
    assert cut.labels == [IGNORE_INDEX] * keep + full.input_ids[a:b]


def test_cutoff_gives_each_turn_what_the_earlier_ones_left(tokenizer):
    """Guards the per-turn budget: once the first (prompt, answer) pair uses it up, later turns go."""
    full, _ = tokenize_conversation(tokenizer, CONVERSATION, cutoff_len=512)
    (a1, b1), (a2, b2) = runs(full.labels)
    cut, was_cut = tokenize_conversation(tokenizer, CONVERSATION, cutoff_len=b1)
    assert was_cut and cut.input_ids == full.input_ids[:b1]
    assert runs(cut.labels) == [(a1, b1)]
    # With room for twice the second answer and one token more, that answer is kept whole and
    # its prompt (the user turn and the assistant header) gets the rest.
    answer = b2 - a2
    assert a2 - b1 > answer + 1  # the second prompt is longer than what it will get
    cut, _ = tokenize_conversation(tokenizer, CONVERSATION, cutoff_len=b1 + 2 * answer + 1)
    assert cut.input_ids == full.input_ids[: b1 + answer + 1] + full.input_ids[a2:b2]


def test_cutoff_counts_cut_examples_and_drops_those_left_without_an_answer(tokenizer):
    short = CONVERSATION[1:3]
    long_prompt = [{"role": "user", "content": "Tell me more. " * 50}, {"role": "assistant", "content": "No."}]
    split = tokenize_split(tokenizer, [short, long_prompt], cutoff_len=30)
    # Both are cut; the short answers survive whole, so nothing is dropped.
    assert (split.truncated, split.dropped_no_target, len(split.examples)) == (2, 0, 2)
    assert tokenizer.decode(split.examples[1].input_ids).endswith("No.<|im_end|>")
    # A budget of 2 tokens leaves each answer a share that rounds down to nothing: both dropped.
    split = tokenize_split(tokenizer, [short, long_prompt], cutoff_len=2)
    assert (split.truncated, split.dropped_no_target, len(split.examples)) == (2, 2, 0)


def test_infer_seqlen_doctests():
    import doctest

    from loradock.trainer import templates

    assert doctest.testmod(templates).failed == 0


def test_template_that_rewrites_earlier_turns_is_refused(tokenizer):
    odd = AutoTokenizer.from_pretrained(tokenizer.name_or_path)
    # Renders the number of messages first, so a prefix does not render as a prefix.
    odd.chat_template = "{{ messages|length }}{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
    with pytest.raises(DatasetError, match="renders a conversation differently from its prefixes"):
        tokenize_conversation(odd, CONVERSATION, cutoff_len=512)
    odd.chat_template = None
    with pytest.raises(DatasetError, match="has no chat template"):
        tokenize_conversation(odd, CONVERSATION, cutoff_len=512)
