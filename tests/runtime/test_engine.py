"""Engine behaviour on the tiny model: versions and aliases, bad adapters, sampling, streaming,
validation, cancellation, shutdown, adapter management."""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
from pathlib import Path

import pytest
import torch
from loradock.registry import Registry
from loradock.runtime import (
    AdapterNotFoundError,
    AdapterUnavailableError,
    ChatMessage,
    EngineShutdownError,
    FinishReason,
    GenerationRequest,
    InvalidRequestError,
    QueueFullError,
    SamplingParams,
)

from loradock.bases import import_base
from tests.adapters import make_lora_adapter
from tests.runtime.conftest import drive


class ScriptedSampler:
    """Stands in for a request's sampler: the next token comes from `pick()`, not the logits (its
    processor leaves only that token, which the greedy argmax then takes)."""

    greedy, batched_greedy = True, False

    def __init__(self, pick) -> None:
        self.pick = pick

    def process(self, logits, prompt_ids=(), output_ids=()):
        only = torch.full_like(logits, float("-inf"))
        only[self.pick()] = 0.0
        return only


def req(adapter=None, prompt="Tell me a story", n=8, **kw):
    ignore_eos = kw.pop("ignore_eos", True)
    return GenerationRequest(adapter=adapter, prompt=prompt,
                             sampling=SamplingParams(max_new_tokens=n, ignore_eos=ignore_eos, **kw))


def test_alias_move_during_a_run(tiny_registry, tiny_base, tiny_adapter_dirs, engine_factory):
    reg = tiny_registry
    reg.publish(tiny_adapter_dirs["chem"], "law", base=tiny_base.name)  # law@2: other weights
    reg.tag("law@1", "prod")
    engine = engine_factory(reg, tiny_base.name, run_loop=True)
    solo_v1 = engine.generate(req("law@1", n=24), timeout=60).token_ids
    solo_v2 = engine.generate(req("law@2", n=24), timeout=60).token_ids
    assert solo_v1 != solo_v2

    old = engine.submit(req("law@prod", n=24))
    first = next(iter(old))  # it is running
    reg.tag("law@2", "prod")
    new = engine.submit(req("law@prod", n=24))
    assert old.result(60).adapter.version == 1 and old.result().token_ids == solo_v1
    assert first.token_id == solo_v1[0]
    assert new.result(60).adapter.version == 2 and new.result().token_ids == solo_v2
    # "law" means the latest version; a new publish is seen without restart
    reg.publish(tiny_adapter_dirs["bio"], "law", base=tiny_base.name)
    assert engine.generate(req("law", n=2), timeout=60).adapter.version == 3


def test_a_rollback_under_load_serves_the_previous_version_from_the_next_admission(
        tiny_registry, tiny_base, tiny_adapter_dirs, engine_factory):
    """Clients keep calling law@prod while it moves to law@2 and is rolled back: no request
    fails, and every request submitted after the rollback returned is served by law@1."""
    reg = tiny_registry
    reg.publish(tiny_adapter_dirs["chem"], "law", base=tiny_base.name)  # law@2: other weights
    reg.tag("law@1", "prod")
    engine = engine_factory(reg, tiny_base.name, run_loop=True)
    reg.tag("law@2", "prod", reason="new version")
    served: list[tuple[float, int]] = []  # (submitted at, version)
    errors: list[BaseException] = []
    stop = threading.Event()

    def client() -> None:
        while not stop.is_set():
            at = time.monotonic()
            try:
                served.append((at, engine.generate(req("law@prod", n=4), timeout=60).adapter.version))
            except Exception as e:
                errors.append(e)

    def wait_for(enough) -> None:
        deadline = time.monotonic() + 60
        while not enough() and not errors and time.monotonic() < deadline:
            time.sleep(0.01)

    clients = [threading.Thread(target=client) for _ in range(3)]
    for t in clients:
        t.start()
    wait_for(lambda: sum(v == 2 for _, v in served) >= 6)
    rolling_back = time.monotonic()
    reg.rollback("law", "prod", reason="regression")
    rolled_back = time.monotonic()
    wait_for(lambda: sum(at > rolled_back for at, _ in served) >= 6)
    stop.set()
    for t in clients:
        t.join(60)
    assert not errors
    after = [v for at, v in served if at > rolled_back]
    assert len(after) >= 6 and set(after) == {1}, served
    assert {v for at, v in served if at < rolling_back} == {2}


