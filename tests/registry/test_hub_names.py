"""The Hub pull's unsafe-name check, tested directly (no Hub, no mirror): a repo listing with a
name that could resolve outside the download folder on any OS is refused by loradock itself."""

from __future__ import annotations

import pytest
from loradock.registry import InvalidAdapterError
from loradock.registry.hub import _check_repo_files

ADAPTER = ["adapter_config.json", "adapter_model.safetensors"]
COMMIT = "0123456789abcdef" * 2 + "01234567"

UNSAFE = [
    "..",
    "../escaped.safetensors",
    "a/../../escaped.safetensors",
    "weights/..",
    "/etc/escaped.safetensors",
    "\\escaped.safetensors",
    "..\\escaped.safetensors",
    "a\\..\\..\\escaped.safetensors",
    "C:\\escaped.safetensors",
    "C:escaped.safetensors",
    "c:/escaped.safetensors",
    "\\\\server\\share\\escaped.safetensors",
]
SAFE = ["README.md", ".gitattributes", "sub/dir/extra.safetensors", "x..y.safetensors", "..hidden.json",
        "a.b/c"]


@pytest.mark.parametrize("name", UNSAFE)
def test_unsafe_name_is_refused_by_loradock(name: str) -> None:
    """Guards against the check missing '..', absolute, backslash or drive-letter names."""
    with pytest.raises(InvalidAdapterError) as info:
        _check_repo_files("acme/hostile", COMMIT, [*ADAPTER, name])
    message = str(info.value)
    assert message.startswith(f"acme/hostile@{COMMIT[:12]} holds file names that could escape the download folder")
    assert repr(name) in message and message.endswith("refusing to pull it")


def test_ordinary_names_are_accepted() -> None:
    """Guards against an over-eager check refusing ordinary adapter repos (dots inside names,
    subfolders, dotfiles)."""
    _check_repo_files("acme/fine", COMMIT, [*ADAPTER, *SAFE])
