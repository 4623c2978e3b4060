"""Row readers. Every row comes back with its 1-based row number so errors can name file and row."""

from __future__ import annotations

import gzip
import json
import math
from pathlib import Path
from typing import Any, Iterable

from rlhfkit.data.formats import as_chat, check_fields, map_fields, prompt_hint, refuse_message_tree_row
from rlhfkit.errors import DataError, UserError

Row = tuple[int, dict[str, Any]]


class DataPath(str):
    """A data path that also says how to read it: the split of a `datasets` DatasetDict directory, the column
    renaming of `data_fields`, and the flag that picks the split (for error messages). It is the path string
    itself, so every reader that takes a path takes one and reads it the same way."""

    split: str
    fields: dict[str, str]
    split_flag: str
    chat: bool
    """String prompts (and their string responses) are read as a user turn and the assistant's reply."""

    def __new__(cls, path: str, split: str = "train", fields: dict[str, str] | None = None,
                split_flag: str = "--data-split", chat: bool = False) -> DataPath:
        self = super().__new__(cls, path)
        self.split, self.fields, self.split_flag, self.chat = split, dict(fields or {}), split_flag, chat
        check_fields(self.fields)
        return self


def read_rows(path: str, split: str | None = None) -> list[Row]:
    """Read JSONL (.jsonl/.ndjson), JSON (a list of objects; JSON Lines under a .json name, as stanfordnlp/SHP and
    openai/summarize_from_feedback ship them, is read as JSONL), either gzipped (.gz), Parquet, or a directory
    written by `datasets.Dataset.save_to_disk` / `DatasetDict.save_to_disk` (then `split` picks the split).
    A DataPath brings its split (unless `split` is given) and renames columns by its fields."""
    p = Path(path)
    if not p.exists():
        raise UserError(f"data path {path} does not exist; pass a .jsonl, .json, .parquet file (.jsonl/.json may be "
                        "gzipped) or a datasets directory.")
    if split is None:
        split = path.split if isinstance(path, DataPath) else "train"
    if p.is_dir():
        rows = _read_datasets_dir(p, split, path.split_flag if isinstance(path, DataPath) else None)
    else:
        name = p.name.lower()
        gz = name.endswith(".gz")
        suffix = Path(name[:-3]).suffix if gz else p.suffix.lower()
        if suffix in (".jsonl", ".ndjson"):
            with _open(p, gz) as fh:
                rows = _parse_lines(fh, p)
        elif suffix == ".json":
            rows = _read_json(p, gz)
        elif suffix == ".parquet" and not gz:
            rows = _read_parquet(p)
        else:
            raise UserError(f"{path}: unsupported data file type '{suffix + ('.gz' if gz else '')}'; use .jsonl, "
                            ".json (either may be gzipped: .jsonl.gz), .parquet or a datasets directory.")
    if isinstance(path, DataPath) and path.fields:
        rows = [(n, map_fields(row, path.fields, str(path), n)) for n, row in rows]
    if isinstance(path, DataPath) and path.chat:
        rows = [(n, as_chat(row)) for n, row in rows]
    return rows


def _open(p: Path, gz: bool) -> Any:
    return gzip.open(p, "rt", encoding="utf-8") if gz else p.open(encoding="utf-8")


def _read_text(p: Path, gz: bool) -> str:
    try:
        with _open(p, gz) as fh:
            return fh.read()
    except gzip.BadGzipFile:
        raise UserError(f"{p} is not a gzip file although its name ends in .gz; rename or recompress it.") from None
    except UnicodeDecodeError as exc:
        raise DataError(str(p), None, None, f"is not UTF-8 text ({exc.reason} at byte {exc.start})") from None


