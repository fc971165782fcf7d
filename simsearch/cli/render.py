"""The CLI's words for the library's records: one function per record type, each returning
the text a command prints for it. The records themselves carry data only."""

from __future__ import annotations

import shlex

from simsearch.records import (
    AddSummary,
    Calibration,
    ClusterRun,
    EpochRecord,
    FinetuneResult,
    LabelSummary,
    MoveReport,
    OnnxExport,
)


def add_line(summary: AddSummary) -> str:
    """What an indexing run did, e.g. "3 files seen, 3 indexed, 0 skipped as unchanged, ..."."""
    reused = f" ({summary.reused} copied from identical files)" if summary.reused else ""
    files = "file" if summary.seen == 1 else "files"
    return (
        f"{summary.seen} {files} seen, {summary.indexed} indexed{reused}, "
        f"{summary.unchanged} skipped as unchanged, {summary.failed} failed, "
        f"{summary.moved} moved, {summary.removed} removed ({summary.seconds:.1f} s)"
    )


def label_line(summary: LabelSummary) -> str:
    """What a labelling run did."""
    again = " (replacing the labels of another model or --label-top)" if summary.relabelled else ""
    return (
        f"{summary.labelled} images labelled{again}, {summary.already} already labelled, "
        f"{summary.failed} failed, with {summary.model} (top {summary.top}; "
        f"{summary.seconds:.1f} s)"
    )


def calibration_line(found: Calibration) -> str:
    """The calibrated dedup threshold and how well it did on the edited copies."""
    edits = ", ".join(f"{k} {v:.2f}" for k, v in found.recall_by_edit.items())
    other = ""
    if found.highest_other is not None:
        other = f", other images up to {found.highest_other:.3f}"
    among = ""
    if found.copies_among_others:
        among = f"; about {found.copies_among_others:.0f} of those others taken for copies"
    return (
        f"dedup threshold {found.threshold:.4f}: expected precision {found.precision:.3f}, "
        f"recall {found.recall:.3f} (calibrated on {found.copies} edited copies of "
        f"{found.images} indexed images against their {found.others} nearest others; copies "
        f"from {found.lowest_copy:.3f}{other}{among}). Recall by edit: {edits}"
    )


def move_line(report: MoveReport) -> str:
    """What moving, deleting or putting back duplicates did; after a move, how to undo it."""
    done = {"move": "moved", "delete": "deleted", "undo": "put back"}[report.action]
    line = f"{done} {report.files} files ({report.bytes / 2**20:.1f} MB)"
    if report.skipped:
        line += f"; left {len(report.skipped)} alone"
    if report.action == "move" and report.manifest:
        # Quoted, so a folder with spaces can be pasted into a shell as it is.
        line += f"; undo with: simsearch dedup --undo {shlex.quote(report.manifest)}"
    return line


def cluster_run_line(run: ClusterRun) -> str:
    """How a clustering run went."""
    how = "given" if run.chosen_by == "given" else "chosen by auto"
    return (
        f"{run.clusters} clusters of {run.images} images (k={run.k} {how}, "
        f"seed {run.seed}, silhouette {run.silhouette:.3f}, "
        f"mean similarity to centre {run.cohesion:.3f}, {run.seconds:.1f} s)"
    )


def export_lines(result: OnnxExport) -> list[str]:
    """An ONNX export's summary, one figure per line."""
    out = [
        f"exported {result.output} ({result.seconds:.1f} s): layer {result.layer} of "
        f"{result.num_layers}, {result.pool} pooling, {result.dim}-dim, "
        f"{result.input_size[0]}x{result.input_size[1]} px input, opset {result.opset}",
        f"validated on {result.validated_on}:",
        f"  model.onnx       {result.fp32_mb:7.1f} MB  cosine to PyTorch: lowest "
        f"{result.fp32_min_cosine:.7f}, mean {result.fp32_mean_cosine:.7f}",
    ]
    if result.int8_mb is not None:
        out.append(
            f"  model.int8.onnx  {result.int8_mb:7.1f} MB  cosine to PyTorch fp32: lowest "
            f"{result.int8_min_cosine:.5f}, mean {result.int8_mean_cosine:.5f}; recall@10 "
            f"{result.int8_recall_at_10:.3f} ({result.int8_scope} in int8"
            + (", SmoothQuant-scaled" if result.int8_smoothing is not None else "")
            + ")"
        )
    if result.classes is not None:
        out.append(
            f"  classifier.onnx  {result.classes} classes; logits cosine to PyTorch: lowest "
            f"{result.classifier_min_cosine:.7f}; same top class on "
            f"{result.classifier_top1_agreement:.1%} of the images"
        )
    return out


def epoch_line(record: EpochRecord, epochs: int) -> str:
    """One fine-tuning epoch, as "epoch 2/10: train loss ..."; `epochs`: the epochs planned."""
    best = " (best)" if record.best else ""
    return (
        f"epoch {record.epoch}/{epochs}: train loss {record.train_loss:.3f}, val loss "
        f"{record.val_loss:.3f}, val accuracy {record.val_accuracy:.3f}{best}"
    )


def finetune_line(result: FinetuneResult) -> str:
    """The best epoch of a finished fine-tuning run."""
    early = ", stopped early" if result.stopped_early else ""
    return (
        f"best epoch {result.best_epoch} of {result.epochs_run}{early}: val accuracy "
        f"{result.best_accuracy:.3f}, val loss {result.best_loss:.3f} ({result.train_images} "
        f"training, {result.val_images} validation images, {result.skipped} skipped; "
        f"{result.steps} steps, {result.seconds:.1f} s)"
    )
