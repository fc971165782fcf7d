"""Defaults in one place, each with the reason it has the value it has.

The index folder's format (its files, FORMAT_VERSION, the manifest) is in storage/manifest.py;
the ONNX export's file names are in models/onnx.py. A limit that tests or tools change (a
wait, a cut-off, a bound of a check) is read as `config.NAME` where it is used, not copied in
with `from simsearch.config import NAME`, so setting `simsearch.config.NAME` reaches every
module that uses it, wherever the code moves.
"""

from __future__ import annotations

import os
from pathlib import Path

# The mission's default backbone: ViT-L/16 pre-trained on ImageNet-21k gives general-purpose,
# 1024-dim [CLS] vectors that work for "looks like" search without fine-tuning.
DEFAULT_MODEL = "google/vit-large-patch16-224-in21k"

# The classification head for `simsearch label`: ViT-L/16 fine-tuned on ImageNet-1k at 384 px,
# the same backbone family as DEFAULT_MODEL, so its 1,000 everyday object names (with
# synonyms: "tabby, tabby cat") describe the photos that index is built for.
DEFAULT_LABEL_MODEL = "google/vit-large-patch16-384"

# Labels shown per image by `simsearch label`, and stored per image by `index --label-model`:
# an ImageNet classifier's 5th guess still often names the subject (top-5 accuracy is why
# ImageNet reports it), past that the probabilities are noise.
DEFAULT_LABEL_TOP = 5

# Where an index lives when neither --index nor SIMSEARCH_INDEX names one: the repo's indexes/
# folder, so a first run needs no flags and the result is easy to find.
DEFAULT_INDEX = Path("indexes/default")

# 32 images of 224 px fill the CPU's matrix units well and keep a batch of ViT-L activations
# under ~1 GB; larger batches gain < 5 % on CPU and only delay the first commit.
DEFAULT_BATCH_SIZE = 32

# Ten neighbours fit on one screen.
DEFAULT_K = 10

# Decode this many images ahead of the model so it rarely waits on Pillow.
PREFETCH_BATCHES = 2

# Pillow's own bomb limit is ~89 Mpx and only warns below 2x that; we refuse anything above
# this many pixels before decoding, so one hostile file cannot allocate gigabytes.
MAX_IMAGE_PIXELS = 178_956_970

# And whatever its pixel count, no image may take more than this many bytes to decode, as
# Pillow stores its mode (16-bit grey 2 bytes a pixel, RGB and RGBA 4, 32-bit or float 4):
# a 329 KB PNG of 13000x13000 16-bit pixels took 5.4 GB on its way to RGB. 400 MiB holds a
# 100-megapixel RGB scan; two decode workers then stay near 1 GB above the process.
MAX_DECODE_BYTES = 400 << 20

# The model input an image is resized to may take at most this many bytes (8-bit pixels
# and their float copy): a shortest-edge resize of a 1x10000 PNG would be 224x2240000.
MAX_RESIZED_BYTES = 64 << 20

# JPEGs are decoded at no less than this many times the model's input size (Pillow's draft
# mode scales by 1/2, 1/4 or 1/8 while decoding). The DCT-domain downscale is a crude filter;
# leaving the last 2x to Pillow's resize keeps the pixels within ~1 % of a full decode, and a
# 1600x1200 photo still decodes at 1/2 scale, about 3x faster.
DRAFT_OVERSAMPLE = 2

# Folder scans take every suffix the installed Pillow registers for a format it can open
# (media.formats.image_suffixes), except the formats below, which are also never decoded
# whatever a file is named (Pillow's stub formats, BUFR, GRIB, HDF5 and WMF/EMF, are left
# out too: they open only through a handler an application registers):
UNINDEXED_FORMATS = frozenset(
    {
        "EPS",  # decoding runs Ghostscript, an outside interpreter, on the file: too much
        # power to hand a file from anywhere, and PostScript is documents, not photos
        "MPEG",  # a video: Pillow reads its header but has no decoder for a frame
    }
)

