"""`rlhfkit cai`: Constitutional AI from the command line -- critique -> revision SFT data, or AI preference labels
(RLAIF). The work is in `feedback.ai`; this command builds the judge (`judging.make_judge`), which may be the
playground's simulated one, so it sits above both."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rlhfkit.config import save_config
from rlhfkit.errors import UserError
from rlhfkit.feedback.ai import CAIConfig, label, parse_cai_args, revise
from rlhfkit.feedback.constitution import load_constitution
from rlhfkit.judging import make_judge

__all__ = ["CAIConfig", "main", "parse_stage_args"]

parse_stage_args = parse_cai_args  # the hook rlhfkit's CLI looks for


def main(cfg: CAIConfig) -> dict[str, Any]:
    cfg.validate()
    out = Path(cfg.output_dir)
    target = out / ("sft.jsonl" if cfg.command == "revise" else "preferences.jsonl")
    if target.exists() and not cfg.overwrite:
        raise UserError(f"{target} exists; pass --overwrite to replace it or choose another --output-dir.")
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.yaml")
    constitution = load_constitution(cfg.constitution)
    if cfg.principle:
        constitution.principle(cfg.principle)  # fail early on an unknown id
    judge = make_judge(cfg.judge, constitution, cache_dir=out / "judge-cache")
    summary = (revise if cfg.command == "revise" else label)(cfg, judge, constitution, out)
    summary["constitution"] = constitution.name
    cache = getattr(getattr(judge, "backend", None), "hits", None)
    if cache is not None:
        summary["judge_cache"] = {"hits": judge.backend.hits, "misses": judge.backend.misses}  # type: ignore[attr-defined]
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary))
    return summary
