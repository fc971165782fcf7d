"""The Labeller: an image classification head that names what a picture shows, and the
labelling pass that stores each indexed image's top labels.

Labels come from a checkpoint that `AutoModelForImageClassification` loads with a trained
head, named by the config's `id2label` (ImageNet-1k for the default). They are separate
from the index's vectors: any classifier can label an index built with any backbone.
"""

from __future__ import annotations

import contextlib
import difflib
import hashlib
import logging
import os
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing
from typing import cast

import numpy as np

from simsearch.config import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_LABEL_MODEL,
    DEFAULT_LABEL_TOP,
    DEFAULT_WORKERS,
    PREFETCH_BATCHES,
)
from simsearch.errors import ImageError, QueryError
from simsearch.media.decode import decode_image, read_image_file
from simsearch.media.prefetch import read_ahead
from simsearch.media.preprocess import Preprocessing
from simsearch.models.embed import pick_device, pick_precision, quantize_linear_layers
from simsearch.models.hub import (
    load_classifier,
    load_preprocessing,
    recorded_name,
    resolve_model,
)
from simsearch.models.weights import hash_weights
from simsearch.progress import Progress, advance, set_total
from simsearch.records import ImageLabels, Label, LabelSummary
from simsearch.storage.store import Store

log = logging.getLogger(__name__)


class Labeller:
    """Loads an image classification checkpoint and gives each image its top labels.

    `model` is a hub id or a folder written by `save_pretrained`; a checkpoint without a
    trained head or without class names is a ModelLoadError. Images are preprocessed by the
    checkpoint's image-processor settings (as the Embedder does). `precision`: as for the
    Embedder; the softmax is always computed in fp32.
    """

    def __init__(
        self,
        model: str | os.PathLike = DEFAULT_LABEL_MODEL,
        *,
        device: str = "auto",
        precision: str | None = None,
        batch_size: int = DEFAULT_BATCH_SIZE,
    ) -> None:
        if batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        self.name = str(model)
        self.batch_size = batch_size
        self.folder, self.revision = resolve_model(self.name, param="label_model")
        self.model_id = recorded_name(self.name, self.folder, self.revision)
        self.device = pick_device(device)
        self.precision = pick_precision(precision, self.device)
        self.model, self.config = load_classifier(self.folder, self.name)
        self.model.to(self.device)
        self.preprocess = load_preprocessing(self.folder)
        id2label = {int(k): str(v) for k, v in self.config.id2label.items()}
        self.classes = [id2label.get(i, f"class {i}") for i in range(int(self.config.num_labels))]
        if self.precision == "int8":
            quantize_linear_layers(self.model)

    def source(self, top: int) -> dict:
        """Return what an index records about labels made by this model (meta "labels")."""
        return {**identify(self.name, self.folder, self.revision), "top": int(top)}

    # -- labelling -----------------------------------------------------------------------

    def label_pixels(self, pixels: np.ndarray, top: int = DEFAULT_LABEL_TOP) -> list[tuple]:
        """Return, per preprocessed (B, 3, H, W) image, its `top` labels, most probable first."""
        import torch

        if top < 1:
            raise ValueError("top must be at least 1")
        if len(pixels) == 0:
            return []
        batch = torch.from_numpy(np.ascontiguousarray(pixels, dtype=np.float32)).to(self.device)
        with torch.inference_mode(), _autocast(self.precision, self.device):
            logits = self.model(pixel_values=batch).logits
        probs = logits.float().softmax(dim=-1)
        scores, classes = probs.topk(min(top, probs.shape[-1]), dim=-1)
        return [
            tuple(Label(self.classes[c], float(s)) for s, c in zip(row_s, row_c, strict=True))
            for row_s, row_c in zip(scores.tolist(), classes.tolist(), strict=True)
        ]

    def label_images(self, images: Sequence, top: int = DEFAULT_LABEL_TOP) -> list[tuple]:
        """Return the `top` labels of each RGB PIL image, in batches."""
        out: list[tuple] = []
        for start in range(0, len(images), self.batch_size):
            chunk = images[start : start + self.batch_size]
            out += self.label_pixels(np.stack([self.preprocess(img) for img in chunk]), top)
        return out

    def label_files(
        self,
        paths: Iterable[str | os.PathLike],
        top: int = DEFAULT_LABEL_TOP,
        *,
        workers: int = DEFAULT_WORKERS,
    ) -> Iterator[ImageLabels]:
        """Yield each file's labels in order, decoding in threads while the model runs. A
        file that cannot be read or decoded is yielded with `error` set, not raised."""
        items = [(str(p), None) for p in paths]
        for batch in _prepared_batches(items, self.preprocess, self.batch_size, workers):
            good = [(n, cast(np.ndarray, pixels)) for n, pixels, error in batch if error is None]
            found = iter(self.label_pixels(np.stack([p for _, p in good]), top) if good else [])
            for n, _, error in batch:
                path = items[n][0]
                yield ImageLabels(path, error=error) if error else ImageLabels(path, next(found))


def identify(name: str, folder=None, revision: str | None = None) -> dict:
    """Return the identity of label model `name` (as recorded, weights, revision), without
    loading it: what decides whether stored labels are still this model's."""
    if folder is None:
        folder, revision = resolve_model(name, param="label_model")
    return {
        "model": recorded_name(name, folder, revision),
        "weights_sha256": hash_weights(folder),
        "revision": revision,
    }


