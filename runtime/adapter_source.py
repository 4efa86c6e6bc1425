"""Where the engine's adapters come from: registry references resolved to concrete versions
(cached per registry generation) and versions read into host memory, with registry errors
turned into the engine's own."""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch
from loradock.registry import (
    DigestMismatchError,
    InvalidAdapterError,
    InvalidNameError,
    NotFoundError,
    Registry,
    RegistryError,
)
from loradock.registry.quantization import QuantizationRecipe, recipe_mismatch
from loradock.registry.signing import UNCHECKED, TrustStatus, claimed_signer
from loradock.registry.trust import TrustPolicy
from loradock.registry.version import AdapterVersion

from .adapter_merge import (
    CONFIG_FILE,
    MergeError,
    MergeRecipe,
    config_problems,
    merge_adapters,
    merged_rank,
    read_peft_dir,
    write_peft_dir,
)
from .adapter_weights import LoadedAdapter, ServedModel, largest_layout_numel, read_adapter
from .errors import (
    AdapterNotFoundError,
    AdapterUnavailableError,
    AdapterUntrustedError,
    EngineError,
    InvalidRequestError,
)
from .host_memory import HostBlocks
from .types import MIXTURE_PREFIX, AdapterMixture, ResolvedAdapter, ResolvedMixture

log = logging.getLogger(__name__)

def engine_error(e: RegistryError, ref: str) -> EngineError:
    """Map a registry error to the engine error a caller should see."""
    if isinstance(e, NotFoundError):
        return AdapterNotFoundError(str(e))
    if isinstance(e, InvalidNameError):
        return InvalidRequestError(f"adapter: {e}")
    if isinstance(e, (DigestMismatchError, InvalidAdapterError)):
        return AdapterUnavailableError(f"adapter {ref}: {e}")
    return AdapterUnavailableError(f"adapter {ref}: {e}")


# Room for an adapter file's safetensors header, per linear layer: up to four tensors (A, B, bias,
# magnitude) at ~150 bytes of JSON each.
HEADER_BYTES_PER_LINEAR = 1024


