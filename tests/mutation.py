"""`make mutation`: break the code on purpose, one named breakage at a time, and check that
the tests meant to catch it fail. Not part of `make test`.

    .venv/bin/python tests/mutation.py [NAME ...]    # every breakage, or only those named

Each breakage is one textual patch (old -> new in one file). It is applied to a temporary
copy of the working tree (tracked files and untracked ones git does not ignore), never to
the tree itself. A generated `sitecustomize` on PYTHONPATH makes every Python process,
servers and CLIs the tests start included, import `loradock.*` from the copy instead of the
editable install. A failing test counts only if it passes again once the patch is undone.
Prints `NAME: caught by TEST` or `NAME: SURVIVED` per breakage; exits 1 unless all were caught.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[1]
PYTHON = ROOT / ".venv" / "bin" / "python"
PYTEST = ("-m", "pytest", "-x", "-q", "-p", "no:cacheprovider")


@dataclass(frozen=True)
class Breakage:
    name: str
    path: str  # relative to the repo root
    old: str  # must occur exactly once, or the script stops: the patch has gone stale
    new: str
    tests: tuple[str, ...]  # pytest arguments selecting the tests that must catch it


BREAKAGES = (
    Breakage(
        "engine-reader-raises-keyerror", "runtime/adapter_weights.py",
        "    version_dir = Path(version_dir)\n",  # read_adapter's first statement
        "    raise KeyError(adapter.ref)\n",
        ("tests/reliability/test_fuzz.py", "-k", "fuzzed"),
    ),
    Breakage(
        "nf4-loads-full-precision", "runtime/model_loader.py",
        "    bnb = recipe.bnb_kwargs()\n",
        "    bnb = None\n",
        ("tests/runtime/test_oracle.py", "-k", "tiny and nf4"),
    ),
    Breakage(
        "resume-restores-nothing", "trainer/checkpoint.py",
        '    load_adapter_weights(model, path / ADAPTER_WEIGHTS, "checkpoint")\n'
        '    optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))\n'
        '    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))\n'
        '    _set_rng_state(torch.load(path / f"rng_rank{rank}.pt", weights_only=True))\n'
        "    return TrainState(**meta[\"state\"])\n",
        "    return TrainState()\n",
        ("tests/trainer/test_resume.py",),
    ),
    Breakage(
        # same sizes, but one validation record also lands in training (one training record lost)
        "split-leaks-validation-into-train", "trainer/datasets.py",
        "    return [conversations[i] for i in order[n_val:]], [conversations[i] for i in order[:n_val]]\n",
        "    return [conversations[i] for i in order[n_val - 1:-1]], [conversations[i] for i in order[:n_val]]\n",
        ("tests/trainer/test_datasets.py",),
    ),
    Breakage(
        "hub-unsafe-name-check-off", "registry/hub.py",
        '    return name.startswith(("/", "\\\\")) or ":" in name or "\\\\" in name'
        ' or ".." in parts\n',
        "    return False\n",
        ("tests/registry", "tests/reliability/test_security.py", "-k", "unsafe or outside"),
    ),
    Breakage(
        "demo-restart-check-ignores-server", "loradock/demo.py",
        "    info_after = client.info()\n",
        "    info_after = info_before\n",
        ("tests/demo/test_demo_parts.py", "-k", "restart"),
    ),
    Breakage(
        # a query may read keys past its own position (the future of its chunk)
        "paged-attention-not-causal", "runtime/batching.py",
        "    masks = window_masks(key_pos <= q_pos, key_pos, q_pos, windows)  # [N, 1, Q, L] each\n",
        "    masks = window_masks(key_pos < (past + chunk)[:, None, None, None], key_pos, q_pos, windows)\n",
        ("tests/runtime/test_paged_attention.py",),
    ),
    Breakage(
        # a preempted sequence recomputes its prompt but forgets the tokens it had generated
        "recompute-forgets-output", "runtime/sequence.py",
        "        tokens = self.prompt_ids[start:] + self.output_ids[max(start - prompt, 0):end - prompt]\n",
        "        tokens = self.prompt_ids[start:end]\n",
        ("tests/runtime/test_preemption.py",),
    ),
    Breakage(
        # a sequence that got a slot but no KV room waits holding the slot's pin: the slot
        # can never be evicted, and with every slot held so, no adapter can be placed again
        "kv-wait-keeps-the-slot-pin", "runtime/admission.py",
        "                self.cache.release(seq.adapter)\n            return Admission.WAIT, None\n",
        "                pass\n            return Admission.WAIT, None\n",
        ("tests/runtime/test_admission_unit.py",),
    ),
    Breakage(
        # the staging buffer goes back to the pool only when the file was fine, so every
        # refused file leaks one (and a load that should reuse memory allocates instead)
        "refused-file-keeps-its-staging", "runtime/host_memory.py",
        "        except BaseException:\n            staging.release()\n            raise\n    try:\n"
        "        yield _tensor_views(data, path.name)\n    finally:\n        staging.release()\n",
        "        except BaseException:\n            staging.release()\n            raise\n"
        "    yield _tensor_views(data, path.name)\n    staging.release()\n",
        ("tests/runtime/test_host_memory.py",),
    ),
    Breakage(
        # the engine starts without touching its load buffers: the first cold loads pay for new pages
        "load-memory-not-primed", "runtime/engine.py",
        "        self.adapters.prime_host_memory(cfg.load_workers)\n", "",
        ("tests/runtime/test_engine.py::test_the_largest_adapter_loads_into_memory_primed_at_start",),
    ),
    Breakage(
        # Triton kernels that cannot run here keep serving: the engine starts with the failing op
        "triton-failure-keeps-the-kernels", "runtime/lora_layer.py",
        "        use_torch_ops(layers)\n", "",
        ("tests/runtime/test_oracle.py", "-k", "fall_back_to_torch"),
    ),
    Breakage(
        # a fused store that fails at start is left to fail every capture: decode steps run eagerly
        "failing-fused-store-kept", "runtime/lora_layer.py",
        "            use_torch_ops(layers, static_only=True)\n", "",
        ("tests/runtime/test_oracle.py", "-k", "fused_store"),
    ),
    Breakage(
        # the rows of a block's second slot range start at row 0 again: its tokens overwrite
        # the first range's and get their deltas
        "second-range-rows-overlap-the-first", "runtime/batching.py",
        "        at += hi - lo\n    filled", "        filled",
        ("tests/runtime/test_batching.py", "tests/runtime/test_lora_ops.py"),
    ),
    Breakage(
        # every adapter takes the lowest empty slot, whatever it targets
        "placement-ignores-targets", "runtime/adapter_cache.py",
        "slot = self._free_slot(from_top=not loaded.modules.keys() >= self._layers.keys())",
        "slot = self._free_slot(from_top=False)",
        ("tests/runtime/test_adapter_cache_unit.py",),
    ),
    Breakage(
        # a layer's bmm over the trimmed slot range writes its rows at the block's start, so
        # decode tokens get the delta of the slot next to theirs
        "trimmed-bmm-writes-the-wrong-rows", "runtime/lora_ops.py",
        "expand[lo:hi], out=y[part])\n",
        "expand[lo:hi], out=y[:hi - lo])\n",
        ("tests/runtime/test_lora_ops.py",),
    ),
    Breakage(
        # a signature is trusted for its key alone, whatever files it signed
        "signature-ignores-the-files", "registry/signing.py",
        "        if signed != expected:\n",
        "        if False:\n",
        ("tests/registry/test_signing.py", "-k", "swapped"),
    ),
    Breakage(
        # the prefix cache keys blocks by tokens alone: one adapter is served another's K/V
        "prefix-cache-ignores-the-adapter", "runtime/sequence.py",
        '        return "" if self.adapter is None else f"{self.adapter.ref}:{self.adapter.digest}"\n',
        '        return ""\n',
        ("tests/runtime/test_prefix_cache.py",),
    ),
    Breakage(
        # a captured decode step skips the bias/DoRA rows: right while no such adapter is loaded
        "static-step-drops-bias-and-dora", "runtime/lora_ops.py",
        "    return apply_bias_and_dora(out + delta.to(out.dtype), batch.token_slots, bias, dora_scale, base_bias)\n",
        "    return out + delta.to(out.dtype)\n",
        ("tests/runtime/test_oracle_variants.py", "-k", "static"),
    ),
    Breakage(
        # the host-memory pool lends a buffer without taking it off its free list: two loads share it
        "pool-lends-a-buffer-twice", "runtime/host_memory.py",
        "                self._free = [t for t in self._free if t is not tensor]\n",
        "                pass\n",
        ("tests/runtime/test_host_memory.py",),
    ),
    Breakage(
        # CUDA's captured step adds the delta but forgets the DoRA rows in the kernel's store
        "fused-store-drops-dora", "runtime/triton_kernels.py",
        "                z += scale[None, :] * z_base\n",
        "                z += 0 * scale[None, :] * z_base\n",
        ("tests/runtime/test_triton_lora.py", "-k", "fused"),
    ),
    Breakage(
        # the prefix cache keys blocks by the adapter's name: law@2 is served law@1's K/V
        "prefix-cache-keyed-by-name", "runtime/sequence.py",
        '        return "" if self.adapter is None else f"{self.adapter.ref}:{self.adapter.digest}"\n',
        '        return "" if self.adapter is None else self.adapter.name\n',
        ("tests/runtime/test_prefix_cache.py", "-k", "two_versions"),
    ),
    Breakage(
        # a mixture's cache key leaves the weights out: recipes differing only in weights share
        # one entry, the second served the first's merge and K/V
        "mixture-key-ignores-the-weights", "runtime/adapter_source.py",
        '        canonical = json.dumps({"components": [[c.ref, c.digest, w] for c, w in components],\n',
        '        canonical = json.dumps({"components": [[c.ref, c.digest] for c, _ in components],\n',
        ("tests/runtime/test_mixtures.py", "-k", "differing_only_in_weights"),
    ),
    Breakage(
        # the usage chunk of a stream with n > 1 counts the first choice only
        "streamed-usage-counts-one-choice", "runtime/http/generation.py",
        "                yield format_sse_event(data_str=writer.usage(results))\n",
        "                yield format_sse_event(data_str=writer.usage(results[:1]))\n",
        ("tests/http/test_in_process.py", "-k", "usage"),
    ),
    Breakage(
        # the trust policy picks the most specific matching pattern, not the first in the file
        "trust-policy-longest-match-wins", "registry/trust.py",
        "        return next((r for r in self.rules if fnmatch.fnmatchcase(name, r.pattern)), None)\n",
        "        return max((r for r in self.rules if fnmatch.fnmatchcase(name, r.pattern)),\n"
        "                   key=lambda r: len(r.pattern), default=None)\n",
        ("tests/registry/test_signing.py", "-k", "first_matching_rule"),
    ),
    Breakage(
        # a preempted sequence waits behind the requests that arrived after it
        "preempted-sequence-queued-at-the-back", "runtime/scheduler.py",
        "            self._enqueue(seq, front=True)\n",
        "            self._enqueue(seq, front=False)\n",
        ("tests/runtime/test_scheduler_unit.py",),
    ),
    Breakage(
        # the HTTP catalog hands the engine the alias as given: a cluster's replicas would pin
        # (and serve) whatever version the alias means when each resolves it
        "catalog-forwards-the-alias", "runtime/http/models.py",
        "        return ServedModel(version.ref, version.ref, version.name)\n",
        "        return ServedModel(ref, version.ref, version.name)\n",
        ("tests/http/test_in_process.py", "-k", "catalog"),
    ),
    Breakage(
        # bitsandbytes' own choice: its bf16 kernel on AVX512-BF16 CPUs (emulated in the tests elsewhere)
        "float32-recipe-takes-the-bf16-kernel", "registry/quantization.py",
        '    allowed = recipe.compute_dtype == "bfloat16" and not training\n',
        "    allowed = not training\n",
        ("tests/test_quantization_recipe.py", "tests/runtime/test_bnb_cpu_kernel.py"),
    ),
    Breakage(
        "sliding-window-ignored", "runtime/attention.py",
        "        mask = g.masks.get(window)\n",
        "        mask = g.masks.get(None)\n",
        ("tests/runtime/test_sliding_window.py",),
    ),
    Breakage(
        "sliding-window-one-key-short", "runtime/batching.py",
        "        masks[w] = causal & (key_pos > query_pos - w)\n",
        "        masks[w] = causal & (key_pos > query_pos - w + 1)\n",
        ("tests/runtime/test_sliding_window.py",),
    ),
    Breakage(
        "static-decode-step-ignores-the-window", "runtime/cuda_graphs.py",
        "                torch.logical_and(causal, self.key_positions[None, :] > (self.positions - window)[:, None],\n",
        "                torch.logical_and(causal, causal,\n",
        ("tests/runtime/test_sliding_window.py", "-k", "static"),
    ),
    Breakage(
        "attention-softcap-ignored", "runtime/attention.py",
        "    attend = F.scaled_dot_product_attention if softcap is None else partial(softcapped_attention, softcap=softcap)\n",
        "    attend = F.scaled_dot_product_attention\n",
        ("tests/runtime/test_families.py", "-k", "gemma2 and mixed"),
    ),
    Breakage(
        # GPT-NeoX is multi-head (its config has no num_key_value_heads): a pool of one K/V head
        "kv-heads-read-from-the-wrong-key", "runtime/model_loader.py",
        "    return getattr(config, \"num_key_value_heads\", None) or config.num_attention_heads\n",
        "    return getattr(config, \"num_key_value_heads\", None) or 1\n",
        ("tests/runtime/test_families.py", "-k", "gpt_neox and mixed"),
    ),
    Breakage(
        # every request that asked gets the first such row's distribution
        "logprobs-read-from-one-row", "runtime/logprobs.py",
        "    rows = torch.tensor([row for _, row, _ in wanted], device=logits.device)\n",
        "    rows = torch.tensor([wanted[0][1] for _ in wanted], device=logits.device)\n",
        ("tests/runtime/test_logprobs.py",),
    ),
    Breakage(
        "frequency-penalty-counts-the-prompt", "runtime/sampling.py",
        "        if (p.frequency_penalty or p.presence_penalty) and output_ids:\n"
        "            counts = torch.bincount(to_device(output_ids, device), minlength=logits.shape[0]).float()\n",
        "        if p.frequency_penalty or p.presence_penalty:\n"
        "            counts = torch.bincount(to_device(list(prompt_ids) + list(output_ids), device),\n"
        "                                    minlength=logits.shape[0]).float()\n",
        ("tests/runtime/test_sampling_controls.py",),
    ),
    Breakage(
        "structured-mask-on-the-first-rows", "runtime/structured.py",
        "    xgr.apply_token_bitmask_inplace(logits, to_device(bitmask, logits.device), indices=rows)\n",
        "    xgr.apply_token_bitmask_inplace(logits, to_device(bitmask, logits.device), indices=list(range(len(rows))))\n",
        ("tests/runtime/test_structured.py",),
    ),
    Breakage(
        # cached prompt blocks carry no logits: the prompt's first log probabilities would be missing
        "prompt-logprobs-read-the-prefix-cache", "runtime/sequence.py",
        "        return self.request.sampling.prompt_logprobs is None\n",
        "        return True\n",
        ("tests/runtime/test_logprobs.py", "-k", "prompt"),
    ),
    Breakage(
        "trainer-evaluation-repacks-the-base", "trainer/model.py",
        "    pin_bitsandbytes_cpu_kernel(model, recipe, training=True)  # evaluation must not cut the gradients\n",
        "",
        ("tests/trainer/test_qlora_cpu_kernel.py",),
    ),
    Breakage(
        "tool-calls-stream-as-content", "runtime/tool_calls.py",
        "            return cls(\"\", whole=True)\n",
        "            return None\n",
        ("tests/runtime/test_tool_calls.py", "tests/http/test_tool_calls.py::test_streamed_calls_arrive_as_tool_call_deltas"),
    ),
    Breakage(
        "required-tool-choice-unconstrained", "runtime/engine.py",
        "request.sampling.structured or tool_calls.constraint(request)",
        "request.sampling.structured",
        ("tests/runtime/test_tool_calls.py::test_the_engine_answers_forced_and_free_choices_with_parsed_calls",),
    ),
    Breakage(
        "tools-dropped-by-a-template-that-knows-none", "runtime/prompts.py",
        "self.renders_tools = tool_calls.renders_tools(",
        "self.renders_tools = True or tool_calls.renders_tools(",
        ("tests/runtime/test_tool_calls.py::test_a_template_without_tools_gets_them_in_hermes_form",),
    ),
    Breakage(
        "openapi-hides-the-event-stream", "runtime/http/openapi.py",
        "if path in STREAMING_PATHS:",
        "if path in STREAMING_PATHS and False:",
        ("tests/http/test_contract.py::test_every_answer_keeps_the_published_contract",),
    ),
    Breakage(
        "rollback-toggles-back-and-forth", "registry/alias_history.py",
        "                if stack:\n                    stack.pop()\n",
        "                stack.append(change.after)\n",
        ("tests/registry/test_alias_history.py::test_moves_are_recorded_and_rollback_walks_back",),
    ),
    Breakage(
        "canary-ignores-the-route-key", "registry/canary.py",
        "    if key:\n",
        "    if False:\n",
        ("tests/registry/test_alias_history.py::test_a_canary_splits_traffic_by_route_key_and_rolls_back",),
    ),
    Breakage(
        "history-written-after-the-alias", "registry/adapters.py",
        "            self.history(name).record(alias, \"tag\", before, canary.to_record(target), reason)\n"
        "            self._write_alias(name, alias, target)\n",
        "            self._write_alias(name, alias, target)\n"
        "            self.history(name).record(alias, \"tag\", before, canary.to_record(target), reason)\n",
        ("tests/registry/test_alias_history.py::test_sigkill_at_every_write_step_leaves_a_truthful_history",),
    ),
    Breakage(
        "paged-window-sees-one-key-too-many", "runtime/paged_attention_kernel.py",
        "seen = seen & (kp[None, :] > q_pos[:, None] - window)",
        "seen = seen & (kp[None, :] >= q_pos[:, None] - window)",
        ("tests/runtime/test_triton_attention.py",),
    ),
    Breakage(
        "promotion-switches-before-the-load", "runtime/promotion.py",
        "        if not ready and time.monotonic() < move.deadline:\n",
        "        if False:\n",
        ("tests/runtime/test_promotion.py::test_a_promotion_loads_the_new_version_before_it_takes_traffic",),
    ),
    Breakage(
        "require-reads-the-oldest-record", "registry/evals.py",
        "        newest = next((r for r in reversed(records) if r.metric == self.metric), None)",
        "        newest = next((r for r in records if r.metric == self.metric), None)",
        ("tests/registry/test_evals.py::test_the_newest_record_of_the_metric_decides",),
    ),
    Breakage(
        "batched-draws-ignore-the-seed", "runtime/sampling.py",
        "        if samplers[i].generator is not None:\n",
        "        if False:\n",
        ("tests/runtime/test_text.py::test_rows_sampled_together_draw_what_each_draws_alone",),
    ),
    Breakage(
        "hot-versions-keep-one-home", "runtime/cluster/hot.py",
        "        return ref if shard == 0 else f\"{ref}{SHARD}{shard}\"",
        "        return ref",
        ("tests/cluster/test_hot.py",),
    ),
    Breakage(
        "static-op-reads-past-the-rank", "runtime/triton_lora.py",
        "RANK_DIM=0 if ranks is None else 1 if transposed else 2,", "RANK_DIM=0,",
        ("tests/runtime/test_triton_lora.py",),
    ),
    Breakage(
        "grouped-shrink-swaps-members", "runtime/lora_layer.py",
        "self._input, self._pending = x, {id(m): h for m, h in zip(self.members, hs, strict=True)}",
        "self._input, self._pending = x, {id(m): h for m, h in zip(self.members, hs[::-1], strict=True)}",
        ("tests/runtime/test_triton_lora.py",),
    ),
    Breakage(
        "rust-stream-keeps-special-tokens", "runtime/detokenize.py",
        "DecodeStream(skip_special_tokens=True)", "DecodeStream(skip_special_tokens=False)",
        ("tests/runtime/test_text.py",),
    ),
    Breakage(
        "compiled-graph-drops-the-adapters", "runtime/lora_layer.py",
        "    return boundary_layer(boundary_index).step_forward(x)\n",
        "    return boundary_layer(boundary_index).base_layer(x)\n",
        ("tests/runtime/test_compiled.py::test_compiled_mixed_batches_match_peft",),
    ),
    Breakage(
        "compiled-graph-for-one-shape-only", "runtime/compiled.py",
        "    with fx_config.patch(backed_size_oblivious=True, use_duck_shape=False):",
        "    with fx_config.patch():",
        ("tests/runtime/test_compiled.py::test_compiled_mixed_batches_match_peft",),
    ),
    Breakage(
        "static-mixed-step-reads-no-cached-keys", "runtime/cuda_graphs.py",
        "seqs[:n] = torch.tensor([cu_lens[:-1], chunks, past]).T",
        "seqs[:n] = torch.tensor([cu_lens[:-1], chunks, [0] * n]).T",
        ("tests/runtime/test_oracle_variants.py::test_mixed_static_steps_match_peft",),
    ),
    Breakage(
        "static-mixed-step-pads-into-no-sequence", "runtime/cuda_graphs.py",
        "            seqs[n:n + len(starts), 0], seqs[n:n + len(starts), 1] = starts, lens\n",
        "",
        ("tests/runtime/test_cuda_graphs_unit.py",),
    ),
    Breakage(
        "static-run-pieces-longer-than-a-kernel-block", "runtime/batching.py",
        "return [(s, min(piece, end - s), slot) for start, end, slot in runs for s in range(start, end, piece)]",
        "return [(s, min(2 * piece, end - s), slot) for start, end, slot in runs for s in range(start, end, 2 * piece)]",
        ("tests/runtime/test_triton_lora.py",),
    ),
    Breakage(
        "split-k-expand-reads-one-partial-sum", "runtime/triton_lora.py",
        "SPLIT_K=splits, X_SPLITS=partials.shape[0])",
        "SPLIT_K=splits, X_SPLITS=1)",
        ("tests/runtime/test_triton_lora.py",),
    ),
    Breakage(
        "tokens-streamed-before-the-next-forward", "runtime/engine.py",
        "        self._unsent[id(seq)] = seq\n",
        "        self._unsent[id(seq)] = seq\n        self._send(seq)\n",
        ("tests/runtime/test_engine.py::test_a_steps_tokens_stream_while_the_next_step_runs",),
    ),
    Breakage(
        "fp8-dora-norms-of-the-unscaled-weight", "runtime/fp8.py",
        "        return self.qweight.float() * self.weight_scale\n",
        "        return self.qweight.float()\n",
        ("tests/runtime/test_fp8.py::test_an_fp8_engine_matches_peft_over_the_same_w8a8_base",),
    ),
    Breakage(
        "int4-levels-not-centred", "runtime/int4.py",
        "    w = (q.float().view(rows, groups, k // groups) - MID) * scales[..., None] + zeros[..., None]\n",
        "    w = q.float().view(rows, groups, k // groups) * scales[..., None] + zeros[..., None]\n",
        ("tests/runtime/test_int4.py::test_the_spec_rounds_each_group_to_16_levels_of_its_range",
         "tests/runtime/test_int4.py::test_an_int4_engine_matches_peft_over_the_same_4bit_base"),
    ),
    Breakage(
        "int4-dora-norms-of-the-bf16-read", "runtime/int4.py",
        "        return dequantize_groups(levels.round().clamp(0, LEVELS).view(rows, -1), scales, zeros)\n",
        "        return read\n",
        ("tests/runtime/test_int4.py::test_the_cpu_kernel_is_the_spec_in_bfloat16",),
    ),
    Breakage(
        "async-token-fed-from-the-wrong-row", "runtime/batching.py",
        "            sources.append(item.fed_from)\n",
        "            sources.append(0)\n",
        ("tests/runtime/test_async_scheduling.py::test_asynchronous_steps_serve_what_synchronous_steps_serve",),
    ),
    Breakage(
        "async-plans-a-token-past-the-length", "runtime/scheduler.py",
        "            if seq in self.running and not seq.in_prefill and seq.num_tokens < seq.max_len:\n",
        "            if seq in self.running and not seq.in_prefill:\n",
        ("tests/runtime/test_async_scheduling.py::test_a_step_is_launched_before_the_last_steps_tokens_are_read",),
    ),
    Breakage(
        "async-ended-while-preempted-stays-queued", "runtime/engine.py",
        "        elif seq.status is SeqStatus.WAITING:  # preempted, and its token in flight ended it\n"
        "            self.scheduler.remove_waiting(seq)\n",
        "",
        ("tests/runtime/test_async_scheduling.py::test_a_sequence_preempted_with_its_last_token_in_flight_ends",),
    ),
    Breakage(
        "console-writes-without-login", "runtime/http/console/console.py",
        "        if not self.authenticated(request):\n            return \"read-only until you log in\"\n",
        "",
        ("tests/http/test_console.py",),
    ),
    Breakage(
        "console-lineage-drops-alias-moves", "runtime/http/console/facts.py",
        "                if after == v.version:",
        "                if False:",
        ("tests/http/test_console_facts.py",),
    ),
    Breakage(
        "console-card-runs-html", "runtime/http/console/facts.py",
        '{"html": False}', '{"html": True}',
        ("tests/http/test_console_facts.py",),
    ),
)

SITECUSTOMIZE = '''"""Written by tests/mutation.py: import loradock.* from this copy of the tree."""
import sys
from importlib.util import spec_from_file_location

PACKAGES = {packages!r}


class CopyFinder:
    @classmethod
    def find_spec(cls, fullname, path=None, target=None):
        where = PACKAGES.get(fullname)
        if where is None:
            return None
        return spec_from_file_location(fullname, where + "/__init__.py",
                                       submodule_search_locations=[where])


sys.meta_path.insert(0, CopyFinder)  # ahead of the editable install's finder
'''


def copy_tree(dest: Path) -> None:
    """The working tree as git sees it (tracked + untracked, not ignored) into `dest`."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                            cwd=ROOT, check=True, capture_output=True).stdout.decode()
    for rel in filter(None, listed.split("\0")):
        src = ROOT / rel
        if src.is_file():  # skips files deleted in the tree but still in the index
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel, follow_symlinks=False)


