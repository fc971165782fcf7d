"""Stable import path of the fine-tuning API, as the README documents it: the code moved to
`simsearch.train.finetune` (the config and the run) and `simsearch.train.loop` (the training
loop, its schedule and validation) in the package redesign; this name stays."""

from simsearch.train.finetune import (
    FinetuneConfig,
    finetune,
    read_checkpoint_config,
)
from simsearch.train.loop import evaluate, learning_rate

__all__ = ["FinetuneConfig", "evaluate", "finetune", "learning_rate", "read_checkpoint_config"]
