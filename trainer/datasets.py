"""Datasets in, normalized conversations out.

Reads alpaca and sharegpt records (sharegpt's `conversations` with from/value,
or OpenAI-style `messages` with role/content) from JSON lists or JSONL files,
named directly or through LLaMA-Factory's `dataset_info.json`. Every record
becomes a list of `{"role": "system"|"user"|"assistant", "content": str}`.
Every bad record is reported (file, line or record index, field) in one error;
exact duplicates are dropped and counted; the digest is sha256 over the
normalized records, so the same data in another file layout has the same digest.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from loradock.registry.fsutil import sha256_file

from .errors import DatasetError, problems_message

Message = dict[str, str]
Conversation = list[Message]

ALPACA_COLUMNS = {"prompt": "instruction", "query": "input", "response": "output",
                  "system": "system", "history": "history"}
SHAREGPT_COLUMNS = {"messages": "conversations", "system": "system"}
SHAREGPT_TAGS = {"role_tag": "from", "content_tag": "value", "user_tag": "human",
                 "assistant_tag": "gpt", "system_tag": "system"}
OPENAI_COLUMNS = {"messages": "messages", "system": "system"}
OPENAI_TAGS = {"role_tag": "role", "content_tag": "content", "user_tag": "user",
               "assistant_tag": "assistant", "system_tag": "system"}
HUB_KEYS = ("hf_hub_url", "ms_hub_url", "om_hub_url", "script_url", "cloud_file_name")
SUFFIXES = (".json", ".jsonl")


@dataclass(frozen=True)
class DatasetSpec:
    """Where one dataset's records live and how their fields map onto conversations."""

    name: str
    files: tuple[Path, ...]
    formatting: str | None  # "alpaca", "sharegpt", or None = detect per record
    columns: dict = field(default_factory=dict)
    tags: dict = field(default_factory=dict)


@dataclass
class LoadedDatasets:
    """Normalized, deduplicated conversations with what is needed to describe them."""

    conversations: list[Conversation]
    digest: str
    duplicates_dropped: int
    files: list[dict]  # [{"dataset", "path", "sha256", "records"}]

    def summary(self) -> dict:
        return {
            "digest": self.digest,
            "records": len(self.conversations),
            "duplicates_dropped": self.duplicates_dropped,
            "files": self.files,
        }


def load_datasets(
    names: list[str], dataset_dir: str | Path, *, config_dir: Path | None = None,
    max_samples: int | None = None,
) -> LoadedDatasets:
    """Load, validate and deduplicate the named datasets (see module docstring)."""
    specs = [resolve_dataset(n, dataset_dir, config_dir) for n in names]
    problems: list[str] = []
    conversations: list[Conversation] = []
    files: list[dict] = []
    for spec in specs:
        taken = 0
        for path in spec.files:
            count = 0
            for where, record in read_records(path, problems):
                if max_samples is not None and taken >= max_samples:
                    break
                taken += 1
                count += 1
                conv = normalize(record, spec, where, problems)
                if conv is not None:
                    conversations.append(conv)
            files.append({"dataset": spec.name, "path": str(path), "sha256": sha256_file(path),
                          "records": count})
    if problems:
        raise DatasetError(problems_message("bad dataset records; nothing was trained", problems))
    if not conversations:
        raise DatasetError(f"dataset {','.join(names)}: no records found")
    unique, dropped = deduplicate(conversations)
    return LoadedDatasets(unique, digest(unique), dropped, files)


