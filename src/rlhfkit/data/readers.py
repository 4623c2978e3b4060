"""Row readers. Every row comes back with its 1-based row number so errors can name file and row."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from rlhfkit.errors import DataError, UserError

Row = tuple[int, dict[str, Any]]


def read_rows(path: str, split: str = "train") -> list[Row]:
    """Read JSONL (.jsonl/.ndjson), JSON (a list of objects), Parquet, or a directory written by
    `datasets.Dataset.save_to_disk` / `DatasetDict.save_to_disk` (then `split` picks the split)."""
    p = Path(path)
    if not p.exists():
        raise UserError(f"data path {path} does not exist; pass a .jsonl, .json, .parquet file or a datasets directory.")
    if p.is_dir():
        return _read_datasets_dir(p, split)
    suffix = p.suffix.lower()
    if suffix in (".jsonl", ".ndjson"):
        return _read_jsonl(p)
    if suffix == ".json":
        return _read_json(p)
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        return [(i + 1, row) for i, row in enumerate(pq.read_table(p).to_pylist())]
    raise UserError(f"{path}: unsupported data file type '{suffix}'; use .jsonl, .json, .parquet or a datasets directory.")


def _read_jsonl(p: Path) -> list[Row]:
    rows: list[Row] = []
    with p.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(str(p), lineno, None, f"not valid JSON ({exc.msg} at column {exc.colno})") from None
            if not isinstance(obj, dict):
                raise DataError(str(p), lineno, None, f"each line must be a JSON object, got {type(obj).__name__}")
            rows.append((lineno, obj))
    if not rows:
        raise DataError(str(p), None, None, "the file holds no rows")
    return rows


def _read_json(p: Path) -> list[Row]:
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise DataError(str(p), None, None, f"not valid JSON ({exc.msg} at line {exc.lineno})") from None
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list):
        raise DataError(str(p), None, None, "a .json data file must hold a list of objects (or {\"data\": [...]})")
    rows: list[Row] = []
    for i, obj in enumerate(data, start=1):
        if not isinstance(obj, dict):
            raise DataError(str(p), i, None, f"each item must be a JSON object, got {type(obj).__name__}")
        rows.append((i, obj))
    if not rows:
        raise DataError(str(p), None, None, "the file holds no rows")
    return rows


def _read_datasets_dir(p: Path, split: str) -> list[Row]:
    from datasets import load_from_disk

    try:
        ds = load_from_disk(str(p))
    except (FileNotFoundError, ValueError) as exc:
        raise UserError(f"{p} is not a directory written by datasets' save_to_disk ({exc}).") from None
    if hasattr(ds, "keys"):  # DatasetDict
        if split not in ds:
            raise UserError(f"{p} has splits {sorted(ds.keys())} but not '{split}'; pick one of them.")
        ds = ds[split]
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
    """Prompts for sampling: rows with "prompt" (text or chat messages) or "text" (playground prompt files)."""
    out = []
    for lineno, row in read_rows(path):
        value = row.get("prompt", row.get("text"))
        if not isinstance(value, (str, list)) or not value:
            raise DataError(path, lineno, "prompt", "missing or empty; a prompts file has a 'prompt' (or 'text') "
                            "field per row")
        out.append(value)
    return out
