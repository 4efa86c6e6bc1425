"""The compiled model path: the model's own forward (transformers' definition) under
`torch.compile` with inductor.

The graph splits at two ops the compiler does not look into, each a `torch.library.custom_op`
registered beside its eager implementation: `loradock::lora_linear` (`lora_layer.py`: a base
linear, plain or quantized, plus each token's adapter delta) and `loradock::attention`
(`attention.py`: the step's K/V written into the paged pool, each query attending to its own
sequence). Both read the step from the batch context, which no graph could hold; what lies
between them (embedding, norms, rotary embeddings, activations, residual adds, the head) is
compiled and fused. A wrapped layer or the attention function sees that it is being traced
(`torch.compiler.is_compiling`) and emits its op; run eagerly they do what they always did.

The graph is dynamic in the step's tokens and kept logits, and traced so that one graph serves
every step (`one_graph_for_every_size`): one token or many, no logit kept, one or all. It is
compiled at start (`ModelRunner.compile`), cached on disk (`inductor_cache_dir`) so a restart
skips inductor's code generation, and after that the compiler is never invoked again: a step
the graph's guards refuse runs eagerly (`torch.compiler.set_stance("eager_on_recompile")`),
which is slower but never stalls the batch for a compile.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from loradock.registry.paths import cache_root
from torch.fx.experimental import _config as fx_config

# The step shapes run at start: (tokens, wants_logits, all_logits). The first is traced; the
# others are served by the same graph (`one_graph_for_every_size`), and running them checks so.
STEP_SHAPES = ((2, True, False), (1, True, False), (2, False, False), (2, True, True))


def wants_compile(mode: str, device: torch.device) -> bool:
    """EngineConfig.compile -> whether to compile: "auto" compiles on CUDA only (on CPU it halves
    the kernels of a step but not its time, and costs a minute at start: docs/architecture.md)."""
    return mode == "on" or (mode == "auto" and device.type == "cuda")


def inductor_cache_dir() -> Path:
    """Where compiled graphs are kept between starts: $XDG_CACHE_HOME/loradock/inductor."""
    return cache_root() / "inductor"


def compile_model(model: torch.nn.Module) -> Callable[..., object]:
    """`model` compiled (lazily, on its first call), dynamic in its sizes, with its inductor
    artifacts cached in `inductor_cache_dir` unless TORCHINDUCTOR_CACHE_DIR names another."""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    # Inductor writes its default (under /tmp) into the environment when first imported, as
    # some of our dependencies do: only a value other than that default was chosen by a person.
    chosen = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if chosen is None or os.path.abspath(chosen) == os.path.abspath(default_cache_dir()):
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(inductor_cache_dir())
    # Dynamo keeps its compiled versions per code object (transformers' forward, shared by every
    # model of a family) and runs eagerly after 8: each engine in a process compiles its own.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    return torch.compile(model, dynamic=True)


@contextlib.contextmanager
def one_graph_for_every_size() -> Iterator[None]:
    """While tracing: sizes 0 and 1 not specialized (size-oblivious reasoning) and equal sizes not
    assumed equal forever (no duck shapes), so a one-token step, a step that keeps no logit and
    one that keeps them all run the graph traced for a step of many tokens instead of three more
    compiles (each about as long as the first: tens of seconds for SmolLM2 on one CPU core)."""
    with fx_config.patch(backed_size_oblivious=True, use_duck_shape=False):
        yield


@contextlib.contextmanager
def no_new_compiles() -> Iterator[None]:
    """Within: compiled graphs run where their guards hold, and anything else runs eagerly
    instead of compiling."""
    with torch.compiler.set_stance("eager_on_recompile"):
        yield
