"""Asynchronous scheduling (`async_scheduling="on"`): each step is planned and launched before
the last step's tokens are read back, its decode tokens read on the device. On CPU nothing runs
beside the host, so what is shown here is the order and that nothing changes: every request gets
the tokens, text, events and finish reason a synchronous engine gives it."""

from __future__ import annotations

import pytest
from loradock.runtime import FinishReason, GenerationRequest, SamplingParams
from loradock.runtime.scheduler import Admission
from loradock.runtime.sequence import PENDING
from loradock.runtime.types import StructuredOutput

from tests.runtime.test_preemption import PROMPTS


def request(adapter, prompt, n=10, **sampling) -> GenerationRequest:
    return GenerationRequest(adapter=adapter, prompt=prompt,
                             sampling=SamplingParams(max_new_tokens=n, **{"ignore_eos": True, **sampling}))


def serve(engine, requests, late=(), cancel_after: int | None = None) -> list:
    """Run `requests` (and `late` ones, submitted after the third step) to the end, stepping by
    hand; the first request is cancelled after `cancel_after` steps. Returns, per request, its
    result and its events."""
    handles = [engine.submit(r) for r in requests]
    steps = 0
    while not all(h.done for h in handles):
        engine.step()
        steps += 1
        if steps == 3:
            handles += [engine.submit(r) for r in late]
        if steps == cancel_after:
            handles[0].cancel()
    assert engine.kv.free_blocks == engine.kv.num_blocks, "every block came back"
    assert not engine.scheduler.running and not engine.scheduler.num_waiting
    return [(h.result(), [(e.index, e.token_id, e.text, e.logprob) for e in h]) for h in handles]


def record_fed(engine) -> list[int]:
    """Counts, per forward, the items whose token was read on the device."""
    fed = []
    forward = engine.runner.forward

    def counting(items, sampled=None):
        fed.append(sum(it.fed_from is not None for it in items))
        assert all(it.tokens[-1] == PENDING for it in items if it.fed_from is not None)
        return forward(items, sampled)

    engine.runner.forward = counting
    return fed


def test_asynchronous_steps_serve_what_synchronous_steps_serve(tiny_registry, tiny_base, engine_factory):
    """Greedy, seeded sampling, penalties, log probabilities, structured outputs, a stop string,
    a stop token, a one-token request and a request arriving mid-run, across adapters and the
    base: the same tokens, text, events and finish reasons either way."""
    sync = engine_factory(tiny_registry, tiny_base.name, run_loop=False, async_scheduling="off")
    greedy = sync.generate(request("law", PROMPTS[0], n=8))
    stop = sync.tokenizer.decode(greedy.token_ids[:4])[-2:]  # ends inside the 4th token
    requests = [
        request("law", PROMPTS[0], n=12), request("med", PROMPTS[1], n=12), request(None, PROMPTS[2], n=9),
        request("chem", PROMPTS[3], temperature=0.8, top_p=0.9, seed=7),
        request("code", PROMPTS[4], repetition_penalty=1.3, presence_penalty=0.5),
        request("med", PROMPTS[5], n=6, logprobs=2),
        request("law", PROMPTS[0], n=8, stop=(stop,)),
        request("law", PROMPTS[0], n=8, stop_token_ids=(greedy.token_ids[2],)),
        request("chem", "The best city is", n=8, structured=StructuredOutput("choice", ("Paris", "Lyon"))),
        request(None, PROMPTS[1], n=1),
    ]
    late = [request("code", PROMPTS[3], n=7), request("law", PROMPTS[5], n=5, temperature=1.0, seed=3)]
    want = serve(sync, requests, late)
    engine = engine_factory(tiny_registry, tiny_base.name, run_loop=False, async_scheduling="on")
    assert engine.async_scheduling and not sync.async_scheduling
    fed = record_fed(engine)
    got = serve(engine, requests, late)
    for (result, events), (want_result, want_events) in zip(got, want, strict=True):
        assert result.token_ids == want_result.token_ids, result.request_id
        assert (result.text, result.finish_reason, result.logprobs) == \
            (want_result.text, want_result.finish_reason, want_result.logprobs)
        assert events == want_events
    reasons = [result.finish_reason for result, _ in got]
    assert reasons[6] is FinishReason.STOP and reasons[7] is FinishReason.STOP
    assert got[9][0].token_ids and len(got[9][0].token_ids) == 1
    assert max(fed) >= 10, "decode steps read their tokens on the device"


def test_a_step_is_launched_before_the_last_steps_tokens_are_read(tiny_registry, tiny_base, engine_factory):
    """The order on the loop: forward k + 1, then the read-back of step k's tokens; a token that
    ends its sequence (a stop token here) had one more computed for it, which is dropped."""
    sync = engine_factory(tiny_registry, tiny_base.name, run_loop=False, async_scheduling="off")
    full = sync.generate(request("law", PROMPTS[0], n=6))
    engine = engine_factory(tiny_registry, tiny_base.name, run_loop=False, async_scheduling="on")
    log = []
    forward, land = engine.runner.forward, engine._land
    engine.runner.forward = lambda items, sampled=None: log.append("forward") or forward(items, sampled)
    engine._land = lambda sampled: log.append("read") or land(sampled)
    plain = engine.submit(request("law", PROMPTS[0], n=6))
    stopped = engine.submit(request("law", PROMPTS[0], n=6, stop_token_ids=(full.token_ids[2],)))
    while not (plain.done and stopped.done):
        engine.step()
    assert plain.result().token_ids == full.token_ids
    assert stopped.result().token_ids == full.token_ids[:3] and stopped.result().finish_reason is FinishReason.STOP
    assert log == ["forward"] + ["forward", "read"] * 5 + ["read"], log
    assert engine.kv.free_blocks == engine.kv.num_blocks


