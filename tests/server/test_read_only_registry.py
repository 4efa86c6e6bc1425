"""`loradock serve` from a registry it cannot write, arranged without a mount and without root:
every file and directory of the registry loses its write bits, and where the tests run as root
(who ignores file modes through CAP_DAC_OVERRIDE) the server runs without that capability, so
the modes bind it as they bind any user. The same behaviour as the read-only mount of
test_trust.py (which needs root and a mount namespace): the server says the registry is
read-only and keeps its digest records elsewhere, serves, sees a writer's new versions and
alias moves, and writes nothing into the registry; a write asked of such a process is a clear
error that changes nothing, and the server keeps serving."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
from loradock.registry import Registry
from loradock.registry.digests import RACY_NS

from loradock.client import Client
from tests.conftest import TINY_BASE
from tests.full_disk import files_under
from tests.server.conftest import ServerProcess, start_server

# Root's capabilities that override file modes: without them root is bound by modes like anyone.
MODE_OVERRIDES = "-dac_override,-fowner"


def bound_by_modes() -> tuple[str, ...]:
    """The command prefix that runs a process which file modes bind: nothing for a user who is
    not root; for root, setpriv dropping CAP_DAC_OVERRIDE and CAP_FOWNER from the process's
    bounding and inheritable sets (no mount, no user namespace)."""
    if os.geteuid() != 0:
        return ()
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("running as root, and no setpriv (util-linux) to drop CAP_DAC_OVERRIDE with")
    return (setpriv, f"--bounding-set={MODE_OVERRIDES}", f"--inh-caps={MODE_OVERRIDES}")


def check_bound(prefix: tuple[str, ...], probe: Path) -> None:
    """Skip, saying why, unless a process started with `prefix` cannot create a file in a
    directory without write bits."""
    probe.mkdir(parents=True, exist_ok=True)
    probe.chmod(0o555)
    try:
        done = subprocess.run([*prefix, sys.executable, "-c",
                               "import sys, tempfile; tempfile.mkstemp(dir=sys.argv[1])", str(probe)],
                              capture_output=True, text=True, timeout=60)
    finally:
        probe.chmod(0o755)
    if done.returncode == 0 or "PermissionError" not in done.stderr:
        how = " ".join(prefix) or "this user"
        pytest.skip(f"file modes do not stop writes by a process run as {how} here "
                    f"(exit {done.returncode}): {done.stderr.strip()[-300:]}")


def protect(root: Path) -> dict[Path, int]:
    """Take the write bits off every directory and file under `root` (symlinks are left alone:
    bases/ points at the session's bases, outside). Returns the modes it changed."""
    changed = {}
    for path in [root, *root.rglob("*")]:
        if path.is_symlink():
            continue
        mode = stat.S_IMODE(path.lstat().st_mode)
        if mode & 0o222:
            changed[path] = mode
            path.chmod(mode & ~0o222)
    return changed


def restore(modes: dict[Path, int]) -> None:
    for path, mode in sorted(modes.items(), key=lambda item: len(item[0].parts)):
        if path.exists():
            path.chmod(mode)


@dataclass
class ReadOnlyServer:
    server: ServerProcess
    home: Path
    writer: Registry  # this process: it writes, within `writing`
    prefix: tuple[str, ...]  # runs a process that cannot write the registry
    digest_cache: Path
    modes: dict[Path, int]
    protected_at: float  # time.time() when the modes were taken off (a chmod is a change)

    @contextmanager
    def writing(self) -> Iterator[Registry]:
        """The writer's turn. As root the writer ignores the modes anyway; as another user they
        bind it too, so they are lifted for the turn and put back (on new files as well)."""
        restore(self.modes)
        try:
            yield self.writer
        finally:
            self.modes.update(protect(self.home))


@pytest.fixture(scope="module")
def read_only_server(session_home: Path, adapter_dirs: dict[str, Path],
                     tmp_path_factory: pytest.TempPathFactory) -> Iterator[ReadOnlyServer]:
    tmp = tmp_path_factory.mktemp("read-only")
    prefix = bound_by_modes()
    check_bound(prefix, tmp / "probe")
    home = tmp / "home"
    home.mkdir()
    os.symlink(session_home / "bases", home / "bases")
    writer = Registry(home)
    writer.publish(adapter_dirs["alpha"], "alpha", base=TINY_BASE, aliases=["prod"])
    writer.publish(adapter_dirs["gamma"], "gamma", base=TINY_BASE)
    cache = tmp / "xdg-cache"
    modes = protect(home)
    protected_at = time.time()
    try:
        server = start_server(home, tmp / "serve.log", prefix=("env", f"XDG_CACHE_HOME={cache}", *prefix))
        try:
            yield ReadOnlyServer(server, home, writer, prefix, cache, modes, protected_at)
        finally:
            assert server.terminate() == 0, server.log()
    finally:
        restore(modes)


def generate(client: Client, ref: str) -> str:
    return client.generate("hello", adapter=ref, max_new_tokens=2).adapter.ref


def test_the_server_serves_and_writes_nothing_into_the_registry(read_only_server: ReadOnlyServer):
    ro = read_only_server
    before = files_under(ro.home)
    log = ro.server.log()
    assert "is read-only for this process" in log and str(ro.digest_cache) in log, log
    # a file changed (chmod too) less than RACY_NS ago gets no digest record: wait that out
    time.sleep(max(0.0, ro.protected_at + RACY_NS / 1e9 + 0.1 - time.time()))
    with Client(ro.server.address, timeout=60) as client:
        assert generate(client, "alpha@prod") == "alpha@1"
        assert generate(client, "gamma") == "gamma@1"
    assert files_under(ro.home) == before  # no digest record, lock or staging dir of the server's
    records = list((ro.digest_cache / "loradock" / "digests").rglob("*.json"))
    assert records, "the server kept no digest records in its cache directory"


def test_a_writers_changes_are_seen(read_only_server: ReadOnlyServer):
    ro = read_only_server
    with Client(ro.server.address, timeout=60) as client:
        with ro.writing() as registry:
            new = registry.publish(registry.resolve("alpha").path, "alpha", base=TINY_BASE)
            registry.tag(new.ref, "prod")
        deadline = time.monotonic() + 30
        while (served := generate(client, "alpha@prod")) != "alpha@2":
            assert time.monotonic() < deadline, f"alpha@prod still serves {served} after the alias moved"
            time.sleep(0.1)
        assert generate(client, "alpha@1") == "alpha@1"


def test_a_write_is_a_clear_error_and_nothing_is_lost(read_only_server: ReadOnlyServer, tmp_path: Path):
    ro = read_only_server
    prod = ro.writer.resolve("alpha@prod").ref
    before = files_under(ro.home)
    cli = [*ro.prefix, sys.executable, "-m", "loradock.cli", "--home", str(ro.home)]
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache")}
    for argv, words in (
        (["adapters", "tag", "gamma@1", "prod"], "error: cannot write"),
        (["adapters", "rm", "gamma@1"], "error: cannot write"),
        (["serve", "--base", TINY_BASE, "--http-port", "0", "--allow-adapter-updates"],
         "--allow-adapter-updates publishes into the registry, which this process cannot write"),
    ):
        done = subprocess.run([*cli, *argv], capture_output=True, text=True, timeout=120, env=env)
        assert done.returncode == 2, (argv, done.stdout, done.stderr)
        assert words in done.stderr and "Traceback" not in done.stderr, (argv, done.stderr)
    assert files_under(ro.home) == before
    assert ro.writer.resolve("alpha@prod").ref == prod
    assert [v.ref for v in ro.writer.versions("gamma")] == ["gamma@1"]
    with Client(ro.server.address, timeout=60) as client:  # the server kept serving
        assert generate(client, "gamma") == "gamma@1"
        assert generate(client, "alpha@prod") == prod