def _parse_lines(lines: Iterable[str], p: Path) -> list[Row]:
    rows: list[Row] = []
    try:
        for lineno, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(str(p), lineno, None, f"not valid JSON ({exc.msg} at column {exc.colno})") from None
            except RecursionError:
                raise DataError(str(p), lineno, None, "nests JSON too deeply to read; flatten the row") from None
            if not isinstance(obj, dict):
                raise DataError(str(p), lineno, None, f"each line must be a JSON object, got {type(obj).__name__}")
            rows.append((lineno, obj))
    except gzip.BadGzipFile:
        raise UserError(f"{p} is not a gzip file although its name ends in .gz; rename or recompress it.") from None
    except UnicodeDecodeError as exc:
        raise DataError(str(p), None, None, f"is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    if not rows:
        raise DataError(str(p), None, None, "the file holds no rows")
    return rows


def _read_parquet(p: Path) -> list[Row]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(p)
    except (pa.ArrowException, OSError) as exc:
        raise DataError(str(p), None, None, f"is not a readable Parquet file ({str(exc).splitlines()[0]}); "
                        "check the file was written completely") from None
    rows = [(i + 1, row) for i, row in enumerate(table.to_pylist())]
    if not rows:
        raise DataError(str(p), None, None, "the file holds no rows")
    return rows


def _read_json(p: Path, gz: bool) -> list[Row]:
    text = _read_text(p, gz)
    try:
        data = json.loads(text)
    except RecursionError:
        raise DataError(str(p), None, None, "nests JSON too deeply to read; flatten the data") from None
    except json.JSONDecodeError as exc:
        if exc.msg == "Extra data" and text.lstrip().startswith("{"):  # one object per line: JSON Lines
            return _parse_lines(text.splitlines(), p)
        raise DataError(str(p), None, None, f"not valid JSON ({exc.msg} at line {exc.lineno})") from None
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list):
        raise DataError(str(p), None, None, "a .json data file must hold a list of objects (or {\"data\": [...]}) "
                        "or one object per line (JSON Lines)")
    rows: list[Row] = []
    for i, obj in enumerate(data, start=1):
        if not isinstance(obj, dict):
            raise DataError(str(p), i, None, f"each item must be a JSON object, got {type(obj).__name__}")
        rows.append((i, obj))
    if not rows:
        raise DataError(str(p), None, None, "the file holds no rows")
    return rows


def _read_datasets_dir(p: Path, split: str, flag: str | None) -> list[Row]:
    from datasets import load_from_disk

    try:
        ds = load_from_disk(str(p))
    except (FileNotFoundError, ValueError) as exc:
        raise UserError(f"{p} is not a directory written by datasets' save_to_disk ({exc}).") from None
    if hasattr(ds, "keys"):  # DatasetDict
        if split not in ds:
            names = sorted(ds.keys())
            how = f"with {flag} (e.g. {flag} {names[0]})" if flag else "of them"
            raise UserError(f"{p} has splits {names} but not '{split}'; pick one {how}.")
        ds = ds[split]
    elif split != "train":
        how = f"; drop {flag}" if flag else ""
        raise UserError(f"{p} is a single dataset, not a DatasetDict with splits, so it has no split '{split}'{how}.")
    return [(i + 1, row) for i, row in enumerate(ds)]


def split_eval(items: list[Any], fraction: float, seed: int, min_items: int = 20) -> tuple[list[Any], list[Any]]:
    """Deterministic held-out split by seed; nothing is dropped (held-out items are evaluated on). Data with
    fewer than min_items items, or fraction 0, is not split."""
    import torch

    if fraction <= 0 or len(items) < min_items:
        return items, []
    order = torch.randperm(len(items), generator=torch.Generator().manual_seed(seed)).tolist()
    n_eval = max(1, math.ceil(fraction * len(items)))
    held = set(order[:n_eval])
    return [e for i, e in enumerate(items) if i not in held], [items[i] for i in sorted(held)]


def read_prompts(path: str) -> list[Any]:
    """Prompts for sampling: rows with "prompt" (text or chat messages) or "text" (playground prompt files).
    A DataPath's column mapping applies, so e.g. --data-fields prompt=question reads a question column."""
    out = []
    for lineno, row in read_rows(path):
        refuse_message_tree_row(row, str(path), lineno)
        value = row.get("prompt", row.get("text"))
        if not isinstance(value, (str, list)) or not value:
            raise DataError(path, lineno, "prompt", "missing or empty; a prompts file has a 'prompt' (or 'text') "
                            f"field per row{prompt_hint(row)}")
        out.append(value)
    return out
