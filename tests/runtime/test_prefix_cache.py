"""The KV prefix cache: full blocks are reused by later sequences of the same adapter version with
the same leading tokens, never across adapters, and what they generate stays PEFT's greedy output."""

from __future__ import annotations

import torch
from loradock.runtime import GenerationRequest, SamplingParams
from loradock.runtime.kv_cache import KVPool, block_hashes
from loradock.runtime.sequence import Sequence
from loradock.runtime.types import ResolvedAdapter

from tests.runtime.conftest import load_peft_oracle, oracle_greedy

SYSTEM = ("You are a careful assistant for a hospital. Answer briefly, cite the guideline you use, "
          "and say when a question needs a doctor. ")
QUESTIONS = ("What is a normal resting heart rate?", "How long does a flu last?",
             "Can I take ibuprofen with a cold?")


def pool(blocks: int) -> KVPool:
    return KVPool(1, 1, 1, blocks, 4, torch.float32, torch.device("cpu"))


def test_pool_shares_registered_blocks_and_evicts_idle_ones_last_released_last():
    kv = pool(4)
    hashes = block_hashes("law@1", list(range(12)), 4, [])
    first: list[int] = []
    assert kv.grow(first, 12)
    blocks = list(first)  # `free` empties the table
    for block, h in zip(first, hashes, strict=True):
        kv.register(block, h)
    # Guards against hashing a block's tokens alone: the same tokens after another start differ.
    assert kv.take_cached(block_hashes("law@1", [99, *range(1, 12)], 4, [])) == []
    assert kv.take_cached(block_hashes("med@1", list(range(12)), 4, [])) == [], "another adapter"
    shared = kv.take_cached(hashes[:2])
    assert shared == blocks[:2], "the same blocks, shared"
    kv.free(first)
    assert kv.free_blocks == 2, "blocks held by the second table are not free"
    kv.free(shared)
    assert kv.free_blocks == 4 and kv.cached_blocks == 3, "released blocks stay cached"
    # Taking 2 new blocks uses the never-registered block first, then evicts the cached block
    # released longest ago: the chain's tail (freed first), so its head stays reusable.
    fresh: list[int] = []
    assert kv.grow(fresh, 8)
    assert kv.cached_blocks == 2 and kv.take_cached(hashes[:1]) == blocks[:1]
    assert not kv.grow(fresh, 16), "all or nothing: one block short"
    assert len(fresh) == 2


def sequence(adapter: ResolvedAdapter | None, ids: list[int]) -> Sequence:
    """A sequence as admission sees it (no handle, sampler or detokenizer needed for its hashes)."""
    return Sequence(GenerationRequest(prompt_token_ids=tuple(ids)), handle=None, prompt_ids=list(ids),
                    adapter=adapter, sampler=None, text=None, max_len=len(ids) + 4)


def test_two_versions_of_one_adapter_never_share_kv_blocks():
    """Guards keying the prefix cache by the adapter's name alone: law@2 (other weights) sent
    the prompt law@1 already computed must prefill it, not get law@1's K/V."""
    kv = pool(8)
    ids = list(range(100, 116))  # 4 full blocks
    law1, law2 = ResolvedAdapter("law", 1, "1" * 64), ResolvedAdapter("law", 2, "2" * 64)
    first = sequence(law1, ids)
    assert kv.grow(first.blocks, len(ids))
    for block, h in zip(first.blocks, first.full_block_hashes(4), strict=True):
        kv.register(block, h)
    assert kv.take_cached(sequence(law2, ids).full_block_hashes(4)) == [], "law@2 got law@1's K/V"
    assert kv.take_cached(sequence(ResolvedAdapter("med", 1, "1" * 64), ids).full_block_hashes(4)) == []
    assert kv.take_cached(sequence(None, ids).full_block_hashes(4)) == [], "the base got law@1's K/V"
    # the same version does reuse them: the comparisons above could fail
    assert kv.take_cached(sequence(law1, ids).full_block_hashes(4)) == first.blocks


def test_registering_a_hash_twice_keeps_the_first_block():
    kv = pool(4)
    h = block_hashes("", [5, 6, 7, 8], 4, [])
    a: list[int] = []
    b: list[int] = []
    kv.grow(a, 4)
    kv.grow(b, 4)
    kv.register(a[0], h[0])
    kv.register(b[0], h[0])  # computed the same tokens in the same step
    kv.free(b)
    assert kv.free_blocks == 3 and kv.cached_blocks == 1, "the duplicate went back as a plain block"
    assert kv.take_cached(h) == a[:1]


def test_shared_prompt_is_prefilled_once_per_adapter_and_outputs_equal_peft(
        tiny_registry, tiny_base, tiny_adapter_dirs, engine_factory):
    engine = engine_factory(tiny_registry, tiny_base.name, run_loop=False, kv_block_size=4)
    oracle = load_peft_oracle(tiny_base.path, {n: tiny_adapter_dirs[n] for n in ("law", "med")}, "none")
    new_tokens = 6

    def serve(adapter: str | None, question: str) -> list[int]:
        result = engine.generate(GenerationRequest(adapter=adapter, prompt=SYSTEM + question,
                                                   sampling=SamplingParams(max_new_tokens=new_tokens,
                                                                           ignore_eos=True)))
        return list(result.token_ids)

    def cached(key: str) -> int:
        return engine.stats()["adapters"].get(key, {}).get("cached_prompt_tokens", 0)

    system_blocks = len(engine.tokenizer.encode(SYSTEM)) // 4
    assert system_blocks >= 4
    for i, question in enumerate(QUESTIONS):
        for adapter in ("law", "med", None):
            ids = engine.tokenizer.encode(SYSTEM + question)
            assert serve(adapter, question) == oracle_greedy(oracle, adapter, ids, new_tokens), (adapter, i)
    for key in ("law@1", "med@1", "<base>"):
        # Guards against keying the cache by tokens alone: each adapter's first request prefilled
        # everything (a hit across adapters would have served another adapter's K/V).
        assert cached(key) >= 2 * (system_blocks - 1) * 4, f"{key}: the system prompt was reused"
    # Every block is free again, and the cached ones are still there for the next request.
    assert engine.kv.free_blocks == engine.kv.num_blocks and engine.kv.cached_blocks > 0


def test_prefix_caching_off_prefills_everything(tiny_registry, tiny_base, engine_factory):
    engine = engine_factory(tiny_registry, tiny_base.name, run_loop=False, kv_block_size=4,
                            prefix_caching=False)
    for question in QUESTIONS[:2]:
        engine.generate(GenerationRequest(adapter="law", prompt=SYSTEM + question,
                                          sampling=SamplingParams(max_new_tokens=2)))
    assert engine.stats()["adapters"]["law@1"]["cached_prompt_tokens"] == 0
    assert engine.kv.cached_blocks == 0
