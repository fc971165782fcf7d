"""Stable import path of the distillation API, as the README documents it (the code is in
`simsearch.train.distill`)."""

from simsearch.train.distill import DistillConfig, distill, distill_loss, read_distill_config

__all__ = ["DistillConfig", "distill", "distill_loss", "read_distill_config"]
