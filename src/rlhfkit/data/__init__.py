"""Data: records, readers (JSONL, JSON, Parquet, `datasets` directories), validation, tokenise and collate."""

from rlhfkit.data.readers import read_rows
from rlhfkit.data.sft import SFTExample, collate_sft, pack_examples, read_sft_examples

__all__ = ["read_rows", "SFTExample", "read_sft_examples", "collate_sft", "pack_examples"]
