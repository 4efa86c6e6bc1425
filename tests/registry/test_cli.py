"""`loradock adapters ...`: the "done when" flow and the error paths a person sees."""

from __future__ import annotations

import json
import os
import stat

import pytest

from loradock.cli import main


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_done_when_flow(home, lora_dir, lora_dir_2, capsys):
    code, out, _ = run(capsys, "adapters", "publish", str(lora_dir), "--name", "medical", "--alias", "prod")
    assert (code, out) == (0, "medical@1\n")

    code, out, _ = run(capsys, "adapters", "show", "medical@prod", "--json")
    shown = json.loads(out)
    assert code == 0
    assert (shown["name"], shown["version"], shown["ref"], shown["aliases"]) == ("medical", 1, "medical@1", ["prod"])
    manifest = json.loads((home / "adapters/medical/versions/1/manifest.json").read_text())
    assert {k: shown[k] for k in manifest} == manifest
    assert shown["path"] == str(home / "adapters/medical/versions/1")
    assert len(shown["digest"]) == 64

    code, out, _ = run(capsys, "adapters", "publish", str(lora_dir_2), "--name", "medical")
    assert (code, out) == (0, "medical@2\n")
    code, out, _ = run(capsys, "adapters", "tag", "medical@2", "prod")
    assert (code, out) == (0, "medical@prod -> medical@2\n")
    assert json.loads(run(capsys, "adapters", "show", "medical@prod", "--json")[1])["version"] == 2

    code, out, _ = run(capsys, "adapters", "verify")
    assert (code, out) == (0, "2 ok, 0 failed\n")

    code, out, _ = run(capsys, "adapters", "list")
    header, row = out.splitlines()
    assert header.split() == ["NAME", "LATEST", "VERSIONS", "ALIASES", "BASE", "RANK", "CREATED"]
    assert row.split()[:6] == ["medical", "2", "2", "prod->2", "tiny-llama", "4"]
    listed = json.loads(run(capsys, "adapters", "list", "--json")[1])
    assert [(e["ref"], e["versions"], e["all_aliases"]) for e in listed] == [("medical@2", [1, 2], {"prod": 2})]

    code, out, _ = run(capsys, "adapters", "show", "medical@1")
    assert code == 0 and "ref             medical@1" in out and "adapter_model.safetensors" in out


def test_errors_are_one_line_with_exit_2(home, lora_dir, tmp_path, capsys):
    code, out, err = run(capsys, "adapters", "show", "nothing")
    assert code == 2 and out == ""
    assert err.startswith("error: unknown adapter 'nothing'")
    code, _, err = run(capsys, "adapters", "publish", str(tmp_path), "--name", "x")
    assert code == 2 and "missing adapter_config.json" in err
    run(capsys, "adapters", "publish", str(lora_dir), "--name", "medical", "--alias", "prod")
    code, _, err = run(capsys, "adapters", "rm", "medical@1")
    assert code == 2 and "alias(es) prod point to" in err
    code, out, _ = run(capsys, "adapters", "rm", "medical@1", "--force")
    assert (code, out) == (0, "deleted medical@1\n")


def test_verify_reports_tampering_and_rm_untag_gc(home, lora_dir, capsys):
    run(capsys, "adapters", "publish", str(lora_dir), "--name", "medical", "--alias", "prod")
    run(capsys, "adapters", "publish", str(lora_dir), "--name", "medical")
    weights = home / "adapters/medical/versions/2/adapter_model.safetensors"
    os.chmod(weights, stat.S_IRUSR | stat.S_IWUSR)
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    code, out, _ = run(capsys, "adapters", "verify")
    assert code == 1
    assert "medical@2: FAILED" in out and "adapter_model.safetensors: sha256" in out and "1 ok, 1 failed" in out
    code, _, err = run(capsys, "adapters", "show", "medical")
    assert code == 2 and "medical@2 no longer matches its manifest" in err
    assert json.loads(run(capsys, "adapters", "verify", "medical@1", "--json")[1]) == [
        {"ref": "medical@1", "ok": True, "problems": [], "signer": "", "trust": ""}
    ]
    assert run(capsys, "adapters", "rm", "medical@2")[0] == 0
    assert run(capsys, "adapters", "untag", "medical", "prod")[1] == "removed alias medical@prod\n"
    (home / "adapters/.staging/1-dead").mkdir()
    code, out, _ = run(capsys, "adapters", "gc", "--json")
    assert code == 0 and json.loads(out) == [str(home / "adapters/.staging/1-dead")]


@pytest.mark.parametrize("action", ["list", "show", "publish", "tag", "untag", "rm", "verify", "pull", "push", "gc"])
def test_every_action_has_help(action, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["adapters", action, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: loradock adapters " + action)
    assert len(out.splitlines()) > 4
