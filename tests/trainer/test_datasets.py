"""Dataset formats, dataset_info.json, validation of every record, duplicates and digests."""

from __future__ import annotations

import json

import pytest
from loradock.trainer.datasets import digest, load_datasets, split
from loradock.trainer.errors import DatasetError

from .conftest import write_json, write_jsonl

SYSTEM = {"role": "system", "content": "Be brief."}


def test_alpaca_with_input_system_and_history(tmp_path):
    write_json(tmp_path / "a.json", [{
        "instruction": "Translate", "input": "chat", "output": "cat", "system": "Be brief.",
        "history": [["hi", "hello"], ["how are you?", "fine"]],
    }])
    (conv,) = load_datasets(["a.json"], tmp_path).conversations
    assert conv == [
        SYSTEM,
        {"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "how are you?"}, {"role": "assistant", "content": "fine"},
        {"role": "user", "content": "Translate\nchat"}, {"role": "assistant", "content": "cat"},
    ]


def test_sharegpt_and_openai_styles_normalize_to_the_same_conversation(tmp_path):
    sharegpt = {"conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "q"},
                                  {"from": "gpt", "value": "a"}]}
    openai = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "q"},
                           {"role": "assistant", "content": "a"}]}
    write_jsonl(tmp_path / "s.jsonl", [sharegpt])
    write_json(tmp_path / "o.json", [openai])
    a = load_datasets(["s.jsonl"], tmp_path)
    b = load_datasets(["o.json"], tmp_path)
    expected = [SYSTEM, {"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    assert a.conversations == b.conversations == [expected]
    assert a.digest == b.digest  # same data, other layout: same digest


def test_json_and_jsonl_of_the_same_records_agree(tmp_path):
    rows = [{"instruction": f"q{i}", "output": f"a{i}"} for i in range(3)]
    write_json(tmp_path / "x.json", rows)
    write_jsonl(tmp_path / "x.jsonl", rows)
    assert load_datasets(["x.json"], tmp_path).digest == load_datasets(["x.jsonl"], tmp_path).digest
    assert load_datasets(["x.json"], tmp_path).digest != load_datasets(["x.json"], tmp_path, max_samples=2).digest


def test_dataset_info_json_columns_tags_and_folders(tmp_path):
    write_json(tmp_path / "qa.json", [{"question": "q", "answer": "a", "sys": "Be brief."}])
    write_jsonl(tmp_path / "chats" / "1.jsonl", [{"dialog": [{"speaker": "me", "text": "q"},
                                                            {"speaker": "bot", "text": "a"}]}])
    write_jsonl(tmp_path / "chats" / "2.jsonl", [{"dialog": [{"speaker": "me", "text": "q2"},
                                                            {"speaker": "bot", "text": "a2"}]}])
    write_json(tmp_path / "dataset_info.json", {
        "qa": {"file_name": "qa.json", "columns": {"prompt": "question", "response": "answer", "system": "sys"}},
        "chats": {"file_name": "chats", "formatting": "sharegpt", "columns": {"messages": "dialog"},
                  "tags": {"role_tag": "speaker", "content_tag": "text", "user_tag": "me", "assistant_tag": "bot"}},
    })
    data = load_datasets(["qa", "chats"], tmp_path)
    assert data.conversations == [
        [SYSTEM, {"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
        [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
        [{"role": "user", "content": "q2"}, {"role": "assistant", "content": "a2"}],
    ]
    assert [f["records"] for f in data.files] == [1, 1, 1]
    assert all(len(f["sha256"]) == 64 for f in data.files)


def test_config_relative_dataset_dir_falls_back_to_the_config_folder(tmp_path, monkeypatch):
    write_json(tmp_path / "cfg" / "data" / "x.json", [{"instruction": "q", "output": "a"}])
    monkeypatch.chdir(tmp_path)
    assert len(load_datasets(["x.json"], "data", config_dir=tmp_path / "cfg").conversations) == 1


def test_every_bad_record_is_reported_with_file_line_and_field(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join([
        json.dumps({"instruction": "ok", "output": "fine"}),
        json.dumps({"instruction": "no answer"}),
        "{not json",
        json.dumps({"instruction": 3, "output": "x"}),
        json.dumps({"conversations": [{"from": "human", "value": "q"}, {"from": "robot", "value": "a"}]}),
        json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "user", "content": "q"}]}),
        json.dumps({"text": "what format is this?"}),
        json.dumps(["a list"]),
        json.dumps({"messages": [{"role": "user", "content": "only a question"}]}),
    ]) + "\n")
    with pytest.raises(DatasetError) as e:
        load_datasets(["bad.jsonl"], tmp_path)
    message = str(e.value)
    assert "(8 problems)" in message
    for expected in (
        f"{path} line 2: field 'output': missing",
        f"{path} line 3: not valid JSON",
        f"{path} line 4: field 'instruction': expected a string, got int",
        f"{path} line 5: field 'conversations[1].from': 'robot' is not one of 'human', 'gpt', 'system'",
        f"{path} line 6: field 'messages[1]': expected an assistant turn",
        f"{path} line 7: unknown record format",
        f"{path} line 8: expected a JSON object, got list",
        f"{path} line 9: field 'messages': the last message must be an assistant turn",
    ):
        assert expected in message
    assert "line 1" not in message


def test_json_list_errors_name_the_record_index(tmp_path):
    path = write_json(tmp_path / "bad.json", [{"instruction": "q", "output": "a"}, {"instruction": "", "output": "a"}])
    with pytest.raises(DatasetError, match=r"bad.json record 1: field 'instruction': empty"):
        load_datasets(["bad.json"], tmp_path)
    (tmp_path / "broken.json").write_text('[{"instruction": "q",\n "output": }]')
    with pytest.raises(DatasetError, match=r"broken.json line 2 column 12: not valid JSON"):
        load_datasets(["broken.json"], tmp_path)
    assert path.exists()  # nothing is modified or lost


def test_exact_duplicates_are_dropped_and_counted(tmp_path):
    rows = [{"instruction": "q", "output": "a"}, {"instruction": "q", "output": "b"}, {"instruction": "q", "output": "a"}]
    write_jsonl(tmp_path / "d.jsonl", rows)
    data = load_datasets(["d.jsonl"], tmp_path)
    assert data.duplicates_dropped == 1
    assert len(data.conversations) == 2
    assert data.summary()["records"] == 2
    assert data.digest == digest(data.conversations)


def test_unknown_dataset_names_the_candidates(tmp_path):
    write_json(tmp_path / "dataset_info.json", {"medical": {"file_name": "m.json"}})
    with pytest.raises(DatasetError, match=r"dataset 'medicl': no such dataset name or file .*names: medical"):
        load_datasets(["medicl"], tmp_path)
    write_json(tmp_path / "dataset_info.json", {"hub": {"hf_hub_url": "org/data"}})
    with pytest.raises(DatasetError, match="hf_hub_url is not supported"):
        load_datasets(["hub"], tmp_path)
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(DatasetError, match=r"unsupported file type '\.csv'"):
        load_datasets(["x.csv"], tmp_path)


def records(conversations: list) -> list[str]:
    """Each conversation as canonical JSON, so lists of them compare as multisets."""
    return [json.dumps(c, sort_keys=True) for c in conversations]


def test_split_is_seeded_and_disjoint():
    convs = [[{"role": "user", "content": str(i)}] for i in range(20)]
    train, val = split(convs, 0.25, seed=1)
    assert len(val) == 5 and len(train) == 15
    # Guards against a split that leaves validation records in training (eval on seen data)
    # or loses/duplicates records: disjoint, and together exactly the input as a multiset.
    assert not set(records(train)) & set(records(val))
    assert sorted(records(train + val)) == sorted(records(convs))
    assert split(convs, 0.25, seed=1) == (train, val)
    assert split(convs, 0.25, seed=2)[1] != val
    assert split(convs, 3, seed=1)[1].__len__() == 3
    with pytest.raises(DatasetError, match="leaves no training records"):
        split(convs, 20, seed=1)
