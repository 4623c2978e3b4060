"""Data: records, readers (JSONL, JSON, Parquet, `datasets` directories), validation, tokenise and collate."""

from rlhfkit.data.collate import collate_sft, pack_examples
from rlhfkit.data.readers import read_rows
from rlhfkit.data.sft import SFTExample, read_sft_examples

__all__ = ["read_rows", "SFTExample", "read_sft_examples", "collate_sft", "pack_examples"]
