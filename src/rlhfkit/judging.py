"""The judge factory: where the playground's simulated judge and the real backends (a local Hugging Face model, an
OpenAI-compatible endpoint) meet. It sits above both `feedback/` and `playground/`, so neither imports the other;
the `cai` and `eval` commands build their judge here."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rlhfkit.feedback.constitution import Constitution
from rlhfkit.feedback.judges import CachedBackend, HFBackend, JudgeConfig, LMJudge, OpenAIBackend
from rlhfkit.feedback.protocols import Judge


def make_judge(cfg: JudgeConfig, constitution: Constitution, cache_dir: str | Path | None = None) -> Judge:
    """The judge a JudgeConfig names; `cache_dir` (or cfg.cache_dir) puts the on-disk cache in front of it."""
    cfg.validate()
    if cfg.backend == "playground":
        from rlhfkit.playground.ai_judge import PlaygroundJudge  # the playground loads only when its judge is asked for

        return PlaygroundJudge(constitution)
    if cfg.backend == "hf":
        backend: Any = HFBackend(cfg.model, chat=cfg.chat, batch_size=cfg.batch_size, device=cfg.device)
    else:
        backend = OpenAIBackend(cfg.base_url, cfg.model, cfg.api_key_env, cfg.endpoint, cfg.batch_size,
                                cfg.timeout_s, cfg.max_retries, cfg.backoff_s)
    directory = cfg.cache_dir or (str(cache_dir) if cache_dir else "")
    if directory and directory != "none":
        backend = CachedBackend(backend, directory)
    return LMJudge(backend, constitution, cfg.options, cfg.max_new_tokens, cfg.temperature)