def install_finder(copy: Path) -> dict[str, str]:
    """Write the sitecustomize; returns the environment that runs tests on the copy."""
    setuptools = tomllib.loads((copy / "pyproject.toml").read_text())["tool"]["setuptools"]
    packages = {name: str(copy / folder) for name, folder in setuptools["package-dir"].items()}
    site = copy / ".mutation-site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(SITECUSTOMIZE.format(packages=packages))
    # No .pyc in the copy: a patched module and its restored original must never share one.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")]))}
    probe = "import loradock.demo as d, loradock.runtime.engine as e; print(d.__file__, e.__file__)"
    files = subprocess.run([str(PYTHON), "-c", probe], cwd=copy, env=env, check=True,
                           capture_output=True, text=True).stdout.split()
    if not all(Path(f).is_relative_to(copy) for f in files):
        sys.exit(f"mutation: the copy is not what gets imported ({files}); the tests would run "
                 "the unbroken tree")
    return env


def pytest(copy: Path, env: dict[str, str], args: tuple[str, ...]) -> tuple[int, str]:
    done = subprocess.run([str(PYTHON), *PYTEST, *args], cwd=copy, env=env, capture_output=True,
                          text=True)
    return done.returncode, done.stdout + done.stderr


def run(breakage: Breakage, copy: Path, env: dict[str, str]) -> str:
    """Apply, test, undo; the verdict line."""
    target = copy / breakage.path
    original = target.read_text()
    target.write_text(original.replace(breakage.old, breakage.new))
    try:
        code, output = pytest(copy, env, breakage.tests)
    finally:
        target.write_text(original)
    if code == 0:
        return f"{breakage.name}: SURVIVED"
    failed = re.search(r"^(?:FAILED|ERROR) (\S+)", output, re.MULTILINE)
    if code != 1 or failed is None:
        print(output[-3000:], file=sys.stderr)
        return f"{breakage.name}: ERROR (pytest exit code {code}, no failing test named)"
    test = failed.group(1)
    if pytest(copy, env, (test,))[0] != 0:  # fails unbroken too: it caught nothing
        return f"{breakage.name}: INCONCLUSIVE ({test} fails without the breakage too)"
    return f"{breakage.name}: caught by {test}"


