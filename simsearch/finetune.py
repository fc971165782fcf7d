"""Stable import path of `simsearch.train.finetune`, as the README documents it (the code moved
there in the package redesign; this name stays)."""

from simsearch.train.finetune import (
    FinetuneConfig,
    evaluate,
    finetune,
    learning_rate,
    read_checkpoint_config,
)

__all__ = ["FinetuneConfig", "evaluate", "finetune", "learning_rate", "read_checkpoint_config"]