def test_preemption_and_cancellation_with_tokens_in_flight(tiny_registry, tiny_base, engine_factory):
    """A pool too small for six sequences preempts the newest (its token in flight lands after
    it was preempted, and it is readmitted once that token is read), and a request cancelled
    while a token of its is in flight ends cancelled: the same as synchronous steps give."""
    config = dict(kv_cache_tokens=64, kv_block_size=4, max_model_len=64, max_prompt_tokens=32, max_running=6,
                  max_batch_tokens=8)
    names = ["law", "med", None, "code", "law", "chem"]
    requests = [request(name, prompt, n=24) for name, prompt in zip(names, PROMPTS, strict=True)]
    results = {}
    for mode in ("off", "on"):
        engine = engine_factory(tiny_registry, tiny_base.name, run_loop=False, async_scheduling=mode, **config)
        results[mode] = serve(engine, requests, cancel_after=9)
        assert engine.preemptions > 0, "the pool was meant to run dry"
    (cancelled, _), (want, _) = results["on"][0], results["off"][0]
    assert cancelled.finish_reason is want.finish_reason is FinishReason.CANCELLED
    # where the cancel falls depends on the loader threads and, with asynchronous steps, on the
    # token in flight (dropped): either run's tokens are the start of the other's
    shorter = min(len(cancelled.token_ids), len(want.token_ids))
    assert shorter > 0 and cancelled.token_ids[:shorter] == want.token_ids[:shorter]
    for (got, _), (want, _) in zip(results["on"][1:], results["off"][1:], strict=True):
        assert (got.token_ids, got.finish_reason) == (want.token_ids, want.finish_reason)


def test_a_sequence_preempted_with_its_last_token_in_flight_ends(tiny_registry, tiny_base, engine_factory):
    """The pool runs dry while a sequence's token is in flight (preempted here by hand, as the
    scheduler does, and kept waiting a step): the token lands on the waiting sequence; where it
    ends it (a stop token), the sequence leaves the queue with its result, else it is
    readmitted and recomputes."""
    sync = engine_factory(tiny_registry, tiny_base.name, run_loop=False, async_scheduling="off")
    full = sync.generate(request("law", PROMPTS[0], n=6))
    engine = engine_factory(tiny_registry, tiny_base.name, run_loop=False, async_scheduling="on")
    ending = engine.submit(request("law", PROMPTS[0], n=6, stop_token_ids=(full.token_ids[2],)))
    going = engine.submit(request("law", PROMPTS[0], n=6))
    seqs = [engine._seqs[handle.request_id] for handle in (ending, going)]
    while not all(len(seq.output_ids) == 2 for seq in seqs):  # the adapter loads; prefill; a decode step
        engine.step()
    for seq in seqs:  # and token 2 of each is in flight
        assert seq.in_flight == 1 and len(seq.output_ids) == 2
        engine.scheduler._preempt(seq, engine._preempt, {})
    admit = engine._admit
    engine._admit = lambda seq: Admission.WAIT  # the pool stays dry for a step: the tokens land on waiting sequences
    engine.step()
    assert ending.done and not going.done and engine.scheduler.num_waiting == 1
    engine._admit = admit
    while not going.done:
        engine.step()
    while engine.step():  # whatever is left: nothing may run on for an ended sequence
        pass
    assert not engine.scheduler.running and not engine.scheduler.num_waiting
    assert engine.kv.free_blocks == engine.kv.num_blocks
    assert ending.result().token_ids == full.token_ids[:3] and ending.result().finish_reason is FinishReason.STOP
    assert going.result().token_ids == full.token_ids
    assert engine.preemptions == 2


def test_captured_steps_read_tokens_in_flight(tiny_registry, tiny_base, engine_factory):
    """The static steps CUDA graphs replay (run here without capturing, with the paged kernel
    under Triton's interpreter) write the tokens in flight into their persistent inputs on the
    device: greedy tokens equal a synchronous eager engine's."""
    from loradock.runtime.cuda_graphs import StepGraphs

    pytest.importorskip("triton")
    sync = engine_factory(tiny_registry, tiny_base.name, run_loop=False, async_scheduling="off")
    requests = [request(name, prompt, n=5) for name, prompt in zip(["law", None, "med"], PROMPTS[:3], strict=True)]
    want = serve(sync, requests)
    engine = engine_factory(tiny_registry, tiny_base.name, run_loop=False, async_scheduling="on",
                            attention="triton")
    graphs = StepGraphs(engine.runner.model, engine.kv, engine.device, max_batch=4,
                        max_context=engine.max_model_len, capture=False, paged=True, max_tokens=64)
    engine.runner.graphs = graphs
    graphs.use_forward(engine.runner.model_forward, engine.runner.lora_layers)
    fed = record_fed(engine)
    got = serve(engine, requests)
    assert [r.token_ids for r, _ in got] == [r.token_ids for r, _ in want]
    assert graphs.static_steps >= 4 and max(fed) == 3