OPTIONS_WITH_VALUE = frozenset({"-k", "-m"})  # the pytest options the `tests` tuples use


def named_paths(args: tuple[str, ...]) -> list[str]:
    """The files, folders and node ids (`path::test`) among pytest arguments."""
    paths, value_next = [], False
    for arg in args:
        if value_next:  # the value of -k / -m
            value_next = False
        elif arg.startswith("-"):
            value_next = arg in OPTIONS_WITH_VALUE
        else:
            paths.append(arg)
    return paths


def stale(breakages: Sequence[Breakage], root: Path = ROOT) -> list[str]:
    """What no longer applies in the tree at `root`, one line per problem (empty: all apply):
    a patched file that is gone, an `old` text not there exactly once, a test path or test
    function that does not exist."""
    out = []
    for b in breakages:
        target = root / b.path
        if not target.is_file():
            out.append(f"{b.name} ({b.path}: no such file)")
        elif (count := target.read_text().count(b.old)) != 1:
            out.append(f"{b.name} ({b.path}: the old text occurs {count} times)")
        for node in named_paths(b.tests):
            path, *names = node.split("::")
            if not (root / path).exists():
                out.append(f"{b.name} (test path {path}: does not exist)")
            elif names and not defines(root / path, names[-1]):
                out.append(f"{b.name} (test {node}: no such test)")
    return out


