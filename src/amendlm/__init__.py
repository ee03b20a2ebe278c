"""amendlm: change what a pretrained causal LM says after pre-training, and measure it.

The main entry points are imported lazily (``import amendlm`` stays fast)::

    from amendlm import load_model, score_pairs, EvalConfig, evaluate
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "load_model": "amendlm.modeling",
    "score_pairs": "amendlm.scoring",
    "ProductLM": "amendlm.product",
    "EvalConfig": "amendlm.bias.evaluate",
    "evaluate": "amendlm.bias.evaluate",
    "resolve_model": "amendlm.resources",
    "resolve_dataset": "amendlm.resources",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'amendlm' has no attribute {name!r}")