@pytest.fixture(scope="session")
def other_base(tiny_base, session_home, tmp_path_factory):
    """Same tensor shapes as the tiny base, different config: a different fingerprint."""
    src = tmp_path_factory.mktemp("other-base") / "model"
    shutil.copytree(tiny_base.path, src)
    config = json.loads((src / "config.json").read_text())
    config["rms_norm_eps"] = 1e-3
    (src / "config.json").write_text(json.dumps(config))
    info, _ = import_base(Registry(session_home), src, name="tiny-llama-other")
    assert info.fingerprint != tiny_base.fingerprint
    return info


def test_bad_adapters_fail_only_their_own_requests(tiny_registry, tiny_base, other_base, tmp_path,
                                                   engine_factory):
    reg = tiny_registry
    reg.publish(make_lora_adapter(other_base.path, tmp_path / "wb", rank=4, seed=3), "wrongbase",
                base=other_base.name)
    reg.publish(make_lora_adapter(tiny_base.path, tmp_path / "big", rank=32, seed=4), "toobig",
                base=tiny_base.name)
    tampered = reg.publish(make_lora_adapter(tiny_base.path, tmp_path / "tp", rank=4, seed=5), "tampered",
                           base=tiny_base.name)
    weights = Path(tampered.path) / "adapter_model.safetensors"
    os.chmod(weights, 0o644)
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))

    engine = engine_factory(reg, tiny_base.name, run_loop=False)
    good = [("law", "First"), ("med", "Second"), (None, "Third")]
    solo = [engine.generate(req(a, p, 5)).token_ids for a, p in good]

    handles = [engine.submit(req(a, p, 5)) for a, p in good[:2]]
    with pytest.raises(AdapterUnavailableError, match="tampered"):
        engine.submit(req("tampered", "Fourth", 5))
    bad = {name: engine.submit(req(name, "Fifth", 5)) for name in ("wrongbase", "toobig")}
    handles.append(engine.submit(req(*good[2], 5)))
    drive(engine, [*handles, *bad.values()])

    assert [h.result().token_ids for h in handles] == solo
    with pytest.raises(AdapterUnavailableError, match="fingerprint"):
        bad["wrongbase"].result()
    with pytest.raises(AdapterUnavailableError, match="rank 32 exceeds the engine's max_rank 16"):
        bad["toobig"].result()
    with pytest.raises(AdapterUnavailableError):
        list(bad["toobig"])  # the stream raises too
    stats = engine.stats()["adapters"]
    assert stats["toobig@1"]["errors"] == 1 and stats["law@1"]["errors"] == 0
    with pytest.raises(AdapterNotFoundError):
        engine.submit(req("nosuchadapter"))
    with pytest.raises(InvalidRequestError, match="adapter"):
        engine.submit(req("../evil"))


def test_seeded_sampling_is_reproducible_whatever_the_batch(tiny_registry, tiny_base, engine_factory):
    engine = engine_factory(tiny_registry, tiny_base.name, run_loop=False)
    seeded = dict(n=12, temperature=0.9, top_p=0.95, top_k=50, seed=1234)
    alone = engine.generate(req("med", **seeded)).token_ids

    others = [engine.submit(req(a, "Other prompt", 10, temperature=1.0, seed=s))
              for a, s in (("law", 1), (None, 2), ("med", 3))]
    again = engine.submit(req("med", **seeded))
    drive(engine, [*others, again])
    assert again.result().token_ids == alone
    other_seed = engine.generate(req("med", **{**seeded, "seed": 99})).token_ids
    assert other_seed != alone
    greedy = engine.generate(req("med", n=12)).token_ids
    assert greedy != alone, "sampling at temperature 0.9 should leave the greedy path"