# Camera RAW files open through rawpy (LibRaw), the `raw` extra, when installed. LibRaw has
# no registry of suffixes to ask, so these are the common ones.
RAW_SUFFIXES = frozenset(
    {
        ".3fr", ".ari", ".arw", ".cr2", ".cr3", ".crw", ".dcr", ".dng", ".erf", ".iiq",
        ".k25", ".kdc", ".mef", ".mos", ".mrw", ".nef", ".nrw", ".orf", ".pef", ".raf",
        ".raw", ".rw2", ".rwl", ".sr2", ".srf", ".srw", ".x3f",
    }
)  # fmt: skip

# Distinct suffixes of skipped files tallied per folder (for the notice that a folder held
# no image files); the rest are counted together under OTHER_SUFFIXES, which has no dot,
# so no real suffix equals it. A tree of odd names cannot grow the tally without bound.
SKIPPED_SUFFIXES_KEPT = 100
OTHER_SUFFIXES = "other"

# Files larger than this are refused unread: no photo is this big, and reading one whole
# would cost that much memory.
MAX_FILE_BYTES = 1 << 30

# Threads that read, hash, decode and resize images while the model runs. Pillow releases
# the GIL while decoding, so threads overlap with the forward pass; more than 4 rarely helps
# a CPU that is also running the model.
DEFAULT_WORKERS = min(4, os.cpu_count() or 1)

# During a long indexing run, save the FAISS file this often (after a commit), so that a
# search started meanwhile loads it instead of rebuilding it from the database.
FAISS_CHECKPOINT_SECONDS = 300.0

# How long a writer waits for the index's write lock before giving up. A search that had to
# rebuild the FAISS file holds the lock while it saves the result, which takes seconds on a
# big index; another writer gets its error at once after this.
LOCK_WAIT_SECONDS = 5.0

# -- vector index types (see search.plan.plan_index) ----------------------------------------

# `--index-type auto` searches exactly up to this many vectors: a flat scan of 50,000
# 1024-dim vectors reads 200 MB and answers in ~15 ms on two cores, and is always right.
AUTO_FLAT_MAX_VECTORS = 50_000

# Beyond that, auto builds an HNSW graph while the full vectors take at most this much RAM
# (~1.4M vectors at 768 dims); past it, compressed IVF-PQ codes with exact re-ranking.
AUTO_HNSW_MAX_BYTES = 4 << 30

# HNSW: 32 links per node and 80 candidates while building; more links cost memory
# (M * 8 bytes per vector) and build time (281 s for 1M x 768 on 2 cores already).
HNSW_M = 32
HNSW_EF_CONSTRUCTION = 80

# HNSW candidate list at query time (raised to k when k is larger). Measured at 1M x 768
# (docs/benchmarks.md): ef 64 finds 85 % of the true top 10, 128 finds 92 %, 256 finds 97 %
# in 1.6 ms; below 95 % users notice missing near-duplicates.
DEFAULT_EF = 256

# IVF: FAISS warns below 39 training vectors per list; more lists than this make training
# and assigning 10M vectors take hours on a small machine, for little gain in speed.
IVF_TRAIN_PER_LIST = 39
IVF_MAX_LISTS = 4096

# k-means iterations when training IVF centroids (FAISS's default is 25): centroids barely
# move after 10 on embeddings, and each iteration over a 200k sample costs ~10 s on 2 cores.
IVF_TRAIN_ITERATIONS = 10

# IVF lists visited per query: 16 of 4,000 lists found 99.98 % of the true top 10 at
# 1M x 768 in 1.6 ms (8 lists: 99.9 %, 1.3 ms); embeddings less clustered than that
# benchmark's need more, hence the margin.
DEFAULT_NPROBE = 16

# IVF-PQ codes: one 4-bit code per 8 dimensions (48 bytes for 768 dims, 64x smaller than
# float32), searched with FAISS's SIMD fast-scan kernels. 8-bit codes train ~12x slower
# (100 s vs 8 s on 100k vectors here) for recall that re-ranking makes up anyway (0.998 vs
# 1.0 recall@10 after re-ranking 100 candidates, benchmarks/search_scale.py data).
PQ_DIMS_PER_CODE = 8