def label_index(
    store: Store,
    model: str | os.PathLike,
    load: Callable[[], Labeller],
    *,
    top: int | None = None,
    workers: int = DEFAULT_WORKERS,
    progress: Progress | None = None,
) -> LabelSummary:
    """Give every indexed image without labels its `top` labels from `model`.

    Reads each image's file again (so a file labelled right after it was indexed is read
    twice), skipping any whose content is no longer what was indexed. Each batch is one
    transaction, so an interrupted run keeps what it committed and the next one continues.
    Labels from a different model (other weights), or with another `top`, are all replaced:
    an index holds one model's labels, so that `search --label` means one thing. `top`
    None keeps the stored labels' count for the same model, else DEFAULT_LABEL_TOP. `load`
    makes the Labeller; it is called only when some image needs labelling. The caller
    holds the write lock.
    """
    start = time.monotonic()
    labeller = None
    wanted = identify(str(model))
    stored = store.label_source()
    same_model = stored is not None and stored.get("weights_sha256") == wanted["weights_sha256"]
    if top is None:
        top = int(stored["top"]) if same_model and stored is not None else DEFAULT_LABEL_TOP
    if top < 1:
        raise ValueError("top must be at least 1")
    source = {**wanted, "top": int(top)}
    relabel = stored is not None and (not same_model or int(stored.get("top", 0)) != top)
    if relabel:
        assert stored is not None  # relabel implies it
        # Load first: a model that cannot label must not cost the labels already stored.
        labeller = load()
        log.warning(
            "replacing the labels of %s (top %s) with those of %s (top %d)",
            stored.get("model"),
            stored.get("top"),
            source["model"],
            top,
        )
        store.clear_labels()
    already = store.labelled_count()
    todo = store.unlabelled()
    set_total(progress, len(todo))
    if not todo and stored != source:
        store.write_labels({}, source)  # record the model (new, or its folder moved)
    labelled = failed = 0
    if todo:
        labeller = labeller or load()
        items = [(path, sha) for _, path, sha in todo]
        for batch in _prepared_batches(items, labeller.preprocess, labeller.batch_size, workers):
            good = [(n, cast(np.ndarray, pixels)) for n, pixels, error in batch if error is None]
            found = labeller.label_pixels(np.stack([p for _, p in good]), top) if good else []
            ids = [todo[n][0] for n, _ in good]
            store.write_labels(dict(zip(ids, found, strict=True)), source)
            labelled += len(good)
            for n, _, error in batch:
                if error is not None:
                    failed += 1
                    log.warning("cannot label %s: %s", todo[n][1], error)
            advance(progress, len(batch))
    return LabelSummary(
        model=source["model"],
        top=top,
        labelled=labelled,
        already=already,
        failed=failed,
        relabelled=relabel,
        seconds=time.monotonic() - start,
    )


# -- matching a label query --------------------------------------------------------------


def matching_labels(name: str, stored: Iterable[str]) -> list[str]:
    """Return the stored labels that `name` names: the whole label or any of its
    comma-separated synonyms ("tabby" and "tabby cat" both name "tabby, tabby cat"),
    compared case-insensitively with runs of spaces as one."""
    want = _fold(name)
    return [s for s in stored if want == _fold(s) or want in {_fold(p) for p in s.split(",")}]


def no_match_error(name: str, stored: Iterable[str], source: dict) -> QueryError:
    """Return the QueryError for a label no image has, suggesting stored labels like it."""
    synonyms = sorted({p.strip() for s in stored for p in s.split(",") if p.strip()})
    close = difflib.get_close_matches(name.strip(), synonyms, n=3, cutoff=0.6)
    hint = f"; similar labels: {', '.join(close)}" if close else ""
    return QueryError(
        f"no indexed image has the label {name!r} among its top {source.get('top')} "
        f"(labels by {source.get('model')}){hint}"
    )


def _fold(text: str) -> str:
    return " ".join(text.split()).casefold()


# -- reading and decoding in threads -----------------------------------------------------


def _prepare(
    path: str, expected_sha256: str | None, preprocess: Preprocessing
) -> tuple[np.ndarray | None, str | None]:
    """Return (model input, None) for one file, or (None, why it cannot be labelled)."""
    try:
        data = read_image_file(path)
        if expected_sha256 is not None and hashlib.sha256(data).hexdigest() != expected_sha256:
            return None, "the file changed since it was indexed; run `simsearch index` again"
        return preprocess(decode_image(data, draft=preprocess, name=path)), None
    except ImageError as exc:
        return None, str(exc)
    except Exception as exc:  # a bug in a codec must cost one file, not the run
        log.debug("unexpected error on %s", path, exc_info=True)
        return None, f"{type(exc).__name__}: {exc}"


def _prepared_batches(
    items: Sequence[tuple[str, str | None]],
    preprocess: Preprocessing,
    batch_size: int,
    workers: int,
) -> Iterator[list[tuple[int, np.ndarray | None, str | None]]]:
    """Yield lists of (position in `items`, pixels, error), in order, for `items` of (path,
    expected SHA-256 or None); files are read and decoded PREFETCH_BATCHES batches ahead of
    the model in a thread pool."""
    if not items:
        return
    window = batch_size * (PREFETCH_BATCHES + 1)
    with (
        ThreadPoolExecutor(max(1, workers), thread_name_prefix="simsearch-label") as pool,
        # Closed first, on Ctrl-C or an error: what is queued is not decoded.
        closing(read_ahead(pool, lambda item: _prepare(*item, preprocess), items, window)) as ready,
    ):
        batch = []
        for n, (pixels, error) in enumerate(ready):
            batch.append((n, pixels, error))
            if len(batch) == batch_size:
                yield batch
                batch = []
        if batch:
            yield batch


def _autocast(precision: str, device: str):
    import torch

    if precision in ("bf16", "fp16"):
        dtype = torch.bfloat16 if precision == "bf16" else torch.float16
        return torch.autocast(device_type=device, dtype=dtype)
    return contextlib.nullcontext()