def resolve_dataset(name: str, dataset_dir: str | Path, config_dir: Path | None = None) -> DatasetSpec:
    """A dataset by its name in dataset_info.json, else as a file or folder path."""
    roots = [Path(dataset_dir)]
    if config_dir is not None and not Path(dataset_dir).is_absolute():
        roots.append(config_dir / dataset_dir)
    for root in roots:
        info_path = root / "dataset_info.json"
        if info_path.is_file():
            info = _read_info(info_path)
            if name in info:
                return _spec_from_info(name, info[name], root, info_path)
    # A file or folder named directly: in dataset_dir, else as given (from the working
    # directory, then from the config file's folder).
    candidates = [root / name for root in roots] + [Path(name)]
    if config_dir is not None and not Path(name).is_absolute():
        candidates.append(config_dir / name)
    for path in candidates:
        if path.exists():
            return DatasetSpec(name, _data_files(path), None)
    tried = ", ".join(dict.fromkeys(str(p) for p in candidates))
    known = []
    for root in roots:
        if (root / "dataset_info.json").is_file():
            known = sorted(_read_info(root / "dataset_info.json"))
            break
    known_text = f"; dataset_info.json names: {', '.join(known)}" if known else ""
    raise DatasetError(f"dataset {name!r}: no such dataset name or file (looked for {tried}){known_text}")


def read_records(path: Path, problems: list[str]) -> Iterator[tuple[str, object]]:
    """Yield (location, record) from a JSON list or JSONL file; unreadable lines go to `problems`."""
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json" and text.lstrip().startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as e:
            problems.append(f"{path} line {e.lineno} column {e.colno}: not valid JSON ({e.msg})")
            return
        for i, record in enumerate(records):
            yield f"{path} record {i}", record
        return
    if path.suffix == ".json" and text.lstrip().startswith("{") and _is_single_object(text):
        problems.append(f"{path}: expected a JSON list of records or JSON Lines, found one JSON object")
        return
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            problems.append(f"{path} line {lineno}: not valid JSON ({e.msg})")
            continue
        yield f"{path} line {lineno}", record


def normalize(record: object, spec: DatasetSpec, where: str, problems: list[str]) -> Conversation | None:
    """One record as a conversation, or None after adding its problems to `problems`."""
    if not isinstance(record, dict):
        problems.append(f"{where}: expected a JSON object, got {type(record).__name__}")
        return None
    formatting = spec.formatting or detect_format(record)
    if formatting is None:
        problems.append(
            f"{where}: unknown record format (expected alpaca 'instruction'/'output', "
            "sharegpt 'conversations' or OpenAI 'messages'; found fields "
            f"{', '.join(sorted(record)) or 'none'})"
        )
        return None
    before = len(problems)
    if formatting == "alpaca":
        conv = _from_alpaca(record, {**ALPACA_COLUMNS, **spec.columns}, where, problems)
    else:
        openai_style = spec.formatting is None and "messages" in record
        columns = {**(OPENAI_COLUMNS if openai_style else SHAREGPT_COLUMNS), **spec.columns}
        tags = {**(OPENAI_TAGS if openai_style else SHAREGPT_TAGS), **spec.tags}
        conv = _from_sharegpt(record, columns, tags, where, problems)
    return conv if len(problems) == before else None


def detect_format(record: dict) -> str | None:
    if "conversations" in record or "messages" in record:
        return "sharegpt"
    if "instruction" in record or "output" in record:
        return "alpaca"
    return None


def deduplicate(conversations: list[Conversation]) -> tuple[list[Conversation], int]:
    """Drop exact duplicates (keeping the first); return (unique, number dropped)."""
    seen: set[str] = set()
    unique = []
    for conv in conversations:
        key = _canonical(conv)
        if key not in seen:
            seen.add(key)
            unique.append(conv)
    return unique, len(conversations) - len(unique)


def digest(conversations: list[Conversation]) -> str:
    """sha256 over the normalized conversations, one canonical JSON line each, in order."""
    h = hashlib.sha256()
    for conv in conversations:
        h.update(_canonical(conv).encode())
        h.update(b"\n")
    return h.hexdigest()


