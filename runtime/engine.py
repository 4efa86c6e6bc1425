"""`Engine`: one quantized base model serving many LoRA adapters with continuous batching.

The step loop (one thread) repeats:
  1. run queued control work (cancellations, load/unload of adapters);
  2. ask the scheduler for this step's plan (decode tokens, prompt chunks, admissions
     within the token budget); admitting pins the adapter into a device slot and
     checks the paged KV pool has room; each planned chunk takes its KV blocks (the
     newest sequence is preempted and later recomputed when the pool runs dry);
  3. launch ONE model forward over the packed batch, whatever the adapters, then detokenize
     and stream the previous step's tokens while the device computes (stop strings end a
     sequence there, one step late: its token of this step is dropped);
  4. sample one token per sequence that reached its end, read back once; end-of-sequence,
     stop tokens and length end a sequence at once: finished / cancelled / failed sequences
     free their KV blocks and slot pin in the step.
Errors inside a step fail only the affected requests; the loop keeps serving.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import TypeVar

import torch
from loradock.registry import Registry
from loradock.registry.trust import TrustPolicy

from . import tool_calls
from .adapter_cache import AdapterCache, CacheCapacity, LoadState
from .adapter_source import AdapterSource
from .adapter_weights import ServedModel
from .admission import Admitter
from .attention import check_paged_kernel, pick_attention
from .batch_context import static_lora_batch
from .block_manager import BlockManager
from .compiled import wants_compile
from .config import EngineConfig
from .cuda_graphs import StepGraphs
from .detokenize import TextStream
from .errors import (
    AdapterUnavailableError,
    EngineError,
    EngineShutdownError,
    InvalidRequestError,
)
from .handle import RequestHandle
from .kv_cache import blocks_for
from .logprobs import add_prompt_logprobs, generated_logprobs
from .lora_layer import MultiLoRALinear, prepare_kernels, wrap_linears
from .model_loader import (
    eos_token_ids,
    kv_pool_for,
    load_base_model,
    load_tokenizer,
    pick_device,
    pick_dtype,
    resolve_base,
    serving_recipe,
    sliding_windows,
)
from .model_runner import ModelRunner, StepItem, lora_batch
from .promotion import AliasRoutes
from .prompts import PromptEncoder
from .quantized_linear import QuantizedLinear
from .sampling import Sampler, sample_rows
from .scheduler import Admission, Scheduler
from .sequence import PENDING, SeqStatus, Sequence
from .stats import BASE_KEY, EngineStats
from .structured import Grammars, mask_rows
from .transfer import SampledTokens, to_device
from .types import (
    EngineInfo,
    FinishReason,
    GenerationRequest,
    GenerationResult,
    ResidentAdapter,
    ResolvedAdapter,
    Timings,
    TokenEvent,
    TokenLogprob,
)

log = logging.getLogger(__name__)
T = TypeVar("T")


class Engine:
    """Serve generation requests for many adapters from one base model.

    `start()` loads the model and starts the loop thread; `submit()` queues a request
    and returns a RequestHandle. Use `start(run_loop=False)` and call `step()` yourself
    to drive the engine deterministically (tests, benchmarks).
    """

    def __init__(self, config: EngineConfig, registry: Registry | None = None) -> None:
        self.config = config
        self.registry = registry if registry is not None else Registry()
        self.ready = False
        self.lora_fallback: str | None = None  # which Triton kernels were replaced at start, and why
        self._accepting = False
        self._stats = EngineStats()
        self._inbox: queue.SimpleQueue[tuple[Callable[[], object], Future]] = queue.SimpleQueue()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._seqs: dict[str, Sequence] = {}
        self._unsent: dict[int, Sequence] = {}  # id -> a sequence with sampled tokens not yet streamed
        self._in_flight: SampledTokens | None = None  # the last step's tokens, not yet read back (async)
        self.steps = 0

    # ---- lifecycle -------------------------------------------------------------------------

    def start(self, run_loop: bool = True) -> Engine:
        """Load the base model, wrap its linears with LoRA slots, warm up, start the loop."""
        cfg = self.config
        if cfg.cpu_threads:
            torch.set_num_threads(cfg.cpu_threads)
        trust = TrustPolicy.load(cfg.trust) if cfg.trust else None  # a bad policy fails before loading
        if trust is not None:
            log.info("trust policy %s: %s", trust.path, trust.describe())
        self.base = resolve_base(cfg.base, self.registry)
        self.device = pick_device(cfg.device)
        self.dtype = pick_dtype(cfg.dtype, self.device)
        self.recipe = serving_recipe(cfg, self.dtype)  # one recipe for the base, whatever the adapter
        model = load_base_model(self.base, self.recipe, self.device, self.dtype)
        self.layers: dict[str, MultiLoRALinear] = wrap_linears(
            model, cfg.max_slots + 1, cfg.max_rank, self.dtype, self.device, cfg.lora_ops)
        # fp8 or int4 where the device's kernel cannot serve it: why its arithmetic is emulated
        self.format_emulated = next((m.base_layer.emulated for m in self.layers.values()
                                     if isinstance(m.base_layer, QuantizedLinear)), None)
        self.tokenizer = load_tokenizer(self.base)
        mc = model.config
        self.max_model_len = min(cfg.max_model_len, getattr(mc, "max_position_embeddings", cfg.max_model_len))
        self.kv = kv_pool_for(model, cfg, self.dtype, self.device)
        self.blocks = BlockManager(self.kv, cfg.prefix_caching)
        self.preemptions = 0
        self.served = ServedModel(
            fingerprint=self.base.fingerprint,
            linear_shapes={name: (m.in_features, m.out_features) for name, m in self.layers.items()},
            max_rank=cfg.max_rank,
            base_weight=lambda name: self.layers[name].dequantized_weight(),
        )
        self.adapters = AdapterSource(self.registry, self.served, self.dtype, cfg.registry_poll_s,
                                      recipe=self.recipe, trust=trust)
        self.adapters.prime_host_memory(cfg.load_workers)
        self.encoder = PromptEncoder(self.tokenizer, mc.vocab_size,
                                     min(cfg.max_prompt_tokens, self.max_model_len - 1))
        self.eos_ids = eos_token_ids(model, self.tokenizer)
        self.grammars = Grammars(self.tokenizer, mc.vocab_size, self.eos_ids)
        self.tool_format = (tool_calls.detect_format(getattr(self.tokenizer, "chat_template", None))
                            if cfg.tool_call_parser == "auto" else cfg.tool_call_parser)
        log.info("tool calls: %s format%s", self.tool_format, "" if self.encoder.renders_tools
                 else " (the chat template knows no tools: loradock renders them)")
        windows = sliding_windows(mc)
        if windows:
            log.info("sliding-window attention: %s tokens", ", ".join(map(str, windows)))
        self.attention, self.attention_fallback = self._pick_attention()
        graphs = (StepGraphs(model, self.kv, self.device, cfg.max_running, self.max_model_len, capture=True,
                             windows=windows, paged=self.attention == "triton", max_tokens=cfg.max_batch_tokens)
                  if cfg.cuda_graphs and self.device.type == "cuda" and cfg.quantize != "int8" else None)
        self.runner = ModelRunner(model, self.kv, self.device, graphs, windows, self.attention,
                                  compiled=wants_compile(cfg.compile, self.device))
        self.async_scheduling = cfg.async_scheduling == "on" or (cfg.async_scheduling == "auto"
                                                                 and self.device.type == "cuda")
        log.info("scheduling: %s", "asynchronous (each step launched before the last one's tokens are read back)"
                 if self.async_scheduling else "synchronous")
        self.cache = AdapterCache(
            CacheCapacity(cfg.max_slots, cfg.host_cache_bytes, cfg.max_host_adapters),
            load=self.adapters.read, layers=self.layers, stats=self._stats,
            workers=cfg.load_workers, keep_host_copies=self.device.type != "cpu",  # CPU slots are host memory
        )
        self.routes = AliasRoutes(self.registry, self._warm, self._load_state, cfg.promotion_wait_s)
        self.adapters.route = self.routes.route
        self.scheduler = Scheduler(cfg.max_running, cfg.max_batch_tokens, cfg.max_queue)
        self.admitter = Admitter(self.cache, self.blocks, self._stats)
        self._warm_up()
        self.ready = True
        self._accepting = True
        if run_loop:
            self.start_loop()
        log.info("engine ready: %s (%s, %s) with %d LoRA-wrapped linears",
                 self.base.name, cfg.quantize, self.device, len(self.layers))
        return self

    def _pick_attention(self) -> tuple[str, str | None]:
        """The attention backend (attention.pick_attention), its kernel checked against the
        reference on this device first: (backend, why the Triton kernel was given up or None).
        "auto" falls back to SDPA, logged; "triton" asked for by name fails the start instead."""
        requested = self.config.attention
        backend = pick_attention(requested, self.device)
        problem = check_paged_kernel(self.device, self.dtype) if backend == "triton" else None
        if problem is not None:
            if requested == "triton":
                raise ValueError(f"attention='triton': the paged attention kernel failed its check at start "
                                 f"({problem}); use attention='auto' to serve with SDPA")
            log.warning("the paged attention kernel failed its check at start (%s): attention runs on SDPA",
                        problem)
            backend = "sdpa"
        log.info("attention: %s", backend)
        return backend, problem

    def start_loop(self) -> None:
        """Run steps on a thread of the engine's own from now on (an engine started with
        `run_loop=False`, driven by `step()` until here)."""
        if self._thread is not None:
            raise RuntimeError("the engine loop is already running")
        self._thread = threading.Thread(target=self._loop, name="loradock-engine", daemon=True)
        self._thread.start()

    def _warm_up(self) -> None:
        self.compile_fallback: str | None = None  # why the compiled forward was given up
        blocks: list[int] = []
        if not self.kv.grow(blocks, 2):
            raise ValueError("the KV pool is empty: raise kv_cache_tokens or kv_cache_bytes")
        try:
            if self.runner.compiled:  # first: the compiled graph is traced under its own rules
                self._compile(blocks)
            self.runner.forward([StepItem(blocks, 0, [self.tokenizer.eos_token_id or 0] * 2, 0, True)])
        finally:
            self.kv.free(blocks)
        # Triton compiles on first use: now, not in a request's step (or the torch ops, see there)
        static_batch = static_lora_batch(torch.zeros(1, dtype=torch.long, device=self.device))
        self.lora_fallback = prepare_kernels(list(self.layers.values()), lora_batch([1] * 17, self.device),
                                             static_batch, by_name=self.config.lora_ops == "triton")
        if self.runner.graphs is not None:
            self.runner.graphs.capture_all(StepItem([0], 0, [0], 0, True))  # padding rows on the null block

    def _compile(self, blocks: list[int]) -> None:
        """Compile the forward (`compile` "on", or "auto" on CUDA). Where the compiler fails,
        "auto" serves eagerly, logged; "on" fails the start."""
        log.info("compiling the model's forward (torch.compile; cached in %s) ...",
                 os.environ["TORCHINDUCTOR_CACHE_DIR"])
        try:
            log.info("compiled in %.1f s", self.runner.compile(blocks))
        except Exception as e:
            if self.config.compile == "on":
                raise ValueError(f"compile='on': compiling the model failed ({type(e).__name__}: {e}); "
                                 "use compile='off' to serve eagerly") from e
            log.warning("compiling the model failed (%s: %s); serving eagerly", type(e).__name__, e)
            self.compile_fallback = f"compile failed: {type(e).__name__}"
            self.runner.serve_eagerly()

    def shutdown(self, drain: bool = True, timeout: float | None = 30.0) -> None:
        """Stop accepting requests; with `drain`, let queued and running ones finish first
        (up to `timeout` s). Whatever remains fails with EngineShutdownError."""
        self._accepting = False
        if not self.ready:
            return
        deadline = None if timeout is None else time.monotonic() + timeout
        if drain and self._thread is not None:
            while self.scheduler.running or self.scheduler.num_waiting or self._unsent:
                if deadline is not None and time.monotonic() > deadline:
                    break
                time.sleep(0.01)
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None
        # the loop's last tokens (it has stopped: this thread owns the state now)
        last, self._in_flight = self._in_flight, None
        if last is not None:
            self._land(last)
        self._send_all()
        error = EngineShutdownError("the engine shut down before this request finished")
        for seq in list(self._seqs.values()):
            if seq.status is SeqStatus.WAITING:
                self.scheduler.remove_waiting(seq)
            self._fail(seq, error)
        self.cache.shutdown()
        self.ready = False

    # ---- public API ------------------------------------------------------------------------

    def submit(self, request: GenerationRequest) -> RequestHandle:
        """Validate and queue a request; the adapter reference resolves to a version now."""
        if not self._accepting:
            raise EngineShutdownError("the engine is not accepting requests (starting or shutting down)")
        if request.request_id in self._seqs:
            raise InvalidRequestError(f"request_id: {request.request_id!r} is already in flight")
        prompt_ids = self.encoder.encode(request)
        if len(prompt_ids) + 1 > self.kv.capacity_tokens:
            raise InvalidRequestError(
                f"prompt: {len(prompt_ids)} tokens (+1 to generate) need "
                f"{blocks_for(len(prompt_ids) + 1, self.kv.block_size)} KV blocks; the whole pool has "
                f"{self.kv.num_blocks} ({self.kv.capacity_tokens} tokens, {self.kv.nbytes} bytes)")
        adapter = None
        if request.mixture is not None:
            if request.adapter:
                raise InvalidRequestError("give adapter or mixture, not both")
            adapter = self.adapters.mixture_key(request.mixture)  # cached like a version, by recipe
        elif request.adapter:
            adapter = self.adapters.key(request.adapter, request.route_key)
        wanted = request.sampling.max_new_tokens
        if wanted is not None and len(prompt_ids) + wanted > self.max_model_len:
            raise InvalidRequestError(  # up front, as vLLM and OpenAI do, not cut at the context's end
                f"sampling.max_new_tokens: the prompt's {len(prompt_ids)} tokens + {wanted} new ones exceed "
                f"max_model_len={self.max_model_len}; ask for at most {self.max_model_len - len(prompt_ids)}")
        # Capped by the pool too, so a sequence alone always fits and preemption always ends.
        max_len = min(self.max_model_len if wanted is None else len(prompt_ids) + wanted, self.kv.capacity_tokens)
        structured = request.sampling.structured or tool_calls.constraint(request)
        matcher = None if structured is None else self.grammars.matcher(structured)
        handle = RequestHandle(request.request_id, self._request_cancel)
        seq = Sequence(
            request=request, handle=handle, prompt_ids=prompt_ids, adapter=adapter,
            sampler=Sampler(request.sampling, self.device, self.eos_ids),
            text=TextStream(self.tokenizer, request.sampling.stop), max_len=max_len, matcher=matcher,
        )
        self._seqs[request.request_id] = seq
        try:
            self.scheduler.add(seq)
        except EngineError:
            del self._seqs[request.request_id]
            raise
        key = adapter.ref if adapter else BASE_KEY
        self._stats.add(key, requests=1, prompt_tokens=len(prompt_ids))
        if adapter is not None:
            future = self.cache.prefetch(adapter)
            if future is not None:
                future.add_done_callback(lambda _: self._wake.set())
        self._wake.set()
        return handle

    def generate(self, request: GenerationRequest, timeout: float | None = None) -> GenerationResult:
        """Submit and wait for the result (drives the loop itself when no loop thread runs)."""
        handle = self.submit(request)
        if self._thread is None:
            while not handle.done:
                if not self.step():
                    time.sleep(0.001)
        return handle.result(timeout)

    def route(self, ref: str, route_key: str | None = None) -> str:
        """The concrete `name@N` an alias reference is served by for one request now (other
        references unchanged): the HTTP edge routes with it, so both edges promote alike."""
        return self.routes.route(ref, route_key)

    def _warm(self, ref: str) -> None:
        """Start loading version `ref` into host memory (an alias is about to point at it)."""
        try:
            future = self.cache.prefetch(self.adapters.key(ref))
        except EngineError as e:
            log.error("cannot load %s for its alias: %s", ref, e)
            return
        if future is not None:
            future.add_done_callback(lambda _: self._wake.set())

    def _load_state(self, ref: str) -> LoadState:
        try:
            return self.cache.state(self.adapters.key(ref))[0]
        except EngineError:  # deleted or refused since the alias moved
            return LoadState.FAILED

    def load_adapter(self, ref: str, pin: bool = False) -> ResolvedAdapter:
        """Resolve `ref`, read it from the registry and place it in a device slot.
        With `pin`, keep it resident until `unload_adapter`."""
        key = self.adapters.key(ref)
        try:
            self.cache.wait_ready(key)
        except EngineError:
            raise
        except Exception as e:
            raise AdapterUnavailableError(f"adapter {key.ref}: {e}") from e

        def place() -> ResolvedAdapter:
            if pin and not self.cache.is_pinned(key) and self._pinned_count() >= self.config.max_slots - 1:
                raise AdapterUnavailableError(
                    f"cannot pin {key.ref}: at most max_slots - 1 = {self.config.max_slots - 1} adapters "
                    "may be pinned, so one slot stays free for the rest")
            if self.cache.acquire(key) is None:
                if self.cache.state(key)[0] is not LoadState.READY:  # evicted from host meanwhile
                    self.cache.wait_ready(key)
                if self.cache.acquire(key) is None:
                    raise AdapterUnavailableError(
                        f"no free device slot for {key.ref}: all {self.config.max_slots} slots are used "
                        "by running requests or pinned adapters")
            self.cache.release(key)
            if pin:
                self.cache.set_sticky(key, True)
            return key

        return self._on_loop(place)

    def unload_adapter(self, ref: str) -> bool:
        """Drop `ref`'s version from the device slots and host memory (and its pin).
        False when it was not resident; AdapterUnavailableError while requests use it."""
        key = self.adapters.key(ref)

        def drop() -> bool:
            try:
                return self.cache.unload(key)
            except RuntimeError as e:
                raise AdapterUnavailableError(str(e)) from e

        return self._on_loop(drop)

    def unpin(self, ref: str) -> None:
        """Undo `load_adapter(ref, pin=True)`: the version stays resident until the cache needs
        its slot (the cluster's per-replica LRU unpins what it evicts)."""
        self.cache.set_sticky(self.adapters.key(ref), False)

    def tokenize(self, request: GenerationRequest) -> list[int]:
        """The prompt token ids `request` would be served with (its limits checked), not run."""
        return self.encoder.encode(request)

    def detokenize(self, token_ids: list[int]) -> str:
        bad = [t for t in token_ids if not isinstance(t, int) or not 0 <= t < self.encoder.vocab_size]
        if bad:
            raise InvalidRequestError(f"prompt_token_ids: {bad[:5]} not in the vocabulary [0, "
                                      f"{self.encoder.vocab_size})")
        return self.tokenizer.decode(token_ids)

    def resident_adapters(self) -> list[ResidentAdapter]:
        """Adapter versions in device slots and in host memory."""
        snap = self.cache.resident()
        out = [ResidentAdapter(d["adapter"], "device", d["slot"], d["pins"], d["sticky"], 0)
               for d in snap["device"]]
        out += [ResidentAdapter(h["adapter"], "host", None, 0, False, h["bytes"]) for h in snap["host"]]
        return out

    def info(self) -> EngineInfo:
        cfg = self.config
        return EngineInfo(
            base_name=self.base.name, base_fingerprint=self.base.fingerprint,
            quantization=(cfg.quantize if self.format_emulated is None
                          else f"{cfg.quantize} (emulated: {self.format_emulated})"),
            device=str(self.device), dtype=str(self.dtype).removeprefix("torch."),
            compute_dtype=self.recipe.compute_dtype, max_slots=cfg.max_slots,
            max_rank=cfg.max_rank, host_cache_bytes=cfg.host_cache_bytes,
            max_host_adapters=cfg.max_host_adapters, max_running=cfg.max_running,
            max_batch_tokens=cfg.max_batch_tokens, max_queue=cfg.max_queue,
            max_prompt_tokens=self.encoder.max_prompt_tokens, max_model_len=self.max_model_len,
            kv_cache_tokens=self.kv.capacity_tokens,
            lora_ops=cfg.lora_ops if self.lora_fallback is None else f"{cfg.lora_ops} ({self.lora_fallback})",
            tool_call_parser=self.tool_format, vocab_size=self.encoder.vocab_size,
            attention=self.attention if self.attention_fallback is None
            else f"{self.attention} ({self.attention_fallback})",
            compile="on" if self.runner.compiled else "off" if self.compile_fallback is None
            else f"off ({self.compile_fallback})",
        )

    def counters(self, key: str) -> dict[str, int]:
        """One adapter version's counters ("name@version" or "<base>"): what a cluster replica
        reports with each finished request, without the whole of `stats()`."""
        return self._stats.counters(key)

    def stats(self) -> dict:
        """Counters and latency histograms per adapter version ("name@version", "<base>") and
        current gauges."""
        return {
            "adapters": self._stats.snapshot(),
            "latency": self._stats.latency(),
            "resident": sorted({(r.adapter.ref, r.tier) for r in self.resident_adapters()}),
            "promoting": sorted(self.routes.moving()),
            "running": len(self.scheduler.running),
            "waiting": self.scheduler.num_waiting,
            "kv_tokens_reserved": self.kv.used_tokens,
            "kv_cached_blocks": self.kv.cached_blocks,
            "preemptions": self.preemptions,
            "host_cache_bytes_used": self.cache.host_bytes,
            "steps": self.steps,
        }

    # ---- the loop --------------------------------------------------------------------------

    def _on_loop(self, fn: Callable[[], T]) -> T:
        """Run `fn` on the loop thread (it touches slot buffers) and return its result."""
        if self._thread is None or threading.current_thread() is self._thread:
            return fn()
        future: Future = Future()
        self._inbox.put((fn, future))
        self._wake.set()
        return future.result()

    def _request_cancel(self, handle: RequestHandle) -> None:
        def cancel() -> None:
            seq = self._seqs.get(handle.request_id)
            if seq is None:
                return
            if seq.status is SeqStatus.WAITING:
                self.scheduler.remove_waiting(seq)
            self._complete(seq, FinishReason.CANCELLED)

        if self._thread is None:
            cancel()
        else:
            self._inbox.put((cancel, Future()))
            self._wake.set()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                worked = self.step()
            except Exception:  # a bug in the step itself: log it, keep serving
                log.exception("engine step failed")
                worked = False
            if not worked:
                self._wake.wait(timeout=0.05)
                self._wake.clear()

    def _run_inbox(self) -> None:
        while True:
            try:
                fn, future = self._inbox.get_nowait()
            except queue.Empty:
                return
            try:
                future.set_result(fn())
            except BaseException as e:
                future.set_exception(e)

    def step(self) -> bool:
        """Run one engine step; False when there was nothing to do. With asynchronous
        scheduling the step is planned and launched before the last step's tokens are read
        back: its sequences' decode tokens are read on the device (`StepItem.fed_from`)."""
        self._run_inbox()
        plan = self.scheduler.schedule(self._admit, self.blocks.grow, self._preempt)
        last, self._in_flight = self._in_flight, None  # the last step's tokens, still on the device
        if not plan:
            if last is not None:
                self._land(last)
            return self._send_all() or last is not None
        self.steps += 1
        items = []
        for seq, n in plan:
            tokens = seq.pending_tokens(n)
            items.append(StepItem(seq.blocks, seq.computed, tokens, seq.slot,
                                  seq.computed + len(tokens) == seq.num_tokens,
                                  seq.needs_prompt_logits(len(tokens)),
                                  last.rows[id(seq)] if tokens[-1] == PENDING else None))
        try:
            step = self.runner.forward(items, None if last is None else last.tokens)
        except Exception as e:
            log.exception("forward pass failed; failing the %d requests of this step", len(plan))
            for seq, _ in plan:
                self._fail(seq, EngineError(f"internal error in the forward pass: {e}"))
            if last is not None:
                self._land(last)
            self._send_all()
            return True
        if last is not None:  # sampled before this step's forward: read back at once
            self._land(last)
        for (seq, _), item in zip(plan, items, strict=True):
            if seq.status is SeqStatus.RUNNING:  # not ended by a token just read back
                self.blocks.computed(seq, len(item.tokens))
        # The device runs this step now (a graph replay, or kernels queued): stream the last
        # step's tokens meanwhile. A stop string found here ends its sequence; this step's
        # token for it is dropped below.
        self._send_all()
        add_prompt_logprobs(step, [seq for seq, _ in plan], items)
        constrained = [(row, seq.matcher) for (seq, _), row in zip(plan, step.rows, strict=True)
                       if row is not None and seq.matcher is not None and seq.status is not SeqStatus.FINISHED]
        if constrained:  # structured outputs: forbidden tokens' logits to -inf, in their rows only
            mask_rows(step.logits, [row for row, _ in constrained], [m for _, m in constrained])
        picking: list[tuple[Sequence, int]] = []  # (sequence, logits row)
        processed: list[tuple[Sequence, int, torch.Tensor]] = []  # rows not plain greedy, processors applied
        for (seq, _), row in zip(plan, step.rows, strict=True):
            if row is None or seq.status is SeqStatus.FINISHED:
                continue
            try:
                if not seq.sampler.batched_greedy:
                    processed.append((seq, row, seq.sampler.process(step.logits[row], seq.prompt_ids,
                                                                    seq.output_ids)))
                picking.append((seq, row))
            except Exception as e:
                self._sampling_failed(seq, e)
        tokens = self._pick(step.logits, processed)
        sampled = SampledTokens(tokens, [(seq, row) for seq, row in picking if seq.status is not SeqStatus.FINISHED],
                                step.logits)
        for seq, _ in sampled.picked:
            seq.in_flight += 1
        if self.async_scheduling:
            self._in_flight = sampled  # read back once the next step is launched
        else:
            self._land(sampled)
        return True

    def _land(self, sampled: SampledTokens) -> None:
        """Read a step's sampled tokens back (the step's one wait for the device) and apply each
        to its sequence, unless it ended meanwhile (cancelled, failed, or ended by the token
        before: that token was computed for nothing and is dropped)."""
        tokens = sampled.tolist()
        landed = []
        for seq, row in sampled.picked:
            seq.in_flight -= 1
            if seq.status is not SeqStatus.FINISHED:
                landed.append((seq, row, tokens[row]))
        logprobs = generated_logprobs(sampled.logits, landed)
        for seq, _, token in landed:
            try:
                self._on_token(seq, token, logprobs.get(seq.request_id))
            except Exception as e:
                log.exception("request %s failed after sampling", seq.request_id)
                self._fail(seq, EngineError(f"internal error: {e}"))

    def _pick(self, logits: torch.Tensor, processed: list[tuple[Sequence, int, torch.Tensor]]) -> torch.Tensor:
        """Every row's next token, on the device: the argmax, or for the rows in `processed`
        `sample_rows` over all of them in one batch. Should that batch fail, each row is drawn
        alone, so only a request whose own draw fails is failed."""
        tokens = logits.argmax(dim=-1)
        if processed:
            rows = to_device([row for _, row, _ in processed], logits.device)
            try:
                drawn = sample_rows(torch.stack([p for _, _, p in processed]), [q.sampler for q, _, _ in processed])
            except Exception:
                log.exception("sampling %d rows together failed; drawing each alone", len(processed))
                drawn = torch.stack([self._draw_alone(seq, p, logits.argmax(dim=-1)[row])
                                     for seq, row, p in processed])
            tokens = tokens.index_copy(0, rows, drawn)
        return tokens

    def _draw_alone(self, seq: Sequence, row_logits: torch.Tensor, fallback: torch.Tensor) -> torch.Tensor:
        try:
            return sample_rows(row_logits[None], [seq.sampler])[0]
        except Exception as e:
            self._sampling_failed(seq, e)
            return fallback  # never used: the request has failed

    def _sampling_failed(self, seq: Sequence, error: Exception) -> None:
        log.exception("request %s failed while sampling", seq.request_id, exc_info=error)
        self._fail(seq, EngineError(f"internal error: {error}"))

    def _admit(self, seq: Sequence) -> Admission:
        """The scheduler's question: may `seq` start now? (see `admission.Admitter`)"""
        if seq.handle.cancel_requested:
            self._complete(seq, FinishReason.CANCELLED)
            return Admission.DROP
        admission, error = self.admitter.admit(seq, others_running=bool(self.scheduler.running))
        if error is not None:
            self._fail(seq, error)
        return admission

    def _preempt(self, seq: Sequence) -> None:
        """Give back everything a running sequence holds; it recomputes its tokens when readmitted
        (its full blocks may still be in the prefix cache then)."""
        self.admitter.release(seq)
        seq.preemptions += 1
        self.preemptions += 1
        log.info("KV pool full: preempted request %s (%d tokens, to be recomputed)",
                 seq.request_id, seq.num_tokens)

    def _on_token(self, seq: Sequence, token: int, logprob: TokenLogprob | None = None) -> None:
        """A sampled token's effects the next step depends on: the grammar's state, the
        sequence's tokens, and whether it ends here (end of sequence, a stop token, its length),
        which frees its KV blocks and slot now. Its text and event follow in `_send`."""
        if seq.matcher is not None and not seq.matcher.accept_token(token):
            raise EngineError(f"token {token} breaks the structured output's grammar")
        seq.output_ids.append(token)
        if logprob is not None:
            seq.logprobs.append(logprob)
        if seq.first_token_at is None:
            seq.first_token_at = time.monotonic()
        finish = seq.finish_reason(token, self.eos_ids)
        seq.unsent.append((token, logprob, finish))
        self._unsent[id(seq)] = seq
        if finish is not None:
            self._release(seq)

    def _send_all(self) -> bool:
        """Stream every sequence's unsent tokens (`_send`); True when there were any."""
        pending = list(self._unsent.values())
        for seq in pending:
            try:
                self._send(seq)
            except Exception as e:
                log.exception("request %s failed while streaming", seq.request_id)
                self._fail(seq, EngineError(f"internal error: {e}"))
        return bool(pending)

    def _send(self, seq: Sequence) -> None:
        """Detokenize and stream `seq`'s unsent tokens in order. A stop string in the text ends
        it at that token (later ones are dropped); its result goes out after its last event."""
        self._unsent.pop(id(seq), None)
        entries, seq.unsent = seq.unsent, []
        for token, logprob, finish in entries:
            if seq.handle.done:
                return
            text = seq.text.add(token)
            if seq.text.stopped and finish in (None, FinishReason.LENGTH):
                finish = FinishReason.STOP
            if finish is not None:
                text += seq.text.finish()
            seq.handle._emit(TokenEvent(seq.request_id, token, text, seq.sent, logprob))
            seq.sent += 1
            self._stats.add(seq.adapter.ref if seq.adapter else BASE_KEY, generated_tokens=1)
            if finish is not None:
                del seq.output_ids[seq.sent:], seq.logprobs[seq.sent:]
                self._release(seq)
                self._finish(seq, finish)
                return

    # ---- finishing -------------------------------------------------------------------------

    def _release(self, seq: Sequence) -> None:
        """Free the KV blocks and the slot pin of `seq` (idempotent)."""
        if seq.status is SeqStatus.FINISHED:
            return
        if seq.status is SeqStatus.RUNNING:
            self.admitter.release(seq)
        elif seq.status is SeqStatus.WAITING:  # preempted, and its token in flight ended it
            self.scheduler.remove_waiting(seq)
        self.scheduler.finish(seq)
        seq.status = SeqStatus.FINISHED
        self._seqs.pop(seq.request_id, None)

    def _complete(self, seq: Sequence, reason: FinishReason) -> None:
        """End `seq` for `reason` (a cancellation), after streaming what it sampled before."""
        self._send(seq)
        if seq.handle.done:
            return
        self._release(seq)
        self._finish(seq, reason)

    def _finish(self, seq: Sequence, reason: FinishReason) -> None:
        """Hand `seq`'s result to its caller (its resources are given back already)."""
        now = time.monotonic()
        ms = lambda t: (t - seq.submitted_at) * 1000 if t is not None else 0.0  # noqa: E731
        if reason is not FinishReason.CANCELLED and seq.first_token_at is not None:
            self._stats.observe(seq.adapter.ref if seq.adapter else BASE_KEY,
                                time_to_first_token_seconds=seq.first_token_at - seq.submitted_at,
                                request_duration_seconds=now - seq.submitted_at)
        seq.handle._finish(GenerationResult(
            request_id=seq.request_id,
            text=seq.text.text,
            token_ids=tuple(seq.output_ids),
            finish_reason=reason,
            adapter=seq.adapter,
            prompt_tokens=len(seq.prompt_ids),
            completion_tokens=len(seq.output_ids),
            timings=Timings(queue_ms=ms(seq.admitted_at), ttft_ms=ms(seq.first_token_at), total_ms=ms(now)),
            logprobs=tuple(seq.logprobs) if seq.request.sampling.logprobs is not None else None,
            prompt_logprobs=(None, *seq.prompt_logprobs) if seq.request.sampling.prompt_logprobs is not None else None,
            prompt_token_ids=tuple(seq.prompt_ids),
            tool_calls=tool_calls.answer(seq.text.text, seq.request, self.tool_format),
        ))

    def _fail(self, seq: Sequence, error: BaseException) -> None:
        self._send(seq)  # what it sampled before the failure, then the error
        if seq.handle.done:
            return
        self._release(seq)
        self._stats.add(seq.adapter.ref if seq.adapter else BASE_KEY, errors=1)
        seq.handle._fail(error)

    def _pinned_count(self) -> int:
        return sum(1 for r in self.resident_adapters() if r.tier == "device" and r.pinned)