def test_stop_strings_cut_the_text_across_tokens(tiny_registry, tiny_base, engine_factory):
    engine = engine_factory(tiny_registry, tiny_base.name, run_loop=False)
    full = engine.generate(req("law", n=16))
    text = full.text
    # a stop string that starts inside one token and ends inside a later one
    pieces = [engine.tokenizer.decode([t]) for t in full.token_ids]
    start = len(pieces[0]) + len(pieces[1]) - 1
    stop = text[start:start + len(pieces[2]) + 2]
    assert len(stop) >= 3
    handle = engine.submit(req("law", n=16, stop=("zzz-never", stop)))
    drive(engine, [handle])
    result = handle.result()
    assert result.finish_reason is FinishReason.STOP
    assert result.text == text[:text.index(stop)]
    assert "".join(e.text for e in handle) == result.text
    assert len(result.token_ids) < len(full.token_ids)


def test_a_steps_tokens_stream_while_the_next_step_runs(tiny_registry, tiny_base, engine_factory):
    """Text and events of step k's tokens go out after step k + 1's forward is launched (on a
    GPU, while it computes); a stop string found then ends its sequence at its token, and the
    token step k + 1 sampled for it is dropped. The last tokens go out with no forward left."""
    engine = engine_factory(tiny_registry, tiny_base.name, run_loop=False)
    full = engine.generate(req("law", n=8))
    stop = engine.tokenizer.decode(full.token_ids[:4])[-2:]  # ends inside the 4th token
    log = []
    forward = engine.runner.forward
    engine.runner.forward = lambda items, *fed: log.append("forward") or forward(items, *fed)
    plain, stopped = engine.submit(req("law", n=8)), engine.submit(req("law", n=8, stop=(stop,)))
    for handle in (plain, stopped):
        emit = handle._emit
        handle._emit = lambda event, h=handle, emit=emit: log.append((h, event.index)) or emit(event)
    drive(engine, [plain, stopped])
    assert plain.result().token_ids == full.token_ids
    for i in range(8):  # the prefill samples token 0; the forward sampling token i + 1 comes before event i
        assert log.index((plain, i)) > [n for n, entry in enumerate(log) if entry == "forward"][min(i + 1, 7)]
    assert log.count("forward") == 8, "no forward after the last sampled token"
    result = stopped.result()
    assert result.finish_reason is FinishReason.STOP and stop not in result.text
    events = [entry for entry in log if isinstance(entry, tuple) and entry[0] is stopped]
    assert len(result.token_ids) == 4 == len(events), "tokens up to the stop, one event each; the next one dropped"


MULTIBYTE = "Grüße aus 東京 🎉🦙 — naïve café, Привет!"


def test_streamed_text_never_splits_characters(tiny_registry, tiny_base, engine_factory):
    engine = engine_factory(tiny_registry, tiny_base.name, run_loop=False)
    ids = engine.tokenizer.encode(MULTIBYTE, add_special_tokens=False)
    pieces = [engine.tokenizer.decode([t]) for t in ids]
    assert any("\ufffd" in p for p in pieces), "the tokenizer splits some characters over tokens"

    handle = engine.submit(req("poem", n=len(ids)))
    engine._seqs[handle.request_id].sampler = ScriptedSampler(iter(ids).__next__)  # the model "says" MULTIBYTE
    drive(engine, [handle])
    chunks = [e.text for e in handle]
    assert all("\ufffd" not in c for c in chunks)
    assert "".join(chunks) == handle.result().text == MULTIBYTE
    assert "" in chunks, "some tokens complete no character and emit nothing"


