"""Which grammar library constrains structured outputs: llguidance against xgrammar on the served
tokenizer, a JSON schema's compile time and the per-step cost of the allowed-token masks of a
batch of 32 requests walking a valid answer, medians of interleaved rounds. Run by hand; the
table goes to docs/architecture.md ("Structured outputs").

With `--engine`, instead: structured against free output end to end, an in-process engine on
the base (NF4, as `loradock serve` loads it; CPU, one torch thread) decoding `--batch` requests
at once, free (greedy, exactly `--max-tokens` tokens) and held to the same JSON schema, the
prompts identical, in interleaved rounds: tokens/s, time per generated token (a constrained
request ends when its JSON does, so totals differ) and the median step with the whole batch
decoding.

    .venv/bin/python -m loradock.benchmarks.grammar_masks --base-path DIR [--batch 32]
    .venv/bin/python -m loradock.benchmarks.grammar_masks --base-path DIR --engine [--max-tokens 48]
(llguidance is not a dependency: `pip install llguidance` first to compare.)
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string"}, "age": {"type": "integer"}, "tags": {"type": "array", "items": {"type": "string"}},
    "address": {"type": "object", "properties": {"city": {"type": "string"}, "zip": {"type": "string"}},
                "required": ["city", "zip"]}},
    "required": ["name", "age", "tags", "address"]}
ANSWER = json.dumps({"name": "Ines Vantomme", "age": 41, "tags": ["robotics", "design", "mops"],
                     "address": {"city": "Kelvaris", "zip": "40213"}})


def llguidance_run(tokenizer, vocab: int, batch: int, steps: list[int]) -> dict:
    import llguidance
    import llguidance.hf
    import llguidance.torch as lt

    started = time.perf_counter()
    ll_tokenizer = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab)
    tokenizer_s = time.perf_counter() - started
    started = time.perf_counter()
    grammar = llguidance.LLMatcher.grammar_from_json_schema(SCHEMA)
    matchers = [llguidance.LLMatcher(ll_tokenizer, grammar) for _ in range(batch)]
    compile_s = time.perf_counter() - started
    mask = lt.allocate_token_bitmask(batch, vocab)
    executor = llguidance.LLExecutor()
    times = []
    for token in steps:
        started = time.perf_counter()
        lt.fill_next_token_bitmask_par(executor, [(m, i) for i, m in enumerate(matchers)], mask)
        times.append(time.perf_counter() - started)
        for m in matchers:
            assert m.consume_token(token), m.get_error()
    return {"tokenizer_ms": tokenizer_s * 1e3, "compile_ms": compile_s * 1e3,
            "mask_ms_per_step": statistics.median(times) * 1e3}


def xgrammar_run(tokenizer, vocab: int, batch: int, steps: list[int]) -> dict:
    import xgrammar as xgr

    started = time.perf_counter()
    info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab)
    compiler = xgr.GrammarCompiler(info)
    tokenizer_s = time.perf_counter() - started
    started = time.perf_counter()
    compiled = compiler.compile_json_schema(json.dumps(SCHEMA))
    matchers = [xgr.GrammarMatcher(compiled) for _ in range(batch)]
    compile_s = time.perf_counter() - started
    mask = xgr.allocate_token_bitmask(batch, vocab)
    times = []
    for token in steps:
        started = time.perf_counter()
        for i, m in enumerate(matchers):
            m.fill_next_token_bitmask(mask, i)
        times.append(time.perf_counter() - started)
        for m in matchers:
            assert m.accept_token(token)
    return {"tokenizer_ms": tokenizer_s * 1e3, "compile_ms": compile_s * 1e3,
            "mask_ms_per_step": statistics.median(times) * 1e3}


def engine_mask_run(tokenizer, vocab: int, batch: int, steps: list[int]) -> dict:
    """What the engine does per step (runtime/structured.py): fill every constrained request's
    mask and apply it to its logits row, on a step's [batch, vocab] float32 logits."""
    from loradock.runtime.structured import Grammars, mask_rows
    from loradock.runtime.types import StructuredOutput

    grammars = Grammars(tokenizer, vocab, [tokenizer.eos_token_id])
    constraint = StructuredOutput("json_schema", json.dumps(SCHEMA))
    matchers = [grammars.matcher(constraint) for _ in range(batch)]
    logits = torch.randn(batch, vocab)
    times = []
    for token in steps:
        started = time.perf_counter()
        mask_rows(logits, range(batch), matchers)
        times.append(time.perf_counter() - started)
        for m in matchers:
            assert m.accept_token(token)
    return {"mask_and_apply_ms_per_step": statistics.median(times) * 1e3}


PROMPT = ("Make up person number {i}: their name, age, a few tags and their address (city and zip). "
          "Answer in JSON.")


