"""Which weight format serves the base fastest on this device: a prefill chunk and a decode
batch through the bare base model (no adapters, no engine) in each format, interleaved rounds,
medians, on CUDA when there is one. Run by hand; the table goes to docs/architecture.md.

    .venv/bin/python -m loradock.benchmarks.quant_formats --base-path DIR [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections.abc import Callable
from pathlib import Path

import torch
from loradock.registry.quantization import QuantizationRecipe, pin_bitsandbytes_cpu_kernel

from .timing import device_seconds

DECODE_BATCH, PREFILL_TOKENS = 32, 256


def load(base_path: Path, fmt: str, device: torch.device):
    """The base in format `fmt` ("<weights>/<activations dtype>[/<4-bit matmul dtype>]"), on
    `device`, with the engine's choice of bitsandbytes CPU kernel for that recipe."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    weights, activations, *matmuls = fmt.split("/")
    compute = matmuls[0] if matmuls else activations
    kwargs: dict = {"dtype": getattr(torch, activations)}
    recipe = None
    if weights in ("nf4", "nf4-dq"):  # the engine's recipe, double quantization off or on
        recipe = QuantizationRecipe.named("nf4", compute, double_quant=weights == "nf4-dq")
        kwargs.update(device_map={"": device}, quantization_config=BitsAndBytesConfig(**recipe.bnb_kwargs()))
    model = AutoModelForCausalLM.from_pretrained(base_path, **kwargs).eval()
    if recipe is None:
        model.to(device)
    else:
        pin_bitsandbytes_cpu_kernel(model, recipe)
    if weights in ("int4", "fp8"):  # loradock's own formats, as the engine quantizes them
        from loradock.runtime import fp8, int4
        from loradock.runtime.lora_layer import lora_targets

        module = int4 if weights == "int4" else fp8
        emulated = module.quantize_linears(model, lora_targets(model), device, getattr(torch, compute))
        if emulated is not None:
            raise RuntimeError(f"{weights} would be emulated here: {emulated}")
    if weights.startswith("torchao-"):
        from torchao.quantization import Int4WeightOnlyConfig, Int8WeightOnlyConfig, quantize_

        config = Int8WeightOnlyConfig() if weights == "torchao-int8" else Int4WeightOnlyConfig(group_size=64)
        quantize_(model.model, config)  # the decoder's linears; lm_head (tied) stays as it is
    return model


def timed(fn: Callable[[], object], device: torch.device, repeats: int) -> float:
    fn()  # warm-up
    return statistics.median(device_seconds(fn, device) for _ in range(repeats))


@torch.inference_mode()
def measure(model, vocab: int, repeats: int, decode_batch: int) -> dict:
    g = torch.Generator().manual_seed(0)
    decode_ids = torch.randint(vocab, (decode_batch, 1), generator=g).to(model.device)  # a token per sequence
    prefill_ids = torch.randint(vocab, (1, PREFILL_TOKENS), generator=g).to(model.device)
    decode_s = timed(lambda: model(input_ids=decode_ids, use_cache=False, logits_to_keep=1), model.device, repeats)
    prefill_s = timed(lambda: model(input_ids=prefill_ids, use_cache=False, logits_to_keep=1), model.device,
                      repeats)
    return {"decode_ms": decode_s * 1e3, "decode_tokens_per_s": decode_batch / decode_s,
            "prefill_ms": prefill_s * 1e3, "prefill_tokens_per_s": PREFILL_TOKENS / prefill_s}


FORMATS = ("none/float32", "none/bfloat16", "nf4/float32", "nf4/float32/bfloat16", "nf4-dq/float32", "nf4/bfloat16",
           "int4/float32/bfloat16", "int4/bfloat16", "torchao-int8/float32", "torchao-int8/bfloat16",
           "torchao-int4/bfloat16")
CUDA_FORMATS = ("none/bfloat16", "nf4/bfloat16", "nf4-dq/bfloat16", "fp8/bfloat16", "int4/bfloat16", "none/float32")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base-path", type=Path, required=True, help="Hugging Face model directory of the base")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds over every format")
    p.add_argument("--decode-batch", type=int, default=DECODE_BATCH, help="sequences in the decode step")
    p.add_argument("--repeats", type=int, default=5, help="timed calls per format per round")
    p.add_argument("--formats", nargs="+", help="weights/activations[/4-bit matmul dtype] (default: all that "
                   "run on this device)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    formats = args.formats or list(CUDA_FORMATS if device.type == "cuda" else FORMATS)
    vocab = json.loads((args.base_path / "config.json").read_text())["vocab_size"]
    models, results = {}, {}
    for fmt in formats:
        try:
            models[fmt] = load(args.base_path, fmt, device)
        except Exception as e:  # a format this machine or library version cannot run
            results[fmt] = {"error": f"{type(e).__name__}: {e}"[:200]}
    rounds: dict[str, list[dict]] = {fmt: [] for fmt in models}
    for _ in range(args.rounds):
        for fmt, model in models.items():
            try:
                rounds[fmt].append(measure(model, vocab, args.repeats, args.decode_batch))
            except Exception as e:
                results[fmt] = {"error": f"{type(e).__name__}: {e}"[:200]}
    for fmt, runs in rounds.items():
        if runs and fmt not in results:
            results[fmt] = {k: round(statistics.median(r[k] for r in runs), 1) for k in runs[0]}
    print(json.dumps({"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                      "threads": args.threads, "decode_batch": args.decode_batch,
                      "prefill_tokens": PREFILL_TOKENS, "formats": results}, indent=2))


if __name__ == "__main__":
    main()