def split(
    conversations: list[Conversation], val_size: float, seed: int
) -> tuple[list[Conversation], list[Conversation]]:
    """Seeded (train, validation) split; val_size is a fraction in (0, 1) or a record count.

    The draw is LLaMA-Factory's (`datasets.Dataset.train_test_split(test_size, seed=seed)`):
    a fraction is rounded up to whole records, the records are permuted with
    `numpy.random.default_rng(seed)`, the first ones of the permutation are held out and
    both splits keep the permutation's order, so the same data and seed hold out the same
    records in both tools.
    """
    if val_size <= 0:
        return list(conversations), []
    n = len(conversations)
    n_val = int(val_size) if val_size >= 1 else math.ceil(n * val_size)
    if n_val >= n:
        raise DatasetError(f"val_size {val_size:g} leaves no training records (only {n} records)")
    order = np.random.default_rng(seed).permutation(n).tolist()
    return [conversations[i] for i in order[n_val:]], [conversations[i] for i in order[:n_val]]


# --- record formats -------------------------------------------------------------------------


def _from_alpaca(record: dict, cols: dict, where: str, problems: list[str]) -> Conversation:
    def text(key: str, required: bool) -> str:
        column = cols.get(key)
        value = record.get(column) if column else None
        if value is None:
            if required:
                problems.append(f"{where}: field {column!r}: missing")
            return ""
        if not isinstance(value, str):
            problems.append(f"{where}: field {column!r}: expected a string, got {type(value).__name__}")
            return ""
        if required and not value.strip():
            problems.append(f"{where}: field {column!r}: empty")
        return value

    instruction, query = text("prompt", True), text("query", False)
    response, system = text("response", True), text("system", False)
    conv: Conversation = [{"role": "system", "content": system}] if system else []
    history_col = cols.get("history")
    history = record.get(history_col) if history_col else None
    if history is not None:
        if not isinstance(history, list):
            problems.append(f"{where}: field {history_col!r}: expected a list of [question, answer] pairs")
            history = []
        for i, pair in enumerate(history):
            if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(s, str) and s for s in pair)):
                problems.append(f"{where}: field '{history_col}[{i}]': expected [question, answer], two non-empty strings")
                continue
            conv += [{"role": "user", "content": pair[0]}, {"role": "assistant", "content": pair[1]}]
    prompt = f"{instruction}\n{query}" if query else instruction
    return [*conv, {"role": "user", "content": prompt}, {"role": "assistant", "content": response}]


def _from_sharegpt(record: dict, cols: dict, tags: dict, where: str, problems: list[str]) -> Conversation:
    column = cols["messages"]
    messages = record.get(column)
    if not isinstance(messages, list) or not messages:
        what = "missing" if messages is None else "expected a non-empty list of messages"
        problems.append(f"{where}: field {column!r}: {what}")
        return []
    roles = {tags["user_tag"]: "user", tags["assistant_tag"]: "assistant", tags["system_tag"]: "system"}
    conv: Conversation = []
    before = len(problems)
    system = record.get(cols.get("system") or "")
    if system is not None and cols.get("system") in record:
        if isinstance(system, str):
            if system:
                conv.append({"role": "system", "content": system})
        else:
            problems.append(f"{where}: field {cols['system']!r}: expected a string")
    for i, msg in enumerate(messages):
        field_name = f"{column}[{i}]"
        if not isinstance(msg, dict):
            problems.append(f"{where}: field {field_name!r}: expected an object")
            continue
        role_value, content = msg.get(tags["role_tag"]), msg.get(tags["content_tag"])
        role = roles.get(role_value)
        if role is None:
            allowed = ", ".join(repr(t) for t in roles)
            problems.append(f"{where}: field '{field_name}.{tags['role_tag']}': {role_value!r} is not one of {allowed}")
            continue
        if not isinstance(content, str) or not content.strip():
            problems.append(f"{where}: field '{field_name}.{tags['content_tag']}': expected a non-empty string")
            continue
        if role == "system" and conv:
            problems.append(f"{where}: field {field_name!r}: a system message may only come first")
            continue
        expected = "assistant" if conv and conv[-1]["role"] == "user" else "user"
        if role != "system" and role != expected:
            article = "an" if expected == "assistant" else "a"
            problems.append(
                f"{where}: field {field_name!r}: expected {article} {expected} turn (turns alternate user, assistant)"
            )
            continue
        conv.append({"role": role, "content": content})
    # Only when the messages themselves were fine, so one mistake is not reported twice.
    if len(problems) == before and conv and conv[-1]["role"] != "assistant":
        problems.append(f"{where}: field {column!r}: the last message must be an assistant turn")
    return conv


