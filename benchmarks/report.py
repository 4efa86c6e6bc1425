"""Turn a results document (see run.py) into files: JSON, a markdown table, a PNG plot,
and the flat summary `--json PATH` writes. No torch here."""

from __future__ import annotations

import json
import math
from pathlib import Path

# The targets for loradock, checked at the headline number of adapters.
TARGETS = (
    ("throughput vs PEFT static mixed batches", "ratio_vs_peft_static", ">=", 3.0),
    ("throughput vs naive adapter swapping", "ratio_vs_naive", ">=", 8.0),
    ("decode step, distinct adapters vs base only", "overhead_vs_base", "<=", 1.10),
    ("cold load p50 (ms), rank-16 attn+MLP", "cold_load_p50_ms", "<=", 30.0),
    ("fraction of the machine limit (fp32/bf16 matmuls)", "fraction_of_machine_limit", ">=", 0.5),
    ("torch ops per decode step, most vs 1 sequence", "ops_per_decode_step_growth", "<=", 1.2),
    ("concurrent sequences, paged KV vs per-sequence reservation", "kv_concurrency_ratio", ">=", 2.0),
)

SYSTEM_ORDER = ("loradock", "loradock-grpc", "loradock-http", "peft-static", "peft-naive", "base-only")


def _clean(value):
    """JSON has no NaN: missing figures are written as null."""
    if isinstance(value, float) and (math.isnan(value) or math.isinf(value)):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def headline_run(results: dict) -> dict:
    """The run at the configured headline number of adapters (else the largest)."""
    runs = results["runs"]
    wanted = results["config"].get("headline_adapters")
    return next((r for r in runs if r["n_adapters"] == wanted), max(runs, key=lambda r: r["n_adapters"]))


def flat_summary(results: dict) -> dict:
    """The `--json PATH` summary: one number (or dict of numbers) per key, at the headline N."""
    run = headline_run(results)
    probes = run.get("probes", {})
    systems = run["systems"]
    return _clean({
        "name": results["name"],
        "n_adapters": run["n_adapters"],
        "tokens_per_s": {name: s["tokens_per_s"] for name, s in systems.items()},
        "tokens_per_cpu_s": {name: s.get("tokens_per_cpu_s", math.nan) for name, s in systems.items()},
        "ratio_vs_peft_static": run["ratios"]["loradock_vs_peft_static"],
        "ratio_vs_naive": run["ratios"]["loradock_vs_peft_naive"],
        "overhead_vs_base": probes.get("decode_step", {}).get("ratio", math.nan),
        "cold_load_p50_ms": probes.get("cold_load", {}).get("load_p50_ms", math.nan),
        "alias_move_ms": probes.get("alias_move", {}).get("move_to_served_ms", math.nan),
        "fraction_of_limit": run["fraction_of_limit"],
        "limit_tokens_per_s": results["limit"].get("tokens_per_s", math.nan),
        "machine_limit_tokens_per_s": results["limit"].get("tokens_per_s", math.nan),
        "machine_limit_dtype": results["limit"].get("dtype"),
        "fraction_of_machine_limit": run["fraction_of_limit"].get("loradock", math.nan),
        "ops_per_decode_step": probes.get("ops_per_decode_step"),
        "ops_per_decode_step_growth": _growth(probes.get("ops_per_decode_step")),
        "kv_concurrency_ratio": probes.get("kv_concurrency", {}).get("ratio", math.nan),
        "prefix_cache_speedup": probes.get("prefix_cache", {}).get("speedup", math.nan),
        "errors": {name: s["errors"] for name, s in systems.items()},
        "registry_ops": results.get("registry_ops"),
    })


def _growth(counts: dict | None) -> float:
    """Ops at the most running sequences over ops at the fewest."""
    if not counts:
        return math.nan
    by_size = sorted((int(n), c) for n, c in counts.items())
    return by_size[-1][1] / by_size[0][1]


def target_checks(summary: dict) -> list[dict]:
    """Each target with the measured value and whether it is met (None when not measured)."""
    out = []
    for label, key, op, goal in TARGETS:
        value = summary.get(key)
        met = None if value is None else (value >= goal if op == ">=" else value <= goal)
        out.append({"target": label, "key": key, "goal": f"{op} {goal:g}", "value": value, "met": met})
    return out


def _fmt(value, digits: int = 1) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return str(value)


def _ordered(systems: dict) -> list[str]:
    return [s for s in SYSTEM_ORDER if s in systems] + sorted(set(systems) - set(SYSTEM_ORDER))


