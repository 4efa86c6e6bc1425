"""`loradock bench`: loradock against PEFT baselines on the same base and adapters."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from loradock.commands.common import registry_from
from loradock.errors import UserError
from loradock.registry.paths import cache_root

SYSTEM_HELP = (
    "loradock (engine in-process), loradock-grpc (`loradock serve` + concurrent gRPC clients), "
    "loradock-http (`loradock serve --no-grpc --http-port` + concurrent streaming clients of the "
    "OpenAI-compatible API), "
    "peft-static (PEFT mixed batches, FCFS static batches of --max-running), peft-naive (PEFT, "
    "one request at a time, set_adapter), base-only (the base alone at the same batch size)"
)


def default_bench_home() -> Path:
    return cache_root() / "bench-registry"


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "bench",
        help="benchmark loradock against PEFT baselines",
        description="Run every system on the same quantized base and the same generated adapters: "
        + SYSTEM_HELP + ". Each system runs in its own process (its own peak RSS). Random PEFT LoRA "
        "adapters (ranks 8/16, attention and MLP targets) are published into a separate benchmark "
        "registry (--bench-home); requests pick adapters by power-law popularity (alpha 1), prompts "
        "are 16-128 tokens and outputs 16-64 tokens with EOS ignored. Also measured: the limit (the "
        "base's linear layers as bare matmuls at the same batch size and dtype), adapter cold-load "
        "latency, the decode step with distinct adapters vs the base alone, alias move -> first "
        "request on the new version, and registry publish/list/resolve at --registry-versions "
        "versions. Writes RESULTS/<name>.json, .md and .png. On 2 quiet CPU cores the default run "
        "took 19 minutes and --quick about 3 (7.5 on a busy shared machine: most of it is six "
        "processes loading torch and quantizing the base).",
    )
    parser.add_argument("--quick", action="store_true",
                        help="CI smoke run: 8 adapters, 8 requests, batch 8, prompts 16-48 and outputs 8-16 "
                        "tokens, 100 registry versions, one decode-step round (other flags still override)")
    parser.add_argument("--name", help="results file name (default: 'latest', or 'quick' with --quick)")
    parser.add_argument("--json", type=Path, metavar="PATH",
                        help="also write a flat summary (tokens_per_s per system, ratios, cold load, "
                        "fraction of the limit, errors) to PATH")
    parser.add_argument("--out-dir", type=Path, default=Path("benchmarks/results"), metavar="DIR",
                        help="where the results go (default: %(default)s)")
    parser.add_argument("--base", help="registry base name (default: smollm2-135m-instruct, imported "
                        "from the packaged GGUF when missing); 'synthetic-1b' makes a Llama-shaped "
                        "1.1B-parameter base with random weights locally, to see costs grow with size")
    parser.add_argument("--bench-home", type=Path, default=None, metavar="PATH",
                        help=f"benchmark registry root, kept between runs so adapters are generated "
                        f"once (default: {default_bench_home()})")
    parser.add_argument("--adapters", type=int, nargs="+", metavar="N",
                        help="numbers of adapters to run, e.g. 1 8 32 128 1000 (default: 32)")
    parser.add_argument("--requests", type=int, help="requests per run (default: 64)")
    parser.add_argument("--clients", type=int, help="closed-loop concurrent clients (default: 32)")
    parser.add_argument("--rate", type=float, metavar="R",
                        help="Poisson arrivals at R requests/s instead of a closed loop")
    parser.add_argument("--max-running", type=int,
                        help="loradock's running limit, also the baselines' static batch size (default: 32)")
    parser.add_argument("--prompt-len", type=int, nargs=2, metavar=("LO", "HI"),
                        help="prompt length range in tokens (default: 16 128)")
    parser.add_argument("--output-len", type=int, nargs=2, metavar=("LO", "HI"),
                        help="output length range in tokens, EOS ignored (default: 16 64)")
    parser.add_argument("--systems", nargs="+", metavar="SYSTEM",
                        help="systems to run (default: all): " + SYSTEM_HELP)
    parser.add_argument("--quantize", choices=("nf4", "int8", "none"), help="base quantization (default: nf4)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"),
                        help="compute dtype (default: float32, the engine's CPU default)")
    parser.add_argument("--threads", type=int,
                        help="torch threads per system, the same for all (default: 1; more threads "
                        "than free cores makes OpenMP spin and skews the comparison)")
    parser.add_argument("--seed", type=int, help="workload and adapter seed (default: 0)")
    parser.add_argument("--cold-samples", type=int, help="adapters cold-loaded for the latency probe (default: 5)")
    parser.add_argument("--registry-versions", type=int,
                        help="versions published for the registry timing; 0 skips it (default: 10000)")
    parser.add_argument("--cluster", action="store_true",
                        help="instead: the Ray Serve routing benchmark (stub replicas, needs "
                        "loradock[cluster]): adapter-cache hit rate and cold loads per 1,000 requests "
                        "with adapter-affine (multiplexed) routing against Ray's default routing; "
                        "--adapters, --requests, --clients and --seed apply (defaults 50, 2000, 16, 0)")
    parser.add_argument("--cluster-replicas", type=int, nargs="+", default=[2, 4], metavar="N",
                        help="with --cluster: replica counts to measure (default: 2 4)")
    parser.add_argument("--cluster-slots", type=int, default=8, metavar="N",
                        help="with --cluster: adapters one replica holds (default: 8)")
    parser.set_defaults(func=cmd_bench)


# flag -> BenchConfig field, for flags that override the defaults (or --quick's settings)
_OVERRIDES = {
    "name": "name", "base": "base", "adapters": "adapters", "requests": "requests",
    "clients": "clients", "rate": "rate", "max_running": "max_running", "prompt_len": "prompt_len",
    "output_len": "output_len", "systems": "systems", "quantize": "quantize", "dtype": "dtype",
    "seed": "seed", "threads": "threads", "cold_samples": "cold_samples", "registry_versions": "registry_versions",
}


def bench_config(args: argparse.Namespace):
    """The BenchConfig the flags describe; a bad combination is the user's error."""
    from loradock.benchmarks.run import BenchConfig, quick_config

    overrides = {field: getattr(args, flag) for flag, field in _OVERRIDES.items() if getattr(args, flag) is not None}
    for key in ("prompt_len", "output_len", "systems"):
        if key in overrides:
            overrides[key] = tuple(overrides[key])
    if "adapters" in overrides:  # targets are stated at 32 adapters; else report the largest N
        overrides["headline_adapters"] = 32 if 32 in overrides["adapters"] else max(overrides["adapters"])
    try:
        return quick_config(**overrides) if args.quick else BenchConfig(**overrides)
    except ValueError as e:
        raise UserError(str(e)) from None


