"""What the CLI adds to a library error: the flag behind its `param` and the command line
behind its `fix`. The library's messages name no flag or command (they read the same from
Python); the terminal user gets both from here."""

from __future__ import annotations

import shlex

from simsearch.config import DEFAULT_LABEL_MODEL
from simsearch.errors import SimsearchError

# Where a flag is not "--" + the parameter with dashes for underscores: by (command,
# parameter), then (None, parameter) for every command.
FLAGS = {
    (None, "model"): "--model or SIMSEARCH_MODEL",
    (None, "label_model"): "--label-model or SIMSEARCH_LABEL_MODEL",
    ("label", "label_model"): "--model or SIMSEARCH_LABEL_MODEL",
    ("index", "top"): "--label-top",
    ("shards", "shards"): "SHARDS_DIR",
    ("shards", "output"): "--out",
    ("shards", "ray"): "--ray",
}


def flag(param: str, command: str | None = None) -> str:
    """The command-line flag of a library parameter in `command`: "move_to" -> "--move-to"."""
    found = FLAGS.get((command, param)) or FLAGS.get((None, param))
    return found or "--" + param.replace("_", "-")


def _fix(exc: SimsearchError) -> str | None:
    path = shlex.quote(exc.path) if exc.path else "PATH"
    return {
        "create-index": f"create one with `simsearch index DIR --index {path}`",
        "new-index": "give a new folder as --index",
        "calibrate": "run `simsearch dedup --calibrate` to calibrate it again",
        "threshold": "pass --threshold",
        "resume": "run the same command with --resume to continue it",
        "export-onnx": (
            "export it with `simsearch export-model --model M --output DIR`, or use --backend torch"
        ),
        "add-labels": (
            f"add them with `simsearch index DIRS --label-model {DEFAULT_LABEL_MODEL}` "
            "(or any image classification model)"
        ),
        "undo": f"undo with: simsearch dedup --undo {path}",
        "add-images": "run `simsearch index DIR` first",
        "cluster": "make them with `simsearch cluster -k K`",
        "repair": "run `simsearch repair`",
        "start-ray": "start one with `ray start --head`, or give a running one's: --ray HOST:6379",
    }.get(exc.fix or "")


def explain(exc: SimsearchError, command: str | None = None) -> str:
    """The one line the CLI prints for a library error raised in `command` (after
    "Error: ")."""
    text = str(exc)
    if exc.param or exc.fix:
        text = text.rstrip(".")
    if exc.param:
        text += f" ({flag(exc.param, command)})"
    fix = _fix(exc)
    if fix:
        text += f"; {fix}"
    return text