def defines(path: Path, test: str) -> bool:
    """Whether the test file defines `test` (a function or class; parameters in [] ignored)."""
    name = re.escape(test.split("[")[0])
    return re.search(rf"^\s*(?:async\s+)?(?:def|class)\s+{name}\b", path.read_text(), re.MULTILINE) is not None


def main(names: list[str]) -> int:
    unknown = set(names) - {b.name for b in BREAKAGES}
    if unknown:
        sys.exit(f"mutation: unknown breakage {', '.join(sorted(unknown))}; "
                 f"known: {', '.join(b.name for b in BREAKAGES)}")
    chosen = [b for b in BREAKAGES if not names or b.name in names]
    verdicts = []
    with tempfile.TemporaryDirectory(prefix="loradock-mutation-") as tmp:
        copy = Path(tmp)
        copy_tree(copy)
        problems = stale(chosen, copy)
        if problems:
            sys.exit("mutation: the code a breakage patches has changed, update tests/mutation.py: "
                     + ", ".join(problems))
        env = install_finder(copy)
        for b in chosen:
            print(f"... {b.name}: pytest {' '.join(b.tests)}", file=sys.stderr, flush=True)
            start = time.monotonic()
            verdicts.append(run(b, copy, env))
            print(verdicts[-1], flush=True)
            print(f"    ({time.monotonic() - start:.0f} s)", file=sys.stderr, flush=True)
    return 0 if all(": caught by " in v for v in verdicts) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