def cmd_cluster_bench(args: argparse.Namespace) -> int:
    try:
        from loradock.runtime.cluster import routing_bench
    except ImportError as e:
        raise UserError(f"the routing benchmark needs Ray Serve ({e}): pip install 'loradock[cluster]'") from None
    fields = {"adapters": args.adapters[0] if args.adapters else None, "requests": args.requests,
              "clients": args.clients, "seed": args.seed}
    config = routing_bench.RoutingBenchConfig(
        replicas=tuple(args.cluster_replicas), slots=args.cluster_slots,
        **{k: v for k, v in fields.items() if v is not None})
    results = routing_bench.run_routing_bench(config)
    paths = routing_bench.write_results(config, results, args.out_dir, args.name or "cluster-routing")
    print(routing_bench.markdown(config, results))
    for kind, path in paths.items():
        print(f"wrote {kind}: {path}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    if args.cluster:
        return cmd_cluster_bench(args)
    from loradock.benchmarks.report import markdown, write_reports
    from loradock.benchmarks.run import run_benchmark
    from loradock.registry import Registry

    config = bench_config(args)
    if not args.verbose:  # one line per published benchmark adapter would bury the progress
        logging.getLogger("loradock.registry").setLevel(logging.WARNING)
    bench = Registry(args.bench_home or default_bench_home())
    results = run_benchmark(config, registry_from(args), bench)
    paths = write_reports(results, args.out_dir, args.json)
    print(markdown(results))
    for kind, path in paths.items():
        print(f"wrote {kind}: {path}")
    return 0
