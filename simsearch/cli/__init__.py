"""The `simsearch` command: parse arguments, call the API, print. No logic of its own.

One module per group of commands; each registers its commands on the group in `common`.
"""

from simsearch.cli import clusters, dedup, exporting, indexing, labels, searching  # noqa: F401
from simsearch.cli.common import cli

__all__ = ["cli", "main"]


def main() -> None:
    cli()
