"""`loradock serve --trust POLICY` from a read-only registry: trusted versions serve, unsigned,
untrusted and tampered ones are refused with FAILED_PRECONDITION naming why (over gRPC and HTTP)
while the others keep serving; ListAdapters shows signer and trust; a writer's alias moves,
new versions and signatures are seen by the server, which cannot write the registry."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import httpx
import pytest
from loradock.registry import Registry

from loradock.client import Client, LoradockError
from tests.conftest import TINY_BASE
from tests.server.conftest import ServerProcess, start_server
from tests.signing_keys import make_key_pair, write_policy

# `sh -c SCRIPT HOME CMD...`: make HOME a read-only bind mount in a private mount namespace, then
# run the server there. Root ignores file modes, so a chmod would not make the registry read-only.
READ_ONLY_SCRIPT = 'mount --bind "$0" "$0" && mount -o remount,bind,ro "$0" && exec "$@"'


@dataclass
class TrustServer:
    server: ServerProcess
    registry: Registry  # the writer's view (this process can write)
    key_ids: dict[str, str]
    keys: dict[str, tuple[Path, Path]]
    digest_cache: Path
    read_only: bool
    http_url: str
    not_read_only_because: str  # why the server's registry is not a read-only mount ("" when it is)


def why_no_read_only_mount(tmp: Path) -> str:
    """Why a read-only bind mount in a private mount namespace cannot be made here; empty where it can."""
    tmp.mkdir(parents=True, exist_ok=True)
    try:
        probe = subprocess.run(["unshare", "-m", "sh", "-c", READ_ONLY_SCRIPT + ' && ! touch "$0/x" 2>/dev/null',
                                str(tmp), "true"], capture_output=True, text=True)
    except FileNotFoundError:
        return "no unshare command (util-linux)"
    if probe.returncode == 0 and not (tmp / "x").exists():
        return ""
    who = "root, but it is not permitted" if os.geteuid() == 0 else f"needs root; running as uid {os.geteuid()}"
    if (tmp / "x").exists():
        detail = "the mount stayed writable"
    else:
        detail = probe.stderr.strip().splitlines()[0] if probe.stderr.strip() else f"exit {probe.returncode}"
    return f"cannot make a read-only bind mount in a private mount namespace here ({who}): {detail}"


def swap_in(target: Path, other: Path) -> None:
    """What an attacker with write access does: replace the adapter files and fix the manifest."""
    manifest = json.loads((target / "manifest.json").read_text())
    other_files = json.loads((other / "manifest.json").read_text())["files"]
    for rel in ("adapter_config.json", "adapter_model.safetensors"):
        (target / rel).chmod(0o644)
        shutil.copyfile(other / rel, target / rel)
        manifest["files"][rel] = other_files[rel]
    (target / "manifest.json").chmod(0o644)
    (target / "manifest.json").write_text(json.dumps(manifest))


@pytest.fixture(scope="module")
def trust_server(session_home: Path, adapter_dirs: dict[str, Path],
                 tmp_path_factory: pytest.TempPathFactory) -> Iterator[TrustServer]:
    tmp = tmp_path_factory.mktemp("trust")
    keys = {name: make_key_pair(tmp / "keys", name) for name in ("medical", "platform")}
    home = tmp / "home"
    home.mkdir()
    os.symlink(session_home / "bases", home / "bases")
    registry = Registry(home)
    med, plat = keys["medical"][0], keys["platform"][0]
    registry.publish(adapter_dirs["alpha"], "medical/notes", base=TINY_BASE, aliases=["prod"], sign_key=med)
    registry.publish(adapter_dirs["beta2"], "medical/rogue", base=TINY_BASE, sign_key=plat)
    registry.publish(adapter_dirs["gamma"], "general", base=TINY_BASE, aliases=["prod"], sign_key=plat)
    registry.publish(adapter_dirs["alpha"], "plain", base=TINY_BASE)
    swapped = registry.publish(adapter_dirs["alpha"], "swapped", base=TINY_BASE, sign_key=med)
    swap_in(swapped.path, registry.resolve("medical/rogue").path)
    # first match wins: medical/* only by the medical key, even though "*" trusts the platform key
    policy = write_policy(tmp / "trust.yaml", {"medical/*": [keys["medical"][1]],
                                               "*": [keys["medical"][1], keys["platform"][1]]})
    cache = tmp / "xdg-cache"
    not_read_only_because = why_no_read_only_mount(tmp / "probe")
    read_only = not not_read_only_because
    prefix = ("env", f"XDG_CACHE_HOME={cache}")
    if read_only:
        prefix += ("unshare", "-m", "sh", "-c", READ_ONLY_SCRIPT, str(home))
    server = start_server(home, tmp / "serve.log", "--trust", str(policy), "--http-port", "0", prefix=prefix)
    http = re.search(r"serving HTTP on (http://\S+)", server.log())
    key_ids = {name: registry.resolve(ref).manifest["signature"]["signer"]
               for name, ref in (("medical", "medical/notes"), ("platform", "general"))}
    try:
        yield TrustServer(server, registry, key_ids, keys, cache, read_only, http[1] if http else "",
                          not_read_only_because)
    finally:
        assert server.terminate() == 0, server.log()


def refusal(client: Client, ref: str) -> LoradockError:
    with pytest.raises(LoradockError) as err:
        client.generate("hello", adapter=ref, max_new_tokens=2)
    return err.value


def test_only_trusted_versions_serve_and_refusals_name_the_reason(trust_server: TrustServer):
    with Client(trust_server.server.address, timeout=60) as client:
        assert client.generate("hello", adapter="medical/notes@prod", max_new_tokens=2).adapter.ref == "medical/notes@1"
        for ref, reason in (("medical/rogue", "does not trust"), ("plain", "not signed"),
                            ("swapped", "signature is invalid")):
            err = refusal(client, ref)
            assert err.code == grpc.StatusCode.FAILED_PRECONDITION, (ref, err)
            assert f"adapter {ref}@1 is refused by the trust policy" in err.details and reason in err.details, err
        # the other adapters kept serving throughout
        assert client.generate("hello", adapter="general", max_new_tokens=2).adapter.ref == "general@1"
        assert client.generate("hello", adapter="medical/notes", max_new_tokens=2).adapter.ref == "medical/notes@1"
    answer = httpx.post(f"{trust_server.http_url}/v1/completions", timeout=60,
                        json={"model": "plain", "prompt": "hello", "max_tokens": 2})
    assert answer.status_code == 400 and answer.json()["error"]["code"] == "model_unavailable", answer.text
    assert "not signed" in answer.json()["error"]["message"]


def test_list_adapters_shows_signer_and_trust(trust_server: TrustServer):
    with Client(trust_server.server.address, timeout=60) as client:
        views = {v.name: v.versions[0] for v in client.list_adapters()}
    ids = trust_server.key_ids
    seen = {name: (v.signer, v.trust.state) for name, v in views.items()}
    assert seen == {
        "medical/notes": (ids["medical"], "trusted"),
        "medical/rogue": (ids["platform"], "untrusted"),
        "general": (ids["platform"], "trusted"),
        "plain": ("", "unsigned"),
        "swapped": (ids["medical"], "invalid"),
    }
    assert "medical/*" in views["medical/rogue"].trust.reason and views["general"].trust.reason == ""


def test_read_only_registry_sees_a_writers_changes(trust_server: TrustServer):
    if not trust_server.read_only:
        pytest.skip(f"{trust_server.not_read_only_because} (test_read_only_registry.py checks a "
                    "registry the server cannot write without a mount)")
    log = trust_server.server.log()
    assert "is read-only for this process" in log and str(trust_server.digest_cache) in log, log
    registry = trust_server.registry  # the writer, outside the server's read-only mount
    platform_key = trust_server.keys["platform"][0]
    with Client(trust_server.server.address, timeout=60) as client:
        new = registry.publish(trust_server.registry.resolve("general").path, "general", base=TINY_BASE,
                               sign_key=platform_key)
        registry.tag(new.ref, "prod")
        registry.sign("plain", platform_key)  # now trusted by the "*" rule
        deadline = time.monotonic() + 30
        while True:
            try:
                served = (client.generate("hello", adapter="general@prod", max_new_tokens=2).adapter.ref,
                          client.generate("hello", adapter="plain", max_new_tokens=2).adapter.ref)
                break
            except LoradockError:
                if time.monotonic() > deadline:
                    raise
            time.sleep(0.1)
        assert served == ("general@2", "plain@1")
    records = list((trust_server.digest_cache / "loradock" / "digests").rglob("*.json"))
    assert records, "the server kept no digest records in its cache directory"
