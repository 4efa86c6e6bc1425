"""`loradock adapters eval`: held-out questions through the engine, scored, recorded beside the version.

The demo's held-out scoring, generalised: any held-out file (see `heldout.py`), any metric of
`heldout.score_answer`, the version's answers and, with `base_compare`, the base model's on the
same questions, all greedy and in one continuous batch of an in-process engine on the version's
base, served as `loradock serve` would serve it. The record (`registry.EvalRecord`) names the
dataset by its sha256 so a score is never mistaken for one on other data.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from loradock.heldout import HeldOutQuestion, check_patterns, load_heldout, score_answer
from loradock.registry import AdapterVersion, EvalRecord, Registry
from loradock.registry.fsutil import sha256_file
from loradock.runtime import ChatMessage, Engine, EngineConfig, GenerationRequest, SamplingParams


@dataclass(frozen=True)
class ScoredAnswer:
    question: HeldOutQuestion
    answer: str
    score: float
    base_answer: str | None = None
    base_score: float | None = None


@dataclass(frozen=True)
class Evaluation:
    version: AdapterVersion
    record: EvalRecord  # as kept in the registry
    answers: list[ScoredAnswer]


def answer_all(engine: Engine, jobs: Sequence[tuple[str | None, HeldOutQuestion]], max_new_tokens: int) -> list[str]:
    """Greedy answers to (adapter or None for the base, question) jobs, each question one user
    turn, all submitted at once so the engine batches them."""
    handles = [engine.submit(GenerationRequest(
        adapter=adapter, messages=(ChatMessage("user", q.question),),
        sampling=SamplingParams(max_new_tokens=max_new_tokens))) for adapter, q in jobs]
    return [h.result().text.strip() for h in tqdm(handles, desc="  answers", unit="q", leave=False)]


def evaluate(registry: Registry, ref: str, data: Path, metric: str, base_compare: bool = False,
             max_new_tokens: int = 64, **engine_settings) -> Evaluation:
    """Score the version `ref` means on the held-out file `data` and record the result beside it.
    `engine_settings` are EngineConfig fields (quantize, device, ...); the base is the version's."""
    version = registry.resolve(ref)  # files checked before anything runs
    questions = load_heldout(data)
    if metric == "regex":
        check_patterns(questions)
    digest = sha256_file(Path(data))
    engine = Engine(EngineConfig(base=version.manifest["base"]["name"], **engine_settings), registry).start()
    try:
        adapters = [version.ref, *([None] if base_compare else [])]
        answers = answer_all(engine, [(a, q) for a in adapters for q in questions], max_new_tokens)
        answers, base_answers = answers[:len(questions)], answers[len(questions):] or [None] * len(questions)
        settings = {"max_new_tokens": max_new_tokens, "quantize": engine.config.quantize,
                    "dtype": str(engine.dtype).removeprefix("torch."), "device": str(engine.device)}
    finally:
        engine.shutdown(drain=False)
    scored = [ScoredAnswer(q, a, score_answer(metric, a, q.expected), b,
                           None if b is None else score_answer(metric, b, q.expected))
              for q, a, b in zip(questions, answers, base_answers, strict=True)]
    mean = sum(s.score for s in scored) / len(scored)
    base_mean = sum(s.base_score for s in scored) / len(scored) if base_compare else None
    record = registry.record_eval(version.ref, EvalRecord(
        metric=metric, score=mean, examples=len(scored), dataset=Path(data).name, dataset_digest=digest,
        base_score=base_mean, settings=settings))
    return Evaluation(version, record, scored)
