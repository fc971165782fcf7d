"""The `simsearch` command: parse arguments, call the API, print. No logic of its own.

One module per group of commands; each registers its commands on the group in `common`.
"""

from simsearch.cli import (  # noqa: F401
    clusters,
    dedup,
    distill,
    exporting,
    finetune,
    indexing,
    inspecting,
    labels,
    models,
    searching,
    serving,
    shards,
)
from simsearch.cli.common import cli

__all__ = ["cli", "main"]


def main() -> None:
    cli()
