"""Incremental detokenisation, stop strings and sampling filters (no model needed)."""

from __future__ import annotations

import pytest
import torch
from loradock.runtime.detokenize import (
    IncrementalDecoder,
    RustStreamDecoder,
    StopMatcher,
    TextStream,
    incremental_decoder,
)
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


def test_the_rust_stream_emits_what_the_reference_decoder_emits_token_by_token(tokenizer):
    """Same text at the same tokens (so stop strings end a request at the same token): real text
    with multi-byte characters, random ids (partial byte sequences, specials) and the EOS token."""
    import random

    assert isinstance(incremental_decoder(tokenizer), RustStreamDecoder)
    rng = random.Random(0)
    texts = ["Hello, wörld! 你好，世界 🤖🎉 naïve café — “quotes” ", "def f(x):\n    return x**2\n"]
    for trial in range(60):
        ids = (tokenizer.encode(texts[trial % 2] * 2, add_special_tokens=False) if trial % 3 == 0
               else [rng.randrange(len(tokenizer)) for _ in range(40)])
        ids.insert(len(ids) // 2, tokenizer.eos_token_id)
        reference, fast = IncrementalDecoder(tokenizer), RustStreamDecoder(tokenizer._tokenizer)
        assert [fast.add(t) for t in ids] == [reference.add(t) for t in ids], ids


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


def test_rows_sampled_together_draw_what_each_draws_alone():
    """sample_rows over a batch of mixed settings gives each row the token it gets alone with the
    same seed: one request's draws never depend on who shares its step."""
    from loradock.runtime.sampling import sample_rows

    cpu = torch.device("cpu")
    logits = torch.randn(6, 500, generator=torch.Generator().manual_seed(1)) * 3
    settings = [SamplingParams(temperature=0.0), SamplingParams(temperature=1.0, seed=1),
                SamplingParams(temperature=0.7, top_k=5, seed=2), SamplingParams(temperature=1.3, top_p=0.8, seed=3),
                SamplingParams(temperature=1.0, top_k=50, top_p=0.5, seed=4), SamplingParams(temperature=2.0, seed=5)]
    together = sample_rows(logits, [Sampler(p, cpu) for p in settings]).tolist()
    alone = [Sampler(p, cpu)(logits[i]) for i, p in enumerate(settings)]
    assert together == alone
    assert together[0] == int(logits[0].argmax())


def test_sampled_tokens_follow_the_filtered_distribution():
    """Over 4,000 draws each kept token comes up about as often as its probability after
    temperature, top-k and top-p (filter_logits, the one-row spec), and no other token ever does."""
    from loradock.runtime.sampling import sample_rows

    cpu = torch.device("cpu")
    logits = torch.tensor([2.0, 1.5, 1.0, 0.5, 0.0, -1.0, -3.0, -5.0])
    params = SamplingParams(temperature=0.8, top_k=6, top_p=0.9, seed=7)
    sampler = Sampler(params, cpu)
    draws = torch.cat([sample_rows(logits.expand(400, -1), [sampler] * 400) for _ in range(10)])
    want = torch.softmax(filter_logits(logits / 0.8, 6, 0.9), dim=-1)
    seen = torch.bincount(draws, minlength=8).float() / len(draws)
    assert torch.all(seen[want == 0] == 0), (seen, want)
    assert torch.allclose(seen, want, atol=0.03), (seen, want)


def test_nucleus_keeps_what_filter_logits_keeps():
    from loradock.runtime.sampling import nucleus

    gen = torch.Generator().manual_seed(3)
    for top_k, top_p in [(0, 1.0), (3, 1.0), (0, 0.6), (10, 0.3), (40, 0.95), (0, 1e-9)]:
        logits = torch.randn(4, 64, generator=gen) * 2
        ordered, order = logits.sort(dim=-1, descending=True)
        kept = nucleus(ordered, torch.tensor([top_k or 64] * 4), torch.tensor([top_p] * 4))
        got = torch.full_like(logits, float("-inf")).scatter(1, order, kept)
        for row in range(4):
            want = filter_logits(logits[row], top_k, top_p)
            assert torch.equal(torch.isinf(got[row]), torch.isinf(want)), (top_k, top_p)


def test_sampling_doctests():
    import doctest

    from loradock.runtime import sampling

    assert doctest.testmod(sampling).failed == 0
