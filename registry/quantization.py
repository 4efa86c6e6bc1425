"""The quantization recipe: how a base's weights are quantized for training and for serving.

One frozen value shared by the trainer (which records it in the manifest), the runtime
(which serves each base with one recipe and reports adapters trained with another) and
the benchmarks. Plain data: dtypes are names ("float32"), so the registry needs no torch;
`BitsAndBytesConfig(**recipe.bnb_kwargs())` accepts them as they are.

The default turns double quantization off: the demo adapters give the same held-out answers
served either way, and a decode step takes 11% less time without it on CPU; double quantization
would save ~0.37 bits per weight (docs/architecture.md, "Double quantization: measured").

`pin_bitsandbytes_cpu_kernel` makes the recipe's compute dtype the one that runs on every CPU:
bitsandbytes 0.50 would otherwise switch a 4-bit layer to its AVX512-BF16 kernel (bfloat16 in
and out) at its first forward without gradients, whatever compute dtype it was given, on the
CPUs that have those instructions only.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

METHODS = ("bitsandbytes-4bit", "bitsandbytes-8bit", "fp8-dynamic", "int4-weight-only", "none")
QUANTIZE_NAMES = ("nf4", "fp4", "int8", "fp8", "int4", "none")  # what a user writes (`--quantize`)
DTYPE_NAMES = ("float32", "bfloat16", "float16")
DEFAULT_DOUBLE_QUANT = False
DEFAULT_STORAGE_DTYPE = "uint8"  # bitsandbytes packs two 4-bit values per byte


@dataclass(frozen=True)
class QuantizationRecipe:
    """How a base is quantized: `QuantizationRecipe.named("nf4", "float32")` and friends."""

    method: str  # one of METHODS
    # "nf4" | "fp4" (4-bit), "int8", "float8_e4m3fn" (fp8: weights per row, activations per token),
    # "int4" (asymmetric groups of input features, tinygemm's layout), or "none"
    quant_type: str
    double_quant: bool  # 4-bit only: quantize the per-block scales too
    compute_dtype: str  # dtype of the matmuls (and of the whole model when not quantized)
    storage_dtype: str  # dtype the quantized weights are packed in ("uint8"), else compute_dtype

    def __post_init__(self) -> None:
        problems = []
        if self.method not in METHODS:
            problems.append(f"method {self.method!r} is not one of {', '.join(METHODS)}")
        if self.compute_dtype not in DTYPE_NAMES:
            problems.append(f"compute dtype {self.compute_dtype!r} is not one of {', '.join(DTYPE_NAMES)}")
        if self.double_quant and self.method != "bitsandbytes-4bit":
            problems.append("double quantization applies to 4-bit quantization only")
        if problems:
            raise ValueError("invalid quantization recipe: " + "; ".join(problems))

    @classmethod
    def named(cls, quantize: str, compute_dtype: str,
              double_quant: bool = DEFAULT_DOUBLE_QUANT) -> QuantizationRecipe:
        """The recipe behind a user-facing name: "nf4", "fp4", "int8", "fp8" or "int4" (serving
        only) or "none"."""
        if quantize in ("nf4", "fp4"):
            return cls("bitsandbytes-4bit", quantize, double_quant, compute_dtype, DEFAULT_STORAGE_DTYPE)
        if quantize == "int8":
            return cls("bitsandbytes-8bit", "int8", False, compute_dtype, "int8")
        if quantize == "fp8":
            return cls("fp8-dynamic", "float8_e4m3fn", False, compute_dtype, "float8_e4m3fn")
        if quantize == "int4":
            return cls("int4-weight-only", "int4", False, compute_dtype, "int4")
        if quantize == "none":
            return cls("none", "none", False, compute_dtype, compute_dtype)
        raise ValueError(f"unknown quantization {quantize!r}: expected one of {', '.join(QUANTIZE_NAMES)}")

    @property
    def quantized(self) -> bool:
        return self.method != "none"

    def bnb_kwargs(self) -> dict | None:
        """Keyword arguments for transformers' BitsAndBytesConfig, or None when not quantized."""
        if self.method == "bitsandbytes-4bit":
            return {"load_in_4bit": True, "bnb_4bit_quant_type": self.quant_type,
                    "bnb_4bit_use_double_quant": self.double_quant,
                    "bnb_4bit_compute_dtype": self.compute_dtype,
                    "bnb_4bit_quant_storage": self.storage_dtype}
        if self.method == "bitsandbytes-8bit":
            return {"load_in_8bit": True}
        return None

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> QuantizationRecipe:
        """The recipe recorded by `to_json`; ValueError names what is missing or wrong."""
        if not isinstance(data, dict):
            raise ValueError(f"a quantization recipe must be an object, got {data!r}")
        missing = [f.name for f in fields(cls) if f.name not in data]
        if missing:
            raise ValueError(f"quantization recipe lacks {', '.join(missing)}")
        return cls(**{f.name: data[f.name] for f in fields(cls)})

    def describe(self) -> str:
        """One line for people: `nf4, double quant, compute float32, storage uint8`."""
        if not self.quantized:
            return f"not quantized ({self.compute_dtype})"
        double = ", double quant" if self.double_quant else ""
        return f"{self.quant_type}{double}, compute {self.compute_dtype}, storage {self.storage_dtype}"

    def differences(self, served: QuantizationRecipe) -> list[str]:
        """`field: trained X, served Y` for every field where `served` differs from this recipe."""
        mine, theirs = self.to_json(), served.to_json()
        return [f"{name}: trained {mine[name]}, served {theirs[name]}"
                for name in mine if mine[name] != theirs[name]]


def pin_bitsandbytes_cpu_kernel(model, recipe: QuantizationRecipe, *, training: bool = False) -> bool:
    """Allow bitsandbytes' AVX512-BF16 CPU kernel on `model`'s 4-bit layers only where `recipe`
    computes in bfloat16 and no gradients are wanted; returns whether it is allowed (it runs
    only on CPUs with AVX512-BF16; elsewhere bfloat16 compute dequantizes and multiplies in
    bfloat16). Without this, on those CPUs a float32 recipe computed in bfloat16, and after the
    first evaluation pass backward no longer reached a repacked layer's input (the kernel has
    no autograd). Duck-typed, so the registry needs neither torch nor bitsandbytes."""
    allowed = recipe.compute_dtype == "bfloat16" and not training
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):  # bitsandbytes' Linear4bit
            module.support_avx512bf16_for_cpu = (bool(module.support_avx512bf16_for_cpu) and allowed
                                                 and _fits_cpu_kernel(module))
    return allowed


def _fits_cpu_kernel(layer) -> bool:
    """The kernel's repacking asserts 32-row tiles and whole quantization blocks per row."""
    block = getattr(getattr(layer.weight, "quant_state", None), "blocksize", 64)
    return layer.out_features % 32 == 0 and layer.in_features % block == 0


def recorded_recipe(manifest: dict) -> QuantizationRecipe | None:
    """The recipe a version's manifest says it was trained with; None when it records none
    (an adapter pulled from the Hub or imported) or records one this code cannot read."""
    data = (manifest.get("training") or {}).get("quantization")
    if data is None:
        return None
    try:
        return QuantizationRecipe.from_json(data)
    except (TypeError, ValueError):
        return None


def recipe_mismatch(manifest: dict, served: QuantizationRecipe) -> str:
    """Empty when the version was trained with `served` (or records no recipe), else what differs."""
    trained = recorded_recipe(manifest)
    if trained is None:
        return ""
    return "; ".join(trained.differences(served))
