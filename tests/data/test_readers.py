import json

import pytest

from rlhfkit.data import read_rows
from rlhfkit.errors import DataError, UserError

ROWS = [{"prompt": "a", "completion": "b"}, {"prompt": "c", "completion": "d"}]


def test_jsonl_json_parquet_and_datasets_dir_agree(tmp_path):
    import datasets

    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    (tmp_path / "d.json").write_text(json.dumps(ROWS))
    ds = datasets.Dataset.from_list(ROWS)
    ds.to_parquet(str(tmp_path / "d.parquet"))
    ds.save_to_disk(str(tmp_path / "ds"))
    datasets.DatasetDict({"train": ds, "test": ds.select([0])}).save_to_disk(str(tmp_path / "dsd"))
    for name in ("d.jsonl", "d.json", "d.parquet", "ds", "dsd"):
        assert [r for _, r in read_rows(str(tmp_path / name))] == ROWS, name
    assert [r for _, r in read_rows(str(tmp_path / "dsd"), split="test")] == ROWS[:1]
    with pytest.raises(UserError, match="splits"):
        read_rows(str(tmp_path / "dsd"), split="validation")


def test_row_numbers_are_file_lines(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text('{"a": 1}\n\n{"a": 2}\n')
    assert [n for n, _ in read_rows(str(p))] == [1, 3]


def test_bad_json_line_names_file_and_row(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text('{"a": 1}\n{"a": \n')
    with pytest.raises(DataError, match=r"d.jsonl, row 2: not valid JSON"):
        read_rows(str(p))
    p.write_text('{"a": 1}\n[1, 2]\n')
    with pytest.raises(DataError, match="row 2: each line must be a JSON object"):
        read_rows(str(p))


def test_missing_file_and_unknown_type(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        read_rows(str(tmp_path / "nope.jsonl"))
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(UserError, match="unsupported data file type '.csv'"):
        read_rows(str(tmp_path / "x.csv"))
