"""gptrain: train GPT-2 style language models from scratch, from a laptop CPU to many GPUs.

The names below load on first use, so `import gptrain` (and every tokenizer or data worker process,
which imports this package first) stays light: no torch until a model is needed.
"""

import sys
import types
from importlib import import_module

_EXPORTS = {
    "Checkpoint": "gptrain.api",
    "RunConfig": "gptrain.config",
    "resolve_config": "gptrain.config",
    "UserError": "gptrain.errors",
    "GPT": "gptrain.model.gpt",
    "ModelConfig": "gptrain.model.gpt",
    "build_tokenizer": "gptrain.tokenizer",
    "load_tokenizer": "gptrain.tokenizer",
}
__all__ = sorted([*_EXPORTS, "train"])
__version__ = "0.1.0"


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'gptrain' has no attribute {name!r}")
    return getattr(import_module(_EXPORTS[name]), name)


class _Package(types.ModuleType):
    """`gptrain.train` is the train() function, as it always was, although a subpackage has that name:
    importing gptrain.train.* would set the attribute to the subpackage, and the setter ignores that."""

    @property
    def train(self):
        from gptrain.train.loop import train

        return train

    @train.setter
    def train(self, value) -> None:
        pass


sys.modules[__name__].__class__ = _Package
