"""gptrain: train GPT-2 style language models from scratch, from a laptop CPU to many GPUs."""

from gptrain.api import Checkpoint
from gptrain.config import RunConfig, resolve_config
from gptrain.errors import UserError
from gptrain.model.gpt import GPT, ModelConfig
from gptrain.tokenizer import build_tokenizer, load_tokenizer
from gptrain.train.loop import train

__all__ = ["GPT", "Checkpoint", "ModelConfig", "RunConfig", "UserError", "build_tokenizer", "load_tokenizer",
           "resolve_config", "train"]
__version__ = "0.1.0"
