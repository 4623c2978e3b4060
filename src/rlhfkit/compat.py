"""The private and version-dependent parts of the libraries rlhfkit builds on, contained in one place.
tests/test_compat.py fails as soon as an installed version changes one of them, naming it."""

from __future__ import annotations

from typing import Any


def reset_accelerator_state() -> None:
    """Forget the precision and device Accelerate keeps in its process-wide singleton, so a run started earlier in
    this process (a notebook, the demo, a benchmark) does not fix the next run's precision: Accelerate refuses a
    second Accelerator with other settings. The process group (PartialState) is kept. Private API:
    `AcceleratorState._reset_state` (accelerate 1.x)."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state()


def declares_static_cache(model: Any) -> bool:
    """Whether transformers marks the model class as working with a static KV cache and full-graph compilation:
    `_can_compile_fullgraph` (transformers >= 4.47), `_supports_static_cache` before it. Private class flags."""
    return bool(getattr(model, "_can_compile_fullgraph", False) or getattr(model, "_supports_static_cache", False))