def test_queue_full_and_validation(tiny_registry, tiny_base, engine_factory):
    engine = engine_factory(tiny_registry, tiny_base.name, run_loop=False, max_queue=2)
    engine.submit(req())
    engine.submit(req())
    with pytest.raises(QueueFullError, match="max_queue=2"):
        engine.submit(req())

    cases = [
        (GenerationRequest(prompt=""), "prompt"),
        (GenerationRequest(), "prompt"),
        (GenerationRequest(prompt="x", messages=(ChatMessage("user", "y"),)), "exactly one"),
        (GenerationRequest(prompt="word " * 400), "max_prompt_tokens"),
        (GenerationRequest(prompt_token_ids=(1, 10**9)), "prompt_token_ids"),
        (GenerationRequest(messages=(ChatMessage("wizard", "hi"),)), r"messages\[0\].role"),
        (GenerationRequest(prompt="x", sampling=SamplingParams(temperature=-1)), "temperature"),
        (GenerationRequest(prompt="x", sampling=SamplingParams(top_p=0)), "top_p"),
        (GenerationRequest(prompt="x", sampling=SamplingParams(top_k=-2)), "top_k"),
        (GenerationRequest(prompt="x", sampling=SamplingParams(max_new_tokens=0)), "max_new_tokens"),
        (GenerationRequest(prompt="x", sampling=SamplingParams(stop=("",))), "stop"),
    ]
    for request, field in cases:
        with pytest.raises(InvalidRequestError, match=field):
            engine.submit(request)
    template, engine.tokenizer.chat_template = engine.tokenizer.chat_template, None
    try:
        with pytest.raises(InvalidRequestError, match="no chat template"):
            engine.submit(GenerationRequest(messages=(ChatMessage("user", "hi"),)))
    finally:
        engine.tokenizer.chat_template = template
    assert engine.stats()["waiting"] == 2, "rejected requests leave the queue untouched"


def test_chat_messages_use_the_template(tiny_registry, tiny_base, engine_factory):
    engine = engine_factory(tiny_registry, tiny_base.name, run_loop=False)
    messages = (ChatMessage("system", "Be brief."), ChatMessage("user", "Hi"))
    chat = engine.generate(GenerationRequest(messages=messages, sampling=SamplingParams(max_new_tokens=3)))
    rendered = engine.tokenizer.apply_chat_template(
        [{"role": m.role, "content": m.content} for m in messages], tokenize=False, add_generation_prompt=True)
    assert chat.prompt_tokens == len(engine.tokenizer.encode(rendered, add_special_tokens=False))
    assert "<|im_start|>assistant" in rendered


def test_cancel_frees_the_sequence(tiny_registry, tiny_base, engine_factory):
    engine = engine_factory(tiny_registry, tiny_base.name, run_loop=True)
    handle = engine.submit(req("law", n=400))
    next(iter(handle))
    handle.cancel()
    result = handle.result(30)
    assert result.finish_reason is FinishReason.CANCELLED and result.completion_tokens < 400
    assert engine.stats()["running"] == 0 and engine.stats()["kv_tokens_reserved"] == 0
    assert not any(r.in_use for r in engine.resident_adapters())
    assert engine.generate(req("law", n=3), timeout=30).completion_tokens == 3


def test_a_failing_request_does_not_kill_the_loop(tiny_registry, tiny_base, engine_factory):
    engine = engine_factory(tiny_registry, tiny_base.name, run_loop=False)
    doomed = engine.submit(req("law", n=5))
    fine = engine.submit(req("med", n=5))

    def explode() -> int:
        raise RuntimeError("sampler exploded")

    engine._seqs[doomed.request_id].sampler = ScriptedSampler(explode)
    drive(engine, [doomed, fine])
    with pytest.raises(Exception, match="sampler exploded"):
        doomed.result()
    assert fine.result().completion_tokens == 5
    assert engine.stats()["kv_tokens_reserved"] == 0