# Approximate scores are re-ranked by the exact inner product of the stored vectors over a
# shortlist of k times this many candidates.
DEFAULT_RERANK = 10

# Rebuild (and retrain) an IVF index when the collection has grown this many times past the
# size it was trained on, and any index when this share of its entries are tombstones.
RETRAIN_GROWTH = 4.0
TOMBSTONE_REBUILD_SHARE = 0.2

# dedup asks the index for this many neighbours of each image: a group larger than this
# is still found whole when its members chain together (union-find), and 20 keeps the
# graph at 20 x n edges at most.
DEDUP_NEIGHBOURS = 20

# The calibrated dedup threshold maximises F-beta with this beta, over the copies the
# collection is estimated to hold (simsearch.ops.calibrate): 1 weighs a false duplicate (a
# different photo offered for deletion) and a missed copy alike; precision is protected by
# counting copies as few as the collection has, not seven per sampled image. Method 2's
# 0.5 over seven copies an image set thresholds among near-distinct shots (precision
# 0.57); benchmarks/dedup_quality.py, figures in docs/benchmarks.md.
DEDUP_F_BETA = 1.0

# Threshold calibration edits this many indexed images (7 copies each): 700 embeddings,
# about a minute with ViT-B on two cores; precision and recall on fewer move by several
# points from one sample to the next.
CALIBRATION_SAMPLE = 100

# The calibration method a new calibration uses (records.Calibration.method): 3 weighs the
# edited copies by the number of copies the collection is estimated to hold
# (simsearch.ops.calibrate); 2 counted each as a real copy and set thresholds among near-
# distinct shots; 1 counted the copies already in the collection as mistakes and set the
# threshold too high where there are many (0.972 where 0.915 was best). A stored
# calibration of an older method is still used, with a warning to recalibrate.
CALIBRATION_METHOD = 3

# Readers memory-map FAISS files at least this big instead of reading them, so `search`
# starts at once; smaller files are read whole (milliseconds) and live in RAM.
MMAP_MIN_BYTES = 256 << 20

# A search restricted to a subset (a cluster, a label) ranks subsets up to this size
# exactly on their stored vectors (20,000 x 4 KB read from SQLite: ~50 ms); larger ones are
# filtered inside the FAISS search.
FILTER_EXACT_MAX = 20_000

# A filtered HNSW walk widens its candidate list in inverse proportion to the share of the
# index allowed (a 10 % subset at the default ef walks 2,560), up to this many; filtered IVF
# searches visit lists in the same proportion, up to all of them.
FILTER_MAX_EF = 4096

# -- clusters (see cluster.py) ---------------------------------------------------------------

# k-means trains on a random sample: this many vectors per centroid (FAISS's own cap,
# `max_points_per_centroid`: more barely moves a centroid), at least CLUSTER_TRAIN_MIN (so
# small K still sees the collection's variety) and at most CLUSTER_TRAIN_MAX (400 MB at 1024
# dims), so a 1M- or 10M-image index clusters in the same bounded memory.
CLUSTER_TRAIN_PER_CENTROID = 256
CLUSTER_TRAIN_MIN = 10_000
CLUSTER_TRAIN_MAX = 100_000

# Lloyd iterations (FAISS's default is 25): centroids of embeddings barely move after 10
# (IVF training stops there), and each iteration is one pass of the sample against every
# centroid; 20 leaves room for the less separated groups clustering looks for.
CLUSTER_ITERATIONS = 20

