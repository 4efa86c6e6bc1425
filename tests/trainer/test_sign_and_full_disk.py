"""`loradock train` with `sign_key:`: a bad key fails before training; a full registry disk fails
the publish clearly, keeps the trained adapter, and the command it suggests publishes it signed."""

from __future__ import annotations

import contextlib
import io
import os
import re
from pathlib import Path

import yaml
from loradock.registry import Registry
from loradock.registry.trust import TrustPolicy

from loradock.cli import main
from tests.full_disk import files_under, fill, small_disk
from tests.signing_keys import make_key_pair, write_policy

from .conftest import make_tiny_config


def run_cli(*args: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(args))
    return code, out.getvalue(), err.getvalue()


def write_config(root: Path, base: str, **overrides) -> Path:
    path = root / "train.yaml"
    path.write_text(yaml.safe_dump({**make_tiny_config(root, base), **overrides}))
    return path


def test_an_unusable_sign_key_fails_before_training(tmp_path: Path, tiny_base, home: Path):
    config = write_config(tmp_path, tiny_base.name, sign_key=str(tmp_path / "missing.key"))
    code, _, err = run_cli("--home", str(home), "train", str(config))
    assert code == 2 and "sign_key: cannot read signing key" in err, err
    assert not (tmp_path / "run").exists()  # nothing trained


def test_train_publish_on_a_full_disk_keeps_the_adapter(tmp_path: Path, tiny_base, session_home: Path):
    private, public = make_key_pair(tmp_path / "keys", "team")
    with small_disk(tmp_path / "disk") as disk:
        home = disk / "home"
        home.mkdir()
        os.symlink(session_home / "bases", home / "bases")
        config = write_config(tmp_path, tiny_base.name, sign_key=str(private))
        before = files_under(home)
        filler = fill(disk)
        code, _, err = run_cli("--home", str(home), "train", str(config))
        assert code == 2 and "no space left" in err, err
        suggested = re.search(r"`loradock adapters publish (\S+) --name colors`", err)
        assert suggested, err
        adapter_dir = Path(suggested[1])
        assert (adapter_dir / "adapter_model.safetensors").is_file()  # the training is not lost
        registry = Registry(home)
        assert registry.list() == []
        registry.gc()
        assert [p for p in files_under(home) if ".locks" not in p] == before
        filler.unlink()
        code, out, err = run_cli("--home", str(home), "adapters", "publish", str(adapter_dir),
                                 "--name", "colors", "--sign-key", str(private))
        assert code == 0, err
        policy = TrustPolicy.load(write_policy(tmp_path / "trust.yaml", {"*": [public]}))
        assert policy.check(registry.resolve(out.strip())).trusted
