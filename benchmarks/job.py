"""What the orchestrator hands a system's worker process, and what comes back. JSON both ways."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .metrics import RequestRecord
from .workload import BenchRequest


@dataclass(frozen=True)
class Job:
    """One system over one workload, run in its own process so its peak RSS is its own."""

    system: str
    home: str  # registry root
    base: str  # registry base name
    base_path: str  # its Hugging Face model directory
    adapter_refs: list[str]  # request.adapter indexes this list
    requests: list[BenchRequest]
    max_running: int  # loradock's running limit = the baselines' static batch size
    clients: int  # closed-loop clients (ignored when requests carry arrival times)
    quantize: str = "nf4"
    dtype: str = "float32"
    max_slots: int = 32  # adapters resident on the device (the engine adds the no-adapter slot)
    probes: dict = field(default_factory=dict)  # extra measurements a runner may take

    def to_json(self) -> dict:
        d = asdict(self)
        d["requests"] = [r.to_json() for r in self.requests]
        return d

    @classmethod
    def from_json(cls, d: dict) -> Job:
        return cls(**{**d, "requests": [BenchRequest.from_json(r) for r in d["requests"]]})

    def save(self, path: Path) -> None:
        Path(path).write_text(json.dumps(self.to_json()))

    @classmethod
    def load(cls, path: Path) -> Job:
        return cls.from_json(json.loads(Path(path).read_text()))


@dataclass
class JobResult:
    """A worker's answer: per-request records, its peak RSS and any probe figures."""

    system: str
    records: list[RequestRecord]
    peak_rss_mb: float
    extra: dict = field(default_factory=dict)
    error: str | None = None  # set when the system could not run at all

    def to_json(self) -> dict:
        return {
            "system": self.system,
            "records": [r.to_json() for r in self.records],
            "peak_rss_mb": self.peak_rss_mb,
            "extra": self.extra,
            "error": self.error,
        }

    @classmethod
    def from_json(cls, d: dict) -> JobResult:
        return cls(d["system"], [RequestRecord.from_json(r) for r in d["records"]], d["peak_rss_mb"],
                   d.get("extra", {}), d.get("error"))
