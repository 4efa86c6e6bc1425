"""Which grammar library constrains structured outputs: llguidance against xgrammar on the served
tokenizer, a JSON schema's compile time and the per-step cost of the allowed-token masks of a
batch of 32 requests walking a valid answer, medians of interleaved rounds. Run by hand; the
table goes to docs/architecture.md ("Structured outputs").

    .venv/bin/python -m loradock.benchmarks.grammar_masks --base-path DIR [--batch 32]
(xgrammar is not a dependency: `pip install xgrammar` first to compare.)
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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base-path", type=Path, required=True, help="Hugging Face model directory of the base")
    p.add_argument("--batch", type=int, default=32, help="requests constrained in one step")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds")
    args = p.parse_args()
    torch.set_num_threads(1)
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
