"""`EngineConfig`: every knob of the engine, one documented field each (they become server flags)."""

from __future__ import annotations

from dataclasses import dataclass

from loradock.registry.docstrings import field_docs as dataclass_field_docs
from loradock.registry.quantization import DEFAULT_DOUBLE_QUANT

QUANTIZATIONS = ("nf4", "int8", "fp8", "int4", "none")
DEVICES = ("auto", "cpu", "cuda")
DTYPES = ("auto", "float32", "bfloat16", "float16")
# The one list of LoRA op names (the field's docstring describes each). It lives here, torch-free,
# so that EngineConfig and the CLI's --lora-ops choices need no torch; runtime/lora_ops.py maps
# each name NAME to its function NAME_lora and fails at import if one is missing.
LORA_OPS = ("auto", "reference", "segmented", "batched", "triton", "gathered")
ATTENTION_BACKENDS = ("auto", "sdpa", "triton")  # runtime/attention.py's pick_attention
COMPILE_MODES = ("auto", "on", "off")  # runtime/compiled.py's wants_compile
ASYNC_SCHEDULING_MODES = ("auto", "on", "off")  # Engine: auto = on with CUDA
TOOL_CALL_PARSERS = ("auto", "hermes", "llama3_json", "mistral")  # runtime/tool_calls.py's FORMATS