def test_shutdown_drains_then_refuses(tiny_registry, tiny_base, engine_factory):
    engine = engine_factory(tiny_registry, tiny_base.name, run_loop=True)
    handles = [engine.submit(req(a, n=20)) for a in ("law", "med", None)]
    done = threading.Event()
    threading.Thread(target=lambda: (engine.shutdown(drain=True, timeout=60), done.set())).start()
    assert all(h.result(60).completion_tokens == 20 for h in handles)
    assert done.wait(60)
    with pytest.raises(EngineShutdownError):
        engine.submit(req())


def test_load_unload_resident_and_info(tiny_registry, tiny_base, engine_factory):
    engine = engine_factory(tiny_registry, tiny_base.name, run_loop=True, max_slots=3)
    info = engine.info()
    assert (info.base_name, info.base_fingerprint, info.max_slots) == (
        tiny_base.name, tiny_base.fingerprint, 3)

    law = engine.load_adapter("law", pin=True)
    assert law.ref == "law@1"
    device = {r.adapter.ref: r for r in engine.resident_adapters() if r.tier == "device"}
    assert device["law@1"].pinned and device["law@1"].slot is not None
    engine.load_adapter("med", pin=True)
    with pytest.raises(AdapterUnavailableError, match="max_slots - 1"):
        engine.load_adapter("code", pin=True)
    for name in ("code", "chem", "poem", "math"):  # cycles through the one unpinned slot
        engine.generate(req(name, n=2), timeout=60)
    device = {r.adapter.ref for r in engine.resident_adapters() if r.tier == "device"}
    assert {"law@1", "med@1"} <= device, "pinned adapters are never evicted"
    assert engine.unload_adapter("law") is True
    assert "law@1" not in {r.adapter.ref for r in engine.resident_adapters()}
    assert engine.unload_adapter("law") is False
    assert engine.generate(req("law", n=2), timeout=60).adapter.ref == "law@1", "reloads on demand"


def test_the_largest_adapter_loads_into_memory_primed_at_start(registry, tiny_base, tmp_path, engine_factory):
    """Every linear at max rank, read cold: staging and slot layout come from the buffers the
    engine touched when it started, so the pool holds the same bytes after as before."""
    every_linear = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    registry.publish(make_lora_adapter(tiny_base.path, tmp_path / "big", rank=16, targets=every_linear),
                     "big", base=tiny_base.name)
    engine = engine_factory(registry, tiny_base.name, run_loop=True, max_rank=16, load_workers=2)
    pool = engine.adapters.blocks
    primed = pool.free_bytes
    assert primed > 0
    engine.generate(req("big", n=2), timeout=60)
    assert pool.free_bytes == primed, "the cold load allocated new host buffers"


def test_max_new_tokens_beyond_the_context_is_refused_up_front_and_none_fills_it(tiny_registry, tiny_base,
                                                                                 engine_factory):
    """As vLLM and OpenAI: prompt + max_new_tokens > max_model_len is an error before anything
    runs; None (OpenAI chat's default) generates until the context is full."""
    from loradock.runtime.errors import InvalidRequestError

    engine = engine_factory(tiny_registry, tiny_base.name, max_model_len=40, max_prompt_tokens=32)
    prompt = "The capital of France is"
    n = len(engine.tokenizer.encode(prompt))
    with pytest.raises(InvalidRequestError, match=rf"sampling.max_new_tokens: the prompt's {n} tokens \+ "
                                                  rf"{41 - n} new ones exceed max_model_len=40; ask for at most {40 - n}"):
        engine.submit(GenerationRequest(prompt=prompt, sampling=SamplingParams(max_new_tokens=41 - n)))
    fits = engine.generate(GenerationRequest(prompt=prompt, sampling=SamplingParams(max_new_tokens=40 - n,
                                                                                    ignore_eos=True)))
    rest = engine.generate(GenerationRequest(prompt=prompt, sampling=SamplingParams(max_new_tokens=None,
                                                                                    ignore_eos=True)))
    assert len(fits.token_ids) == len(rest.token_ids) == 40 - n
