"""gptkit: build, train, finetune, evaluate and serve GPT-style language models."""

from gptkit.api import generate, load, load_tokenizer
from gptkit.config import ModelConfig, RunConfig, SampleConfig, TrainConfig, load_run_config
from gptkit.errors import CheckpointError, ConfigError, DataError, GptkitError, RequestError, TokenizerError
from gptkit.model import GPT, KVCache

__version__ = "0.1.0"

__all__ = [
    "GPT",
    "CheckpointError",
    "ConfigError",
    "DataError",
    "GptkitError",
    "KVCache",
    "ModelConfig",
    "RequestError",
    "RunConfig",
    "SampleConfig",
    "TokenizerError",
    "TrainConfig",
    "generate",
    "load",
    "load_run_config",
    "load_tokenizer",
]