@dataclass
class EngineConfig:
    """Configuration of one serving engine (one base model, many adapters)."""

    base: str
    """Base model: a registry base name (see `loradock bases list`) or a Hugging Face model directory."""

    quantize: str = "nf4"
    """Weight quantization of the base: "nf4" (bitsandbytes 4-bit), "int8" (LLM.int8), "fp8" (weights
    and activations in float8, a scale per weight row and per token, torch._scaled_mm: a format for
    GPUs with FP8 tensor cores, Hopper and Ada; elsewhere the same numbers, slower than float32),
    "int4" (weights in 4 bits with a scale and zero per group of 128 inputs, activations as they
    are: tinygemm's kernel on CUDA and on x86 CPUs, computing in bfloat16; with another
    compute_dtype the same numbers, dequantized at each call) or "none"."""

    double_quant: bool = DEFAULT_DOUBLE_QUANT
    """With nf4: also quantize the 4-bit blocks' scales (QLoRA's double quantization). Serve an
    adapter with the recipe it was trained with; ListAdapters reports the ones that differ."""

    device: str = "auto"
    """Where to run: "cuda" when available with "auto", else "cpu"."""

    dtype: str = "auto"
    """Compute dtype for activations and LoRA buffers; "auto" = bfloat16 on cuda, float32 on cpu."""

    compute_dtype: str = "auto"
    """Dtype of the quantized base's matmuls; "auto" = the dtype above, on every CPU kind. bfloat16
    takes bitsandbytes' AVX512-BF16 kernel on CPUs that have it: a decode step of the bare SmolLM2
    base 1.37x faster there, logits within bf16 rounding noise of PEFT's instead of fp32's."""

    max_slots: int = 8
    """Adapters resident on the device at once (stacked LoRA buffers); slot 0 is kept for "no adapter"."""

    max_rank: int = 64
    """Largest LoRA rank accepted; sets the size of the device buffers (memory ~ max_slots * max_rank)."""

    host_cache_bytes: int = 2 * 1024**3
    """Bytes of adapter weights kept in host memory (LRU) so a re-used adapter skips the disk. On
    CPU, where the device slots are host memory, only adapters read ahead and not yet in a slot."""

    max_host_adapters: int = 256
    """At most this many adapters in the host-memory cache, whatever their size."""

    max_running: int = 32
    """Sequences decoded together (continuous batching width)."""

    max_batch_tokens: int = 512
    """Token budget of one engine step: decode tokens first, then prompt chunks (long prompts are chunked)."""

    max_queue: int = 256
    """Requests waiting for admission before submit raises QueueFullError."""

    max_prompt_tokens: int = 1536
    """Longest accepted prompt, in tokens."""

    max_model_len: int = 2048
    """Longest sequence (prompt + generated tokens); also capped by the model's position limit."""

    kv_cache_tokens: int = 16384
    """Capacity of the paged KV pool in tokens (unless kv_cache_bytes is set). Sequences take blocks as
    they grow and return them when they end. Memory = tokens x layers x 2 x kv width x dtype size
    (SmolLM2 float32: 46 KB/token)."""

    kv_cache_bytes: int = 0
    """Size the KV pool in bytes instead of tokens (0: use kv_cache_tokens). A prompt longer than the
    pool holds is refused at submit."""

    kv_cache_memory_fraction: float = 0.0
    """On CUDA: size the KV pool to this fraction of the device memory still free once the model and
    adapter slots are loaded (overrides kv_cache_tokens and kv_cache_bytes); 0 = off. Leave room for
    activations and the CUDA graphs' memory pool, which are allocated after the pool."""

    kv_block_size: int = 16
    """Tokens per KV pool block: the unit a sequence grows by."""

    prefix_caching: bool = True
    """Keep full KV blocks after their sequence ends and reuse them for a new sequence of the same
    adapter version whose prompt starts with the same tokens (a domain's system prompt, a chat's
    earlier turns, a preempted sequence's recompute): those tokens are not prefilled again."""

    lora_ops: str = "auto"
    """LoRA kernels: "reference" (per-adapter loop), "segmented" (one matmul pair per run of tokens
    on one adapter), "batched" (two bmm over the batch's slot range for decode tokens, padded per
    slot; prompt chunks a matmul pair each), "triton" (two segmented-matmul Triton kernels per layer,
    CUDA only), "gathered" (each token's adapter weights gathered, two bmm: shapes fixed by the
    token count), or "auto" (on CUDA: batched for decode-only steps, triton once prompt chunks are in
    the step, or the torch ops alone if the Triton kernels fail at start; on CPU: batched when the
    padding is small, else segmented; measured, see docs/architecture.md)."""

    attention: str = "auto"
    """Attention over the paged KV cache: "sdpa" (each sequence's keys gathered into a padded copy
    with a boolean mask, two PyTorch SDPA calls per layer: decode tokens, prompt chunks),
    "triton" (one Triton kernel per layer reading the pool through the block tables: no copy, no
    mask, windows and soft-capping in the kernel; CUDA only) or "auto" (triton on CUDA once it
    matches the reference at start, else sdpa, logged; sdpa on CPU)."""

    compile: str = "auto"
    """Run the model's forward compiled by torch.compile (inductor): norms, rotary embeddings,
    activations and residual adds fused, the LoRA layers and attention left as opaque ops
    between the compiled pieces. "on", "off" (the escape hatch: plain eager PyTorch) or "auto"
    (on with CUDA; off on CPU, where it halves a step's kernels but not its time and a start
    spends about a minute compiling: measured, see docs/architecture.md). One graph for every
    step shape, compiled at start and cached on disk ($XDG_CACHE_HOME/loradock/inductor), never
    on a request's path (a step the graph does not fit runs eagerly)."""

    cuda_graphs: bool = True
    """On CUDA, run steps as CUDA graphs, all captured at start, largest first: decode-only
    steps, one per (batch, context) bucket (powers of two up to max_running and max_model_len;
    with the paged attention kernel, per batch bucket alone), and with the paged kernel also the
    steps holding prompt chunks, one per token bucket (powers of two from 16 up to 512 or
    max_batch_tokens; larger steps run uncaptured). A capture that fails is logged and the steps
    of its kind then run eagerly. No effect on CPU, nor with quantize="int8" (LLM.int8's outlier
    columns depend on the values: not capturable)."""

    async_scheduling: str = "auto"
    """Plan and launch each step before reading back the tokens the step before it sampled: the
    next step's decode tokens are taken from the device, so the host's scheduling and input
    building run while the device computes. "on", "off" or "auto" (on with CUDA; off on CPU,
    where nothing runs beside the host). The same tokens either way; a sequence that ends on a
    token (end of sequence, a stop token or string) has computed one more, dropped."""

    promotion_wait_s: float = 60.0
    """When an alias in use moves (a promotion, a canary, a rollback), its requests stay on the
    previous target until the versions it adds are loaded, so none pays a cold load; after this many
    seconds of loading it switches anyway. A version that fails to load is never switched to."""

    registry_poll_s: float = 1.0
    """How often (seconds) the engine checks the registry's generation for alias moves / new versions."""

    trust: str = ""
    """Trust policy file (YAML: adapter-name pattern -> list of PEM public key files, first match
    wins). With one, only versions signed by a key trusted for their name are served; the others
    are refused with FAILED_PRECONDITION naming why. Empty: every version is served."""

    cpu_threads: int = 0
    """torch intra-op threads for CPU inference (process-wide); 0 keeps torch's default. On a shared
    machine 1 is often fastest: small ops stall when a worker thread is descheduled."""

    load_workers: int = 2
    """Threads that read adapters from the registry off the engine loop."""

    tool_call_parser: str = "auto"
    """How the model writes tool calls: "hermes" (<tool_call> blocks: Qwen, Hermes, SmolLM3),
    "llama3_json" (a JSON object: Llama 3.1+) or "mistral" ([TOOL_CALLS] then a JSON list); "auto"
    reads it from the chat template (hermes when the template knows no tools: loradock then
    renders the tools itself, in hermes form)."""

    def __post_init__(self) -> None:
        problems: list[str] = []

        def choice(name: str, allowed: tuple[str, ...]) -> None:
            value = getattr(self, name)
            if value not in allowed:
                problems.append(f"{name}={value!r}: expected one of {', '.join(allowed)}")

        def positive(name: str) -> None:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                problems.append(f"{name}={value!r}: expected a positive integer")

        if not isinstance(self.double_quant, bool):
            problems.append(f"double_quant={self.double_quant!r}: expected true or false")
        if not isinstance(self.base, str) or not self.base.strip():
            problems.append("base: give a registry base name or a model directory")
        choice("quantize", QUANTIZATIONS)
        choice("device", DEVICES)
        choice("dtype", DTYPES)
        choice("compute_dtype", DTYPES)
        choice("lora_ops", LORA_OPS)
        choice("attention", ATTENTION_BACKENDS)
        choice("compile", COMPILE_MODES)
        choice("async_scheduling", ASYNC_SCHEDULING_MODES)
        choice("tool_call_parser", TOOL_CALL_PARSERS)
        for name in ("max_slots", "max_rank", "host_cache_bytes", "max_host_adapters", "max_running",
                     "max_batch_tokens", "max_queue", "max_prompt_tokens", "max_model_len",
                     "kv_cache_tokens", "kv_block_size", "load_workers"):
            positive(name)
        if not problems:
            if self.max_batch_tokens < self.max_running:
                problems.append(
                    f"max_batch_tokens={self.max_batch_tokens} must be >= max_running={self.max_running} "
                    "(every running sequence decodes one token per step)"
                )
            if self.max_prompt_tokens >= self.max_model_len:
                problems.append(
                    f"max_prompt_tokens={self.max_prompt_tokens} must be < max_model_len={self.max_model_len}"
                )
            if self.kv_cache_tokens < self.max_model_len:
                problems.append(
                    f"kv_cache_tokens={self.kv_cache_tokens} must be >= max_model_len={self.max_model_len}"
                )
        if not isinstance(self.kv_cache_bytes, int) or self.kv_cache_bytes < 0:
            problems.append(f"kv_cache_bytes={self.kv_cache_bytes!r}: expected an integer >= 0")
        if not isinstance(self.kv_cache_memory_fraction, (int, float)) or not 0 <= self.kv_cache_memory_fraction < 1:
            problems.append(f"kv_cache_memory_fraction={self.kv_cache_memory_fraction!r}: expected a number in [0, 1)")
        if not isinstance(self.prefix_caching, bool):
            problems.append(f"prefix_caching={self.prefix_caching!r}: expected true or false")
        if not isinstance(self.cpu_threads, int) or self.cpu_threads < 0:
            problems.append(f"cpu_threads={self.cpu_threads!r}: expected an integer >= 0")
        if not isinstance(self.promotion_wait_s, (int, float)) or self.promotion_wait_s < 0:
            problems.append(f"promotion_wait_s={self.promotion_wait_s!r}: expected a number >= 0")
        if not isinstance(self.registry_poll_s, (int, float)) or self.registry_poll_s < 0:
            problems.append(f"registry_poll_s={self.registry_poll_s!r}: expected a number >= 0")
        if problems:
            raise ValueError("invalid engine config: " + "; ".join(problems))

    @classmethod
    def field_docs(cls) -> dict[str, str]:
        """{field name: its docstring}, for building CLI `--help` text."""
        return dataclass_field_docs(cls)