# Seeds are chosen by greedy k-means++ on a subsample of CLUSTER_SEED_PER_CENTROID vectors
# per centroid (at 16, a group of average size is missing from it, and so gets no seed,
# with odds of ~1 in 10^6 for 20 groups; at 8, ~1 in 200), trying 2 +
# CLUSTER_SEED_TRIALS_PER_LOG_K x ln(k) candidates at each step (scikit-learn tries
# 2 + ln k), CLUSTER_SEEDINGS times while k <= CLUSTER_SEEDINGS_MAX_K, keeping the seeding
# with the lowest k-means potential. Lloyd iterations cannot undo a seeding that put two
# seeds in one group and none in another: on 20 planted groups of 100 vectors, 4
# candidates a step and one seeding recovered every group in 55 % of 40 runs, 8 candidates
# in 95 %, 8 and the best of 3 seedings in 40 of 40; as shipped (7 candidates at k = 20,
# best of 3) in 39 of 40 runs on other draws of the groups. Past 200 clusters one split
# group is a small share of them, and 3 seedings would cost more than training: seeding
# reads its subsample once per centroid (93 s for 3 seedings of k = 1,000 at 768 dims on
# 2 cores; training 200 centroids on 51k vectors, seeding included, takes 12 s).
CLUSTER_SEED_PER_CENTROID = 16
CLUSTER_SEED_TRIALS_PER_LOG_K = 2
CLUSTER_SEEDINGS = 3
CLUSTER_SEEDINGS_MAX_K = 200

# K is at most this: seeding and training cost grow with k^2 (the sample grows with k), to
# several minutes on 2 cores at this K (an estimate from the timings above), and clusters
# of a few hundred images out of a million are better found by search than browsed.
CLUSTER_MAX_K = 2_000

# `-k auto` tries K from 2 to this many (fewer for small indexes), training each on a random
# CLUSTER_AUTO_SAMPLE of the training sample and scoring it by the mean silhouette of another
# CLUSTER_SILHOUETTE_SAMPLE (one 2,000 x 2,000 cosine matrix, reused for every K; every run
# reports its silhouette on it). 64: auto is for a set of clusters a person can browse, and
# bounds its cost (~25 trainings on 5,000 vectors); give K for more.
CLUSTER_AUTO_MAX_K = 64
CLUSTER_AUTO_SAMPLE = 5_000
CLUSTER_SILHOUETTE_SAMPLE = 2_000

# Images shown per cluster: the ones nearest its centre, enough to tell what it holds.
CLUSTER_TOP = 5

# -- distillation (see train/distill_data.py) ------------------------------------------------

# The most bytes of preprocessed pixels a distillation holds (float16, ~0.3 MB an image at
# 224 px): with no --max-images, an index with more images trains on a seeded sample of this
# many (~14,000 at 224 px), with a notice; 4 GiB leaves room for the student's training on a
# 16 GiB machine. A bigger --max-images is taken as asked.
DISTILL_MAX_PIXEL_BYTES = 4 << 30

# -- ONNX export (see models/onnx_export.py and models/onnx.py) -----------------------------

# ONNX opset of `simsearch export-model`: 17 is the first with a LayerNormalization op (one
# fused kernel instead of seven), and every onnxruntime since 1.14 runs it. Below 14,
# scaled_dot_product_attention cannot be exported.
DEFAULT_OPSET = 17
MIN_OPSET = 14

# An fp32 export must give the vectors PyTorch gives, up to float rounding: the lowest cosine
# between the two on any validation image. Measured: 0.9999999 on DINOv2-S.
ONNX_MIN_COSINE = 0.9999

# An int8 export may round, but not reorder a collection: the lowest cosine to PyTorch's fp32
# vector on any validation image, and recall@10 of fp32's neighbours among the validation
# images (the bounds `--precision int8` meets in docs/benchmarks.md).
INT8_MIN_COSINE = 0.98
INT8_MIN_RECALL = 0.9

# recall@10 needs more than 10 images, and means little on fewer than this many.
VALIDATION_MIN_IMAGES = 20

# Validation embeds at most this many images (the first, in sorted order, of --validate-dir;
# the built-in set has 108): ViT-L embeds ~1.2 images/s in fp32 on two cores, so each of the
# passes (PyTorch, ONNX fp32, each int8 try) takes up to ~100 s at this cap.
VALIDATION_MAX_IMAGES = 120

# Most thumbnails one HTML report page embeds: 1,000 make a page of roughly 15-30 MB, about
# the most a browser opens without stalling and a person scrolls through; beyond that, a
# note points to the complete listing. Dedup runs over large collections find tens of
# thousands of groups.
MAX_PAGE_FIGURES = 1_000