class AdapterSource:
    """Resolve references and read adapter versions for one served base model (thread-safe)."""

    def __init__(self, registry: Registry, served: ServedModel, dtype: torch.dtype, poll_s: float,
                 recipe: QuantizationRecipe | None = None, trust: TrustPolicy | None = None) -> None:
        self.registry = registry
        self.trust = trust  # None: every version is served
        self.recipe = recipe  # the served base's quantization, to report adapters trained on another
        self._warned: set[ResolvedAdapter] = set()
        self.served = served
        self.dtype = dtype
        self.blocks = HostBlocks()  # host buffers loads write into, reused (see host_memory)
        self.poll_s = poll_s
        self._configs: dict[str, dict] = {}  # version digest -> adapter_config.json (mixtures)
        self._resolved: dict[str, AdapterVersion] = {}  # ref -> version, valid for one generation
        self._generation: int | None = None
        self._last_poll = 0.0
        self._lock = threading.Lock()
        # alias -> concrete version for one request; the engine sets its warm-promotion routes
        self.route: Callable[[str, str | None], str] = registry.route

    def prime_host_memory(self, concurrent_loads: int) -> None:
        """Touch the buffers `concurrent_loads` loads of the largest adapter use (staging for a
        float32 file, the slot layout in the serving dtype) now, so the first loads find them."""
        numel = largest_layout_numel(self.served)
        header = HEADER_BYTES_PER_LINEAR * len(self.served.linear_shapes)
        for nbytes in (numel * 4 + header, numel * self.dtype.itemsize):
            self.blocks.prime(nbytes, concurrent_loads)

    def resolve(self, ref: str) -> AdapterVersion:
        """`ref` -> version, cached until the registry's generation changes (polled every
        `poll_s`), so alias moves and new versions are seen without a restart."""
        with self._lock:
            now = time.monotonic()
            if now - self._last_poll >= self.poll_s:
                self._last_poll = now
                generation = self.registry.generation()
                if generation != self._generation:
                    self._generation = generation
                    self._resolved.clear()
            version = self._resolved.get(ref)
        if version is None:
            try:
                version = self.registry.resolve(ref)
            except RegistryError as e:
                raise engine_error(e, ref) from e
            self._require_trusted(version)
            with self._lock:
                self._resolved[ref] = version
        return version

    def trust_status(self, version: AdapterVersion) -> TrustStatus:
        """What the trust policy says of `version` (UNCHECKED, with the claimed signer, without one)."""
        if self.trust is None:
            return TrustStatus(UNCHECKED, claimed_signer(version.path))
        return self.trust.check(version)

    def _require_trusted(self, version: AdapterVersion) -> None:
        status = self.trust_status(version)
        if status.state != UNCHECKED and not status.trusted:
            raise AdapterUntrustedError(f"adapter {version.ref} is refused by the trust policy "
                                        f"{self.trust.path}: {status.reason}")

    def key(self, ref: str, route_key: str = "") -> ResolvedAdapter:
        """The concrete version `ref` names now (an alias: the one this request goes to, by
        `route_key` for a weighted one; `self.route`, the engine's promotion.AliasRoutes)."""
        try:
            ref = self.route(ref, route_key or None)
        except RegistryError as e:
            raise engine_error(e, ref) from e
        version = self.resolve(ref)
        return ResolvedAdapter(version.name, version.version, version.digest)

    def read(self, key: ResolvedAdapter) -> LoadedAdapter:
        """Registry -> host memory (runs in the loader pool): re-verify digests, read, validate."""
        if isinstance(key, ResolvedMixture):
            return self._read_mixture(key)
        try:
            version = self.registry.resolve(key.ref)  # re-checks the files against the manifest
        except RegistryError as e:
            raise engine_error(e, key.ref) from e
        if version.digest != key.digest:
            raise AdapterUnavailableError(f"adapter {key.ref} changed on disk (digest {version.digest[:12]})")
        self._require_trusted(version)  # again: it may have been re-signed since it was resolved
        self._report_recipe(key, version.manifest)
        return read_adapter(key, version.path, version.manifest, self.served, self.dtype, self.blocks)

    def _report_recipe(self, key: ResolvedAdapter, manifest: dict) -> None:
        """Warn once per version served on a base quantized unlike the one it was trained on."""
        mismatch = recipe_mismatch(manifest, self.recipe) if self.recipe is not None else ""
        if mismatch and key not in self._warned:
            self._warned.add(key)
            log.warning("adapter %s was trained on a base quantized differently from the one served "
                        "(%s); its answers may differ from training's", key.ref, mismatch)

    # ---- mixtures: several versions merged into one adapter, per request ------------------

    def mixture_key(self, mixture: AdapterMixture) -> ResolvedMixture:
        """The concrete merge `mixture` names now: components resolved to versions and checked
        against each other and the served base from their configs (no weights read).
        Raises InvalidRequestError naming every problem."""
        recipe = MergeRecipe(tuple(c.weight for c in mixture.components), mixture.strategy,
                             mixture.density, mixture.majority_sign_method, mixture.seed)
        problems = recipe.problems(len(mixture.components))
        if problems:
            raise InvalidRequestError("mixture: " + "; ".join(problems))
        recipe = recipe.normalized()
        versions = [self.resolve(c.adapter) for c in mixture.components]
        labels = [v.ref for v in versions]
        bases = [(v.manifest.get("base") or {}).get("fingerprint") for v in versions]
        configs = [self._config(v) for v in versions]
        problems = config_problems(labels, configs, bases, recipe)
        problems += [f"{label} was trained for another base (fingerprint {fp[:12]}) than the one served"
                     for label, fp in zip(labels, bases, strict=True) if fp and fp != self.served.fingerprint]
        if not problems and merged_rank(configs, recipe.strategy) > self.served.max_rank:
            problems.append(f"the merge has rank {merged_rank(configs, recipe.strategy)}, above this "
                            f"engine's max_rank {self.served.max_rank}")
        if problems:
            raise InvalidRequestError("mixture: " + "; ".join(problems))
        components = tuple((ResolvedAdapter(v.name, v.version, v.digest), w)
                           for v, w in zip(versions, recipe.weights, strict=True))
        canonical = json.dumps({"components": [[c.ref, c.digest, w] for c, w in components],
                                **recipe.as_json()}, sort_keys=True)
        digest = hashlib.sha256(canonical.encode()).hexdigest()
        return ResolvedMixture(f"{MIXTURE_PREFIX}{digest[:12]}", 0, digest, components, recipe.strategy,
                               recipe.density, recipe.majority_sign_method, recipe.seed)

    def _config(self, version: AdapterVersion) -> dict:
        """A version's adapter_config.json, read once per digest (versions are immutable)."""
        config = self._configs.get(version.digest)
        if config is None:
            try:
                config = json.loads((version.path / CONFIG_FILE).read_text())
            except (OSError, ValueError) as e:
                raise AdapterUnavailableError(f"adapter {version.ref}: cannot read {CONFIG_FILE}: {e}") from e
            self._configs[version.digest] = config
        return config

    def _read_mixture(self, key: ResolvedMixture) -> LoadedAdapter:
        """Merge the components (in the served model's module order, as PEFT and `loradock
        adapters merge` do) and read the result like any adapter version."""
        recipe = MergeRecipe(tuple(w for _, w in key.components), key.strategy, key.density,
                             key.majority_sign_method, key.seed)
        inputs = []
        for component, _weight in key.components:
            try:
                version = self.registry.resolve(component.ref)  # re-checks the files
            except RegistryError as e:
                raise engine_error(e, component.ref) from e
            if version.digest != component.digest:
                raise AdapterUnavailableError(f"adapter {component.ref} changed on disk "
                                              f"(digest {version.digest[:12]})")
            self._require_trusted(version)
            inputs.append(read_peft_dir(component.ref, version.path,
                                        (version.manifest.get("base") or {}).get("fingerprint")))
        try:
            config, tensors = merge_adapters(inputs, recipe, module_order=list(self.served.linear_shapes))
        except MergeError as e:
            raise InvalidRequestError(f"mixture {key.ref}: {e}") from e
        with tempfile.TemporaryDirectory(prefix="loradock-mixture-") as tmp:
            write_peft_dir(config, tensors, Path(tmp))
            return read_adapter(key, Path(tmp), {"base": {"fingerprint": self.served.fingerprint}},
                                self.served, self.dtype, self.blocks)
