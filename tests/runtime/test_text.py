"""Incremental detokenisation, stop strings and sampling filters (no model needed)."""

from __future__ import annotations

import pytest
import torch
from loradock.runtime.detokenize import StopMatcher, TextStream
from loradock.runtime.sampling import Sampler, filter_logits
from loradock.runtime.types import SamplingParams


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_dir)


@pytest.mark.parametrize("text", ["plain ascii text", "日本語のテキスト", "emoji 🎉🦙 mix", "Ünïcödé — “quotes”"])
def test_stream_reassembles_text_without_broken_characters(tokenizer, text):
    stream = TextStream(tokenizer, stops=())
    chunks = [stream.add(t) for t in tokenizer.encode(text, add_special_tokens=False)]
    chunks.append(stream.finish())
    assert "".join(chunks) == text
    assert all("\ufffd" not in c for c in chunks)


@pytest.mark.parametrize(("pieces", "stops", "emitted", "stopped"), [
    (["Hello wor", "ld. END", " more"], ("END",), "Hello world. ", True),
    (["ab", "c#", "#d"], ("##",), "abc", True),  # stop split over two pieces
    (["a#", "b"], ("##",), "a#b", False),  # a held-back prefix that did not become a stop
    (["x", "y"], ("yz", "xy"), "", True),  # the earliest match wins
    (["no stop here"], (), "no stop here", False),
])
def test_stop_matcher(pieces, stops, emitted, stopped):
    m = StopMatcher(stops)
    out = "".join(m.feed(p) for p in pieces) + m.flush()
    assert out == emitted and m.stopped is stopped


def test_filter_logits_top_k_and_top_p():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    assert torch.isinf(filter_logits(logits, top_k=2, top_p=1.0)).tolist() == [False, False, True, True]
    assert torch.isinf(filter_logits(logits, top_k=0, top_p=0.7)).tolist() == [False, False, True, True]
    assert torch.isinf(filter_logits(logits, top_k=0, top_p=0.5)).tolist() == [False, True, True, True]


def test_sampler_seed_and_greedy():
    logits = torch.randn(1000, generator=torch.Generator().manual_seed(0))
    cpu = torch.device("cpu")

    def draws(params: SamplingParams) -> list[int]:
        sampler = Sampler(params, cpu)
        return [sampler(logits) for _ in range(20)]

    seeded = SamplingParams(temperature=1.0, seed=42)
    assert draws(seeded) == draws(seeded)
    assert draws(seeded) != draws(SamplingParams(temperature=1.0, seed=43))
    assert Sampler(SamplingParams(), cpu)(logits) == int(logits.argmax())
