"""llmlab: the study notes' language model, built from first principles, with an instrument for
every concept and every printed number checked against a measurement."""

from llmlab.config import PRESETS, ModelConfig, TrainConfig
from llmlab.errors import UserError

__all__ = ["GPT", "PRESETS", "KVCache", "ModelConfig", "TrainConfig", "UserError", "generate_text", "load_run"]


def __getattr__(name: str):  # torch-backed names load on first use, so `import llmlab` stays fast
    if name in ("GPT", "KVCache"):
        from llmlab import model

        return getattr(model, name)
    if name == "load_run":
        from llmlab.run_dir import load_run

        return load_run
    if name == "generate_text":
        from llmlab.sampling import generate_text

        return generate_text
    raise AttributeError(name)