def engine_round(engine, batch: int, max_tokens: int, structured: bool) -> dict:
    """`batch` requests submitted at once to an engine started with run_loop=False, driven step
    by step here until all are done: wall and process CPU time, generated tokens, and the
    steps taken while every request was decoding (no prompt chunk in the step, none finished)."""
    from loradock.runtime import ChatMessage, GenerationRequest, SamplingParams, StructuredOutput
    from loradock.runtime.sequence import SeqStatus

    constraint = StructuredOutput("json_schema", json.dumps(SCHEMA)) if structured else None
    started, cpu = time.perf_counter(), time.process_time()
    handles = [engine.submit(GenerationRequest(
        messages=(ChatMessage("user", PROMPT.format(i=i)),),
        sampling=SamplingParams(max_new_tokens=max_tokens, ignore_eos=True, structured=constraint)))
        for i in range(batch)]
    seqs = [engine._seqs[h.request_id] for h in handles]
    decode_steps = []
    while not all(h.done for h in handles):
        full = all(s.status is SeqStatus.RUNNING and not s.in_prefill for s in seqs)
        step_started = time.perf_counter()
        if not engine.step():
            time.sleep(0.001)
        elif full:
            decode_steps.append(time.perf_counter() - step_started)
    wall, cpu = time.perf_counter() - started, time.process_time() - cpu
    results = [h.result() for h in handles]
    tokens = sum(r.completion_tokens for r in results)
    complete = 0
    for r in results:
        try:
            json.loads(r.text)
            complete += 1
        except ValueError:
            pass
    return {"wall_s": wall, "tokens": tokens, "tokens_per_s": tokens / wall, "ms_per_token": wall / tokens * 1e3,
            "cpu_ms_per_token": cpu / tokens * 1e3, "json_answers": complete,
            "decode_step_ms": statistics.median(decode_steps) * 1e3 if decode_steps else float("nan"),
            "decode_steps": len(decode_steps)}


def engine_run(base_path: Path, batch: int, max_tokens: int, rounds: int) -> dict:
    """Free against structured output through the engine, interleaved rounds (the order flips
    each round), medians; the ratios are the medians of the rounds' ratios. The prefix cache is
    off so that neither run reuses the other's prompts."""
    from loradock.runtime import Engine, EngineConfig

    config = EngineConfig(base=str(base_path), quantize="nf4", device="cpu", cpu_threads=1, max_running=batch,
                          max_batch_tokens=max(512, batch), max_queue=2 * batch, prefix_caching=False)
    engine = Engine(config).start(run_loop=False)
    try:
        for structured in (False, True):  # warm-up: first steps, the schema compiled (then cached)
            engine_round(engine, batch, 4, structured)
        runs: dict[str, list[dict]] = {"free": [], "structured": []}
        for r in range(rounds):
            for structured in ((False, True) if r % 2 == 0 else (True, False)):
                runs["structured" if structured else "free"].append(
                    engine_round(engine, batch, max_tokens, structured))
    finally:
        engine.shutdown(drain=False)
    median = statistics.median
    result = {name: {k: round(median(x[k] for x in rs), 2) for k in rs[0]} for name, rs in runs.items()}
    pairs = list(zip(runs["free"], runs["structured"], strict=True))
    result["structured_over_free"] = {
        k: round(median(s[k] / f[k] for f, s in pairs), 3)
        for k in ("ms_per_token", "cpu_ms_per_token", "decode_step_ms")}
    result["ms_per_token_by_round"] = {name: [round(x["ms_per_token"], 2) for x in rs] for name, rs in runs.items()}
    return {"batch": batch, "max_tokens": max_tokens, "rounds": rounds, "quantize": config.quantize,
            "threads": torch.get_num_threads(), **result}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base-path", type=Path, required=True, help="Hugging Face model directory of the base")
    p.add_argument("--batch", type=int, default=32, help="requests constrained in one step")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds")
    p.add_argument("--engine", action="store_true",
                   help="instead: structured against free output through an in-process engine")
    p.add_argument("--max-tokens", type=int, default=48, help="with --engine: tokens per request at most")
    args = p.parse_args()
    torch.set_num_threads(1)
    if args.engine:
        print(json.dumps(engine_run(args.base_path, args.batch, args.max_tokens, args.rounds), indent=2))
        return
    from transformers import AutoConfig, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.base_path)
    vocab = AutoConfig.from_pretrained(args.base_path).vocab_size
    steps = tokenizer.encode(ANSWER, add_special_tokens=False)
    runs: dict[str, list[dict]] = {}
    for _ in range(args.rounds):
        for name, run in (("llguidance", llguidance_run), ("xgrammar", xgrammar_run),
                          ("loradock (xgrammar, fill + apply)", engine_mask_run)):
            try:
                runs.setdefault(name, []).append(run(tokenizer, vocab, args.batch, steps))
            except ImportError as e:
                runs[name] = [{"error": str(e)}]
    result = {name: {k: round(statistics.median(r[k] for r in rs), 2) for k in rs[0]} if "error" not in rs[0]
              else rs[0] for name, rs in runs.items()}
    print(json.dumps({"batch": args.batch, "steps": len(steps), "vocab": vocab, "libraries": result}, indent=2))


if __name__ == "__main__":
    main()
