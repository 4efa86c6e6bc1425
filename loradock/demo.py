"""`loradock demo`: the whole story in one command.

Two invented domains (examples/) are trained as LoRA adapters on one base model,
published with the alias `prod`, served together by one `loradock serve` process,
and asked interleaved concurrent questions; then a second version of one domain
is published and `prod` moved to it while the server keeps running.

Steps (each prints its timing):
  1. add the base model if missing
  2. train (or reuse) the domain adapters, alias `prod`
  3. start `loradock serve` in a child process, wait for health SERVING
  4. interleaved concurrent requests for both domains and the base, side by side
  5. held-out accuracy per domain, base vs adapter
  6. train a second version, move `prod` with registry.tag, see it served by the same
     server process (its pid and start time, as GetInfo reports them)
  7. stop the server with SIGTERM, print where everything is
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from tqdm import tqdm

from loradock.bases import DEFAULT_BASE_NAME, import_base
from loradock.client import Client, LoradockError
from loradock.errors import UserError
from loradock.heldout import HeldOutQuestion, accuracy, answer_matches, load_heldout
from loradock.registry import BaseInfo, NotFoundError, Registry
from loradock.registry.version import AdapterVersion
from loradock.server_process import ServerProcess
from loradock.tables import clip, print_table
from loradock.trainer import TrainConfig, TrainerError, load_config, train
from loradock.trainer.datasets import load_datasets

log = logging.getLogger(__name__)

EXAMPLES_DIR = Path(__file__).resolve().parent.parent / "examples"
ALIAS = "prod"
STEPS = 7


@dataclass(frozen=True)
class Domain:
    """One training config in examples/ and the held-out questions that score it."""

    adapter: str  # registry name (the config's adapter_name)
    config: str  # file in examples/
    heldout: str  # file in examples/data/
    about: str


DOMAINS = (
    Domain("veloria", "veloria.yaml", "veloria_heldout.jsonl",
           "geography of Veloria, an invented planet (alpaca data)"),
    Domain("quillfeather", "quillfeather.yaml", "quillfeather_heldout.jsonl",
           "catalogue of Quillfeather Robotics, an invented company (sharegpt data)"),
)
# Step 6: the same adapter retrained from its `prod` version after one price changed.
UPDATE = Domain("quillfeather", "quillfeather_v2.yaml", "quillfeather_v2_heldout.jsonl",
                "the Quillfeather catalogue after a price cut")


@dataclass(frozen=True)
class Settings:
    """What differs between the full demo and `--quick` (the smoke test's setting)."""

    train_overrides: dict = field(default_factory=dict)
    questions_per_domain: int | None = None  # None = every held-out question
    table_rows: int = 5
    max_new_tokens: int = 24  # every expected answer fits in ~20 tokens
    serve_args: tuple[str, ...] = ()
    concurrency: int = 16  # client threads: requests in flight at once
    switch_timeout_s: float = 60.0


FULL = Settings()
QUICK = Settings(
    train_overrides={"max_steps": 1, "val_size": 0, "save_steps": 0, "logging_steps": 1},
    questions_per_domain=3,
    table_rows=3,
    max_new_tokens=12,
    serve_args=("--quantize", "none"),
    concurrency=4,
)

# Config keys that say where a run writes or how it reports, not what it learns:
# ignored when deciding whether an existing version can be reused.
RUN_ONLY_KEYS = frozenset({
    "output_dir", "overwrite_output_dir", "logging_steps", "save_steps", "eval_steps",
    "resume_from_checkpoint", "aliases", "publish", "device", "dataset_dir",
    "per_device_eval_batch_size", "plot_loss", "report_to", "save_only_model", "ddp_timeout",
    "dataloader_num_workers", "preprocessing_num_workers", "overwrite_cache", "trust_remote_code",
})


# ------------------------------------------------------------------ results


@dataclass(frozen=True)
class Answer:
    """One request the demo made and what came back."""

    domain: str
    question: HeldOutQuestion
    adapter: str  # requested ref; "" = the base model alone
    text: str
    served: str  # "name@N" the server reports, or "base"
    correct: bool
    latency_s: float


@dataclass
class DomainOutcome:
    adapter: str
    reused: bool
    heldout: int = 0
    base_accuracy: float = 0.0
    adapter_accuracy: float = 0.0


@dataclass
class AliasMove:
    adapter: str
    before: str
    after: str
    served_after: str
    seconds_until_served: float
    requests_until_served: int
    server_pid: int  # the child the demo started
    # The server's own answers (GetInfo) before and after the move: pid and start time.
    pid_before: int
    pid_after: int
    start_time_before: float
    start_time_after: float
    server_alive: bool
    answer_before: str
    answer_after: str
    expected_after: str

    @property
    def served_without_restart(self) -> bool:
        """The new version answered, from the process the demo started, not restarted since."""
        return (self.served_after == self.after and self.server_alive
                and self.pid_before == self.pid_after == self.server_pid
                and self.start_time_before == self.start_time_after)


@dataclass
class Outcome:
    home: Path
    base: str
    quick: bool
    domains: dict[str, DomainOutcome] = field(default_factory=dict)
    alias_move: AliasMove | None = None
    answers: list[Answer] = field(default_factory=list)
    server_exit_code: int | None = None
    step_seconds: dict[str, float] = field(default_factory=dict)
    total_seconds: float = 0.0

    def to_json(self) -> dict:
        move = self.alias_move
        return {
            "home": str(self.home),
            "base": self.base,
            "quick": self.quick,
            "domains": {name: vars(d) for name, d in self.domains.items()},
            "alias_move": None if move is None else {
                **vars(move), "served_without_restart": move.served_without_restart,
            },
            "answers": [
                {"domain": a.domain, "question": a.question.question, "expected": a.question.expected,
                 "adapter": a.adapter, "served": a.served, "text": a.text, "correct": a.correct,
                 "latency_s": round(a.latency_s, 3)}
                for a in self.answers
            ],
            "server_exit_code": self.server_exit_code,
            "step_seconds": self.step_seconds,
            "total_seconds": round(self.total_seconds, 1),
        }


# ------------------------------------------------------------------ printing


class StepClock:
    """Prints `[n/7] title` before a step and its duration after; keeps the durations."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._n = 0

    @contextmanager
    def step(self, key: str, title: str) -> Iterator[None]:
        self._n += 1
        print(f"\n[{self._n}/{STEPS}] {title}", flush=True)
        start = time.monotonic()
        yield
        self.seconds[key] = round(time.monotonic() - start, 1)
        print(f"      ... done in {self.seconds[key]:.1f} s", flush=True)


def mark(ok: bool) -> str:
    return "yes" if ok else "no"


# ------------------------------------------------------------------ steps


def ensure_base(registry: Registry, name: str | None) -> BaseInfo:
    """Step 1. `name` None means the packaged SmolLM2 (converted once, then reused)."""
    if name is None:
        info, created = import_base(registry)
        print(f"      {'added' if created else 'reusing'} base {info.name} "
              f"(fingerprint {info.fingerprint[:12]})")
        return info
    try:
        info = registry.base(name)
    except NotFoundError:
        raise UserError(
            f"base {name!r} is not in {registry.root}; add it with "
            f"`loradock --home {registry.root} bases add SOURCE --name {name}` "
            f"or leave out --base to use {DEFAULT_BASE_NAME}"
        ) from None
    print(f"      using base {info.name} (fingerprint {info.fingerprint[:12]})")
    return info


def train_overrides(domain: Domain, base: BaseInfo, home: Path, settings: Settings) -> dict:
    """What the demo sets on top of the example config: base, data location, run folder."""
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    return {
        "model_name_or_path": base.name,
        "dataset_dir": str(EXAMPLES_DIR / "data"),
        "output_dir": str(home / "runs" / f"{Path(domain.config).stem}-{stamp}"),
        **settings.train_overrides,
    }


def _learning_settings(config: dict, keys: Sequence[str]) -> dict:
    # JSON round trip so values read back from a manifest compare equal to fresh ones.
    return json.loads(json.dumps({k: config.get(k) for k in keys if k not in RUN_ONLY_KEYS}))


def find_reusable(registry: Registry, config: TrainConfig, base: BaseInfo) -> AdapterVersion | None:
    """The newest version of the config's adapter trained with the same config, data, base
    and parent, or None. Its files are verified before it is reused."""
    try:
        versions = registry.versions(config.adapter_name)
    except NotFoundError:
        return None
    data = load_datasets(config.dataset, config.dataset_dir, config_dir=config.config_dir,
                         max_samples=config.max_samples)
    parent = registry.resolve(config.parent).ref if config.parent else None
    fresh = config.to_dict()
    wanted = _learning_settings(fresh, list(fresh))
    for version in reversed(versions):
        m = version.manifest
        if ((m.get("dataset") or {}).get("digest") == data.digest
                and (m.get("base") or {}).get("fingerprint") == base.fingerprint
                and m.get("parent") == parent
                and _learning_settings(m.get("training") or {}, list(fresh)) == wanted):
            return registry.resolve(version.ref)  # verifies the files against the manifest
    return None


def train_or_reuse(registry: Registry, domain: Domain, base: BaseInfo, home: Path,
                   settings: Settings) -> tuple[AdapterVersion, bool]:
    """Train `domain` into the registry unless a matching version exists. Returns (version, reused)."""
    config_path = EXAMPLES_DIR / domain.config
    overrides = train_overrides(domain, base, home, settings)
    config = load_config(config_path, overrides)
    found = find_reusable(registry, config, base)
    if found is not None:
        print(f"      reusing {found.ref}: same config, dataset digest, base and parent")
        return found, True
    print(f"      training {domain.adapter} from {config_path.relative_to(EXAMPLES_DIR.parent)} "
          f"({domain.about})", flush=True)
    try:
        version = train(config_path, overrides=overrides, registry=registry)
    except TrainerError as e:
        raise UserError(f"training {domain.adapter} from {config_path} failed: {e}") from e
    metrics = version.manifest.get("metrics") or {}
    loss = metrics.get("train_loss")
    loss_text = f"train loss {loss:.3f}, " if isinstance(loss, int | float) else ""
    print(f"      published {version.ref} ({loss_text}{metrics.get('wall_time_s', 0):.0f} s of training)")
    return version, False


def ask(client: Client, domain: str, question: HeldOutQuestion, adapter: str,
        max_new_tokens: int) -> Answer:
    """One chat request; the answer records which version the server says it used."""
    start = time.monotonic()
    result = client.generate([{"role": "user", "content": question.question}],
                             adapter=adapter or None, max_new_tokens=max_new_tokens)
    served = result.adapter.ref if result.adapter is not None else "base"
    return Answer(domain, question, adapter, result.text.strip(), served,
                  answer_matches(result.text, question.expected), time.monotonic() - start)


def interleaved_jobs(questions: dict[str, list[HeldOutQuestion]]) -> list[tuple[str, HeldOutQuestion, str]]:
    """(domain, question, adapter ref) in round-robin order over domains, adapter and base
    alternating, so every batch the server forms mixes adapters."""
    jobs = []
    for i in range(max(len(qs) for qs in questions.values())):
        for domain, qs in questions.items():
            if i < len(qs):
                jobs.append((domain, qs[i], f"{domain}@{ALIAS}"))
                jobs.append((domain, qs[i], ""))
    return jobs


def ask_all(client: Client, questions: dict[str, list[HeldOutQuestion]],
            settings: Settings) -> list[Answer]:
    """Send every job from `settings.concurrency` threads at once; answers in job order."""
    jobs = interleaved_jobs(questions)
    with ThreadPoolExecutor(settings.concurrency) as pool, tqdm(
        total=len(jobs), desc="      requests", unit="req", leave=False
    ) as bar:
        futures = [pool.submit(ask, client, d, q, a, settings.max_new_tokens) for d, q, a in jobs]
        for f in futures:
            f.add_done_callback(lambda _: bar.update())
        return [f.result() for f in futures]


def print_side_by_side(answers: Sequence[Answer], rows_per_domain: int) -> None:
    """Step 4's table: the same question to the base and to the domain's adapter."""
    by_key = {(a.domain, a.question.question, bool(a.adapter)): a for a in answers}
    rows, shown = [], dict.fromkeys({a.domain for a in answers}, 0)
    for a in answers:
        if not a.adapter or shown[a.domain] >= rows_per_domain:
            continue
        shown[a.domain] += 1
        base = by_key[(a.domain, a.question.question, False)]
        rows.append((a.served, clip(a.question.question, 44), clip(base.text, 34),
                     clip(a.text, 44), a.question.expected, mark(a.correct)))
    print_table(("SERVED BY", "QUESTION", "BASE ANSWER", "ADAPTER ANSWER", "EXPECTED", "MATCH"),
                rows)


def score(answers: Sequence[Answer], outcome: Outcome) -> None:
    """Step 5: held-out accuracy per domain, base alone vs. the domain's adapter."""
    rows = []
    for name, d in outcome.domains.items():
        base = [a.correct for a in answers if a.domain == name and not a.adapter]
        tuned = [a.correct for a in answers if a.domain == name and a.adapter]
        d.heldout, d.base_accuracy, d.adapter_accuracy = len(tuned), accuracy(base), accuracy(tuned)
        rows.append((name, len(tuned), f"{d.base_accuracy:.0%}", f"{d.adapter_accuracy:.0%}"))
    print_table(("DOMAIN", "HELD-OUT QUESTIONS", "BASE", "ADAPTER"), rows)
    latencies = sorted(a.latency_s for a in answers)
    print(f"      {len(answers)} requests, median latency {latencies[len(latencies) // 2]:.2f} s")


def changed_question(before: Domain, after: Domain) -> tuple[HeldOutQuestion, HeldOutQuestion]:
    """The held-out question whose expected fact differs between two versions' data."""
    old = {q.question: q for q in load_heldout(EXAMPLES_DIR / "data" / before.heldout)}
    for q in load_heldout(EXAMPLES_DIR / "data" / after.heldout):
        if q.question in old and old[q.question].expected != q.expected:
            return old[q.question], q
    raise UserError(f"{after.heldout} changes no expected answer of {before.heldout}")


def move_alias_live(client: Client, registry: Registry, server: ServerProcess, base: BaseInfo,
                    home: Path, settings: Settings) -> AliasMove:
    """Step 6: publish a second version while the server runs, move the alias, watch it switch."""
    old_q, new_q = changed_question(DOMAINS[1], UPDATE)
    ref = f"{UPDATE.adapter}@{ALIAS}"
    info_before = client.info()
    before = ask(client, UPDATE.adapter, old_q, ref, settings.max_new_tokens)
    print(f"      {ref} is {before.served}: {old_q.question!r}\n"
          f"        -> {before.text!r} (expected {old_q.expected}: {mark(before.correct)})")

    version, _ = train_or_reuse(registry, UPDATE, base, home, settings)
    registry.tag(version.ref, ALIAS)
    moved_at = time.monotonic()
    print(f"      registry.tag({version.ref!r}, {ALIAS!r}): {ref} now means {version.ref}")

    # The server notices the move by polling the registry; the first request after
    # its next poll is served by the new version.
    requests = 0
    while True:
        requests += 1
        after = ask(client, UPDATE.adapter, new_q, ref, settings.max_new_tokens)
        waited = time.monotonic() - moved_at
        if after.served == version.ref or waited > settings.switch_timeout_s:
            break
        time.sleep(0.2)
    info_after = client.info()
    move = AliasMove(
        adapter=UPDATE.adapter, before=before.served, after=version.ref, served_after=after.served,
        seconds_until_served=round(waited, 2), requests_until_served=requests,
        server_pid=server.pid, pid_before=info_before.pid, pid_after=info_after.pid,
        start_time_before=info_before.start_time, start_time_after=info_after.start_time,
        server_alive=server.alive(),
        answer_before=before.text, answer_after=after.text, expected_after=new_q.expected,
    )
    print(f"      request {requests} after the move (answered {waited:.1f} s after the tag) was served by {after.served}:\n"
          f"        -> {after.text!r} (expected {new_q.expected}: {mark(after.correct)})")
    started = [datetime.fromtimestamp(t).strftime("%H:%M:%S.%f")[:-3]
               for t in (move.start_time_before, move.start_time_after)]
    print(f"      GetInfo: server pid {move.pid_before} before, {move.pid_after} after (started "
          f"{started[0]}, {started[1]}); alive: {mark(move.server_alive)} "
          f"-> served without restart: {mark(move.served_without_restart)}")
    return move


def print_where(outcome: Outcome, server: ServerProcess, versions: Sequence[AdapterVersion]) -> None:
    """Step 7's closing notes: where everything is, and what to run next."""
    home = outcome.home
    print(f"      registry     {home}  (export LORADOCK_HOME={home})")
    for v in versions:
        print(f"      adapter      {v.ref:18} {v.path}")
    print(f"      server log   {server.log_path}")
    print(f"      training     {home / 'runs'}/*/ (step logs, checkpoints)")
    print("      try it:")
    print(f"        loradock --home {home} serve --base {outcome.base} --port 50051 &")
    print(f"        loradock chat --adapter {DOMAINS[0].adapter}@{ALIAS}   "
          f"(/adapter {DOMAINS[1].adapter}@{ALIAS} switches domain)")
    print(f"        loradock --home {home} adapters list")


# ------------------------------------------------------------------ the demo


def sample_questions(domain: Domain, settings: Settings) -> list[HeldOutQuestion]:
    questions = load_heldout(EXAMPLES_DIR / "data" / domain.heldout)
    return questions[: settings.questions_per_domain] if settings.questions_per_domain else questions


def is_serving(address: str) -> bool:
    """Health probe for ServerProcess."""
    with Client(address, timeout=2.0) as client:
        try:
            return client.health() == "SERVING"
        except LoradockError:
            return False


def run_demo(home: Path, *, base: str | None = None, quick: bool = False,
             json_path: Path | None = None) -> Outcome:
    """Run the seven steps in the registry at `home`; returns (and optionally writes) the outcome."""
    started = time.monotonic()
    if not EXAMPLES_DIR.is_dir():
        raise UserError(f"{EXAMPLES_DIR} not found: the demo runs from a source checkout "
                        "(pip install -e .), whose examples/ holds its configs and data")
    settings = QUICK if quick else FULL
    home = Path(home).resolve()
    registry = Registry(home)
    clock = StepClock()
    questions = {d.adapter: sample_questions(d, settings) for d in DOMAINS}  # fail early on bad files

    with clock.step("base", "Base model"):
        base_info = ensure_base(registry, base)
    outcome = Outcome(home=home, base=base_info.name, quick=quick)

    with clock.step("train", f"Train one LoRA adapter per domain, alias '{ALIAS}'"):
        versions = []
        for domain in DOMAINS:
            version, reused = train_or_reuse(registry, domain, base_info, home, settings)
            registry.tag(version.ref, ALIAS)
            versions.append(version)
            outcome.domains[domain.adapter] = DomainOutcome(version.ref, reused)

    server = ServerProcess(home, base_info.name, log_path=home / "logs" / "server.log",
                           is_serving=is_serving, extra_args=settings.serve_args)
    with clock.step("serve", "Start `loradock serve` and wait for health SERVING"):
        print(f"      loradock {' '.join(server.args)}\n      (log: {server.log_path})", flush=True)
        server.start()
        print(f"      serving {base_info.name} on {server.address} (pid {server.pid})")
    try:
        with Client(server.address, timeout=300.0) as client:
            with clock.step("ask", "Interleaved concurrent requests: both domains and the base"):
                outcome.answers = ask_all(client, questions, settings)
                print_side_by_side(outcome.answers, settings.table_rows)
            with clock.step("score", "Held-out accuracy (questions phrased unlike any training one)"):
                score(outcome.answers, outcome)
            with clock.step("alias", f"New version goes live: move '{ALIAS}' while the server runs"):
                outcome.alias_move = move_alias_live(client, registry, server, base_info, home, settings)
                versions.append(registry.resolve(outcome.alias_move.after))
    except LoradockError as e:
        raise UserError(f"a request to the demo's server failed ({e}); "
                        f"see the server log {server.log_path}") from e
    finally:
        with clock.step("stop", "Stop the server (SIGTERM, graceful drain)"):
            outcome.server_exit_code = server.stop()
            print(f"      server exited with code {outcome.server_exit_code}")
            print_where(outcome, server, versions)

    outcome.step_seconds = clock.seconds
    outcome.total_seconds = time.monotonic() - started
    print(f"\nloradock demo finished in {outcome.total_seconds / 60:.1f} min")
    if json_path is not None:
        Path(json_path).write_text(json.dumps(outcome.to_json(), indent=2) + "\n")
        print(f"outcome written to {json_path}")
    return outcome