# --- dataset_info.json ------------------------------------------------------------------------


def _read_info(path: Path) -> dict:
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DatasetError(f"{path} line {e.lineno} column {e.colno}: not valid JSON ({e.msg})") from e
    if not isinstance(info, dict):
        raise DatasetError(f"{path}: expected an object mapping dataset names to entries")
    return info


def _spec_from_info(name: str, entry: object, root: Path, info_path: Path) -> DatasetSpec:
    where = f"{info_path} entry {name!r}"
    if not isinstance(entry, dict):
        raise DatasetError(f"{where}: expected an object")
    hub = [k for k in HUB_KEYS if k in entry]
    if hub and "file_name" not in entry:
        raise DatasetError(f"{where}: {hub[0]} is not supported (loradock trains offline); use file_name")
    if entry.get("ranking"):
        raise DatasetError(f"{where}: ranking (preference) datasets are not supported; loradock trains sft only")
    columns = entry.get("columns", {})
    media = [k for k in ("images", "videos", "audios") if isinstance(columns, dict) and k in columns]
    if media:
        raise DatasetError(f"{where}: columns {', '.join(media)}: multimodal datasets are not supported; "
                           "loradock trains on text conversations")
    if isinstance(columns, dict) and "kto_tag" in columns:
        raise DatasetError(f"{where}: columns kto_tag: KTO datasets are not supported; loradock trains sft only")
    if "num_samples" in entry:
        raise DatasetError(f"{where}: num_samples (random resampling) is not supported; "
                           "use max_samples in the training config to take the first N records")
    if "file_name" not in entry:
        raise DatasetError(f"{where}: field 'file_name': missing")
    formatting = entry.get("formatting", "alpaca")
    if formatting not in ("alpaca", "sharegpt"):
        raise DatasetError(f"{where}: field 'formatting': {formatting!r} is not 'alpaca' or 'sharegpt'")
    for key in ("columns", "tags"):
        value = entry.get(key, {})
        if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
            raise DatasetError(f"{where}: field {key!r}: expected an object of name: string")
    if formatting == "sharegpt" and entry.get("tags", {}).get("role_tag") == "role":
        base_tags = OPENAI_TAGS
    else:
        base_tags = SHAREGPT_TAGS
    path = root / entry["file_name"]
    if not path.exists():
        raise DatasetError(f"{where}: field 'file_name': {path} does not exist")
    tags = {**base_tags, **entry.get("tags", {})} if formatting == "sharegpt" else {}
    return DatasetSpec(name, _data_files(path), formatting, dict(entry.get("columns", {})), tags)


def _data_files(path: Path) -> tuple[Path, ...]:
    if path.is_dir():
        files = tuple(sorted(p for p in path.iterdir() if p.suffix in SUFFIXES))
        if not files:
            raise DatasetError(f"{path}: folder holds no .json or .jsonl files")
        return files
    if path.suffix not in SUFFIXES:
        raise DatasetError(f"{path}: unsupported file type {path.suffix!r}; use JSON (a list) or JSONL")
    return (path,)


def _is_single_object(text: str) -> bool:
    try:
        return isinstance(json.loads(text), dict)
    except json.JSONDecodeError:
        return False


def _canonical(conv: Conversation) -> str:
    return json.dumps(conv, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