def markdown(results: dict) -> str:
    """A self-describing markdown report: setup, one table per N, targets, probes, registry ops."""
    cfg = results["config"]
    limit = results["limit"]
    lines = [
        f"# loradock benchmark `{results['name']}`",
        "",
        f"{results['created_at']}, {results['duration_s']:.0f} s. Base `{results['base']['name']}` "
        f"({cfg['quantize']}, compute {cfg['dtype']}), {cfg['requests']} requests per run, "
        + (f"Poisson arrivals at {cfg['rate']} req/s" if cfg.get("rate") else f"closed loop of {cfg['clients']} clients")
        + f", running limit / static batch {cfg['max_running']}, prompts {cfg['prompt_len'][0]}-{cfg['prompt_len'][1]} "
        f"tokens, outputs {cfg['output_len'][0]}-{cfg['output_len'][1]} tokens (EOS ignored), seed {cfg['seed']}. "
        f"Machine: {results['machine']['cpus']} CPUs"
        + (f", {results['machine']['gpu']}" if results["machine"].get("gpu") else "")
        + f", torch {results['machine']['torch']}.",
        "",
        f"Limit: the base's {limit.get('linear_layers', '?')} linear layers as bare {limit.get('dtype', '?')} "
        f"matmuls at batch {limit.get('batch', '?')}: {_fmt(limit.get('step_ms'), 2)} ms per step = "
        f"{_fmt(limit.get('tokens_per_s'))} tokens/s.",
    ]
    for run in results["runs"]:
        systems = run["systems"]
        gpu = any(s.get("peak_gpu_mb") is not None for s in systems.values())
        lines += [
            "",
            f"## {run['n_adapters']} adapters",
            "",
            "| system | tokens/s | of limit | tokens/CPU-s | TTFT p50 ms | TTFT p99 ms | TPOT p50 ms | TPOT p99 ms | peak RSS MiB |"
            + (" peak GPU MiB |" if gpu else "") + " errors |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|" + ("---:|" if gpu else "") + "---:|",
        ]
        for name in _ordered(systems):
            s = systems[name]
            lines.append(
                f"| {name} | {_fmt(s['tokens_per_s'])} | {_fmt(run['fraction_of_limit'].get(name), 3)} "
                f"| {_fmt(s.get('tokens_per_cpu_s'))} "
                f"| {_fmt(s['ttft_p50_ms'])} | {_fmt(s['ttft_p99_ms'])} | {_fmt(s['tpot_p50_ms'])} "
                f"| {_fmt(s['tpot_p99_ms'])} | {_fmt(s['peak_rss_mb'], 0)} "
                + (f"| {_fmt(s.get('peak_gpu_mb'), 0)} " if gpu else "") + f"| {s['errors']} |"
            )
        failures = [f"- {name}: {s['failure']}" for name, s in systems.items() if s.get("failure")]
        if failures:
            lines += ["", "Failures:", *failures]
        lines += ["", "Ratios (tokens/s): " + ", ".join(f"{k} {_fmt(v, 2)}" for k, v in run["ratios"].items())]
    summary = flat_summary(results)
    lines += [
        "",
        f"## Targets (at {summary['n_adapters']} adapters)",
        "",
        "| target | goal | measured | met |",
        "|---|---|---:|---|",
    ]
    for check in target_checks(summary):
        met = {True: "yes", False: "**no**", None: "n/a"}[check["met"]]
        lines.append(f"| {check['target']} | {check['goal']} | {_fmt(check['value'], 2)} | {met} |")
    probes = headline_run(results).get("probes", {})
    for key, title in (("decode_step", "Decode step"), ("cold_load", "Cold load"), ("alias_move", "Alias move"),
                       ("kv_concurrency", "KV concurrency"), ("prefix_cache", "Prefix cache")):
        if probes.get(key):
            lines += ["", f"{title}: " + ", ".join(f"{k} {_fmt(v, 2)}" for k, v in probes[key].items()
                                                      if not isinstance(v, list))]
    ops = results.get("registry_ops")
    if ops:
        lines += ["", f"## Registry at {ops['versions']} versions ({ops['names']} names)", "",
                  "| operation | ms |", "|---|---:|"]
        lines += [f"| {k.removesuffix('_ms')} | {_fmt(v, 2)} |" for k, v in ops.items() if k.endswith("_ms")]
    return "\n".join(lines) + "\n"


def plot(results: dict, path: Path) -> Path:
    """Throughput and TTFT p50 per system against the number of adapters (bars for a single N)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = sorted(results["runs"], key=lambda r: r["n_adapters"])
    counts = [r["n_adapters"] for r in runs]
    names = _ordered({name: None for r in runs for name in r["systems"]})
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    panels = (("tokens_per_s", "output tokens/s"), ("ttft_p50_ms", "TTFT p50 (ms)"))
    for ax, (key, ylabel) in zip(axes, panels, strict=True):
        values = {name: [r["systems"].get(name, {}).get(key, math.nan) for r in runs] for name in names}
        if len(runs) == 1:
            ax.bar(names, [v[0] for v in values.values()], color=[f"C{i}" for i in range(len(names))])
            ax.tick_params(axis="x", labelrotation=20)
            ax.set_xlabel(f"system ({counts[0]} adapters)")
        else:
            for name, series in values.items():
                ax.plot(counts, series, marker="o", label=name)
            ax.set_xscale("log")
            ax.set_xlabel("adapters")
        ax.set_ylabel(ylabel)
        ax.set_yscale("log")
        ax.grid(True, which="both", alpha=0.3)
    limit = results["limit"].get("tokens_per_s")
    if limit:
        axes[0].axhline(limit, color="grey", linestyle="--", label="limit (bare matmuls)")
    axes[0].legend(fontsize=8)
    fig.suptitle(f"loradock benchmark {results['name']} ({results['base']['name']}, "
                 f"{results['config']['quantize']})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_reports(results: dict, out_dir: Path, summary_path: Path | None = None) -> dict[str, Path]:
    """Write `<name>.json`, `<name>.md`, `<name>.png` into `out_dir` (and the flat summary)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    name = results["name"]
    summary = flat_summary(results)
    document = _clean({**results, "summary": summary, "targets": target_checks(summary)})
    paths = {
        "json": out_dir / f"{name}.json",
        "markdown": out_dir / f"{name}.md",
        "plot": out_dir / f"{name}.png",
    }
    paths["json"].write_text(json.dumps(document, indent=2, sort_keys=True) + "\n")
    paths["markdown"].write_text(markdown(results))
    plot(results, paths["plot"])
    if summary_path is not None:
        summary_path.parent.mkdir(parents=True, exist_ok=True)
        summary_path.write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
        paths["summary"] = summary_path
    return paths
