"""Load on `simsearch serve`: latency and throughput by id and by upload, batching, an index
run meanwhile, and memory over 10,000 requests.

Makes (once, in --work) a collection of edited copies of scikit-image's sample photographs
(random crops, mirrors, resizes, JPEG qualities) and a second folder of new ones, indexes the
first with the CLI, then starts `simsearch serve` in a subprocess on 127.0.0.1 and, once
GET /api/ready answers 200, measures from a thread pool of httpx clients (one connection
each, opened before the clock starts):

a. search by id, GET /api/search?id=N&k=10 (N random among the indexed ids), at 1, 8 and
   32 concurrent clients;
b. search by upload, POST /api/search (multipart: `images`, a JPEG of an edited photo,
   and k=10), at the same levels, with the model batch sizes from GET /metrics
   (simsearch_model_batch_images_*) before and after each level;
d. the server's RSS (VmRSS of /proc/PID/status) after warm-up, then every 2,000 of
   --memory-requests requests (mostly by id, --memory-uploads of them uploads);
c. by id and by upload at 8 clients while `simsearch index NEWDIR --index X` (another
   process, holding the write lock) adds the second folder; then whether the server finds
   the new images once it is done.

Before all that, the forward pass alone per batch size (phase "model"). --phases picks
the parts (model, ab, d, c).

On a shared machine, other processes' CPU is measured during every level (all cores busy
minus the server's, the clients' and, in (c), the indexer's, from /proc); a level in which
they took more than 0.3 of a core is measured again after waiting for them to go quiet
(--retries, --quiet-wait), and the table shows each level's cores.

Loopback only. Bounded: a fixed number of requests per level, and --duration seconds for
all the measuring (what is left is skipped, and said so).

    python benchmarks/serve_load.py --model ~/models/dinov2-small --json /tmp/serve-load.json

Results are recorded in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
from copy_retrieval import PHOTOS, _load

LEVELS = (1, 8, 32)
DURING_CLIENTS = 8
MEMORY_CLIENTS = 8
CHECKPOINT = 2_000  # requests between two RSS readings in the memory run
K = 10


# -- the collection ---------------------------------------------------------------------------


def make_photos(folder: Path, count: int, seed: int) -> None:
    """`count` JPEGs: random crops (40-100 % of each side) of the sample photographs,
    mirrored one time in two, resized to a longest side of 224-800 px."""
    from PIL import Image, ImageOps

    rng = np.random.default_rng(seed)
    sources = [_load(name) for name in PHOTOS]
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        src = sources[i % len(sources)]
        w, h = src.size
        cw, ch = int(w * rng.uniform(0.4, 1.0)), int(h * rng.uniform(0.4, 1.0))
        x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        img = src.crop((x, y, x + cw, y + ch))
        if rng.random() < 0.5:
            img = ImageOps.mirror(img)
        side = int(rng.integers(224, 801))
        scale = side / max(img.size)
        img = img.resize(
            (max(16, round(img.width * scale)), max(16, round(img.height * scale))),
            Image.Resampling.BICUBIC,
        )
        img.save(folder / f"s{seed}-{i:05d}.jpg", quality=int(rng.integers(75, 95)))


def query_jpegs(count: int, seed: int) -> list[bytes]:
    """JPEG bytes to upload: other edits of the same photographs (not files of the index)."""
    from PIL import Image, ImageOps

    rng = np.random.default_rng(seed)
    out = []
    for i in range(count):
        src = _load(PHOTOS[i % len(PHOTOS)])
        w, h = src.size
        cw, ch = int(w * rng.uniform(0.5, 0.95)), int(h * rng.uniform(0.5, 0.95))
        x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        img = src.crop((x, y, x + cw, y + ch))
        if i % 2:
            img = ImageOps.flip(img)
        scale = 640 / max(img.size)
        img = img.resize((round(img.width * scale), round(img.height * scale)), Image.BICUBIC)
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=85)
        out.append(buf.getvalue())
    return out


def indexed_ids(index: Path) -> list[int]:
    from simsearch import Index

    with Index.open(index) as idx:
        dim = idx.manifest.dim
        return [int(i) for ids, _ in idx.store.iter_vectors(dim) for i in ids]


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "simsearch", *args]


def fresh_photos(folder: Path, count: int, seed: int) -> None:
    if folder.is_dir():
        shutil.rmtree(folder)
    make_photos(folder, count, seed)


def prepare(work: Path, args) -> tuple[Path, Path, Path]:
    """The collection indexed (once per size, model and precision: kept as a pristine copy
    that each run copies, since (c) adds to it) and the folder of new photos."""
    photos, new, index = work / "photos", work / "new-photos", work / "index"
    pristine = work / f"index-{args.photos}-{Path(args.model).name}-{args.precision}"
    done = work / f"{pristine.name}.done"
    if not done.exists():
        fresh_photos(photos, args.photos, seed=1)
        if pristine.exists():
            shutil.rmtree(pristine)
        started = time.perf_counter()
        command = ["index", str(photos), "--index", str(pristine), "--model", args.model]
        subprocess.run(cli("-q", *command, "--precision", args.precision), check=True)
        done.touch()
        print(f"indexed {args.photos} photos in {time.perf_counter() - started:.0f} s")
    fresh_photos(new, args.new_photos, seed=2)
    if index.exists():
        shutil.rmtree(index)
    shutil.copytree(pristine, index)
    return photos, new, index


# -- the server -------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(index: Path, args, log: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = cli(
        "serve",
        "--index",
        str(index),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--precision",
        args.precision,
    )
    proc = subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    started = time.perf_counter()
    while time.perf_counter() - started < 180:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited ({proc.returncode}):\n{log.read_text()}")
        try:
            if httpx.get(f"{url}/api/ready", timeout=2).status_code == 200:
                print(f"server ready in {time.perf_counter() - started:.1f} s", flush=True)
                return proc, url
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise SystemExit("the server was not ready within 180 s")


def stop_server(proc: subprocess.Popen) -> int:
    proc.send_signal(signal.SIGINT)
    try:
        return proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        return -9


def rss_mb(pid: int) -> dict[str, float]:
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key = line.split(":")[0]
            if key in ("VmRSS", "VmHWM"):
                out[key] = round(int(line.split()[1]) / 1024, 1)
    return out


HZ = os.sysconf("SC_CLK_TCK")


def machine_busy() -> int:
    """Jiffies all cores spent busy (user, nice, system, irq, softirq) since boot."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:8]]
    return v[0] + v[1] + v[2] + v[5] + v[6]


def process_cpu(pid: int | str | None) -> int:
    """Jiffies a process (all its threads) has run, user and system."""
    if pid is None:
        return 0
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except FileNotFoundError:
        return 0
    return int(fields[11]) + int(fields[12])


class CpuMeter:
    """Cores busy over a stretch of time: the server's, this process's (the clients'), and
    everything else on the machine (other jobs; the indexer in (c))."""

    def __init__(self, server_pid: int | None) -> None:
        self.pid = server_pid
        self.indexer: int | None = None  # a pid counted on its own, in (c)

    def start(self) -> None:
        self.t = time.perf_counter()
        self.m, self.s, self.c = machine_busy(), process_cpu(self.pid), process_cpu("self")
        self.i = process_cpu(self.indexer)

    def stop(self) -> dict[str, float]:
        wall = max(time.perf_counter() - self.t, 0.05) * HZ  # jiffies are 1/HZ s
        machine = (machine_busy() - self.m) / wall
        server = (process_cpu(self.pid) - self.s) / wall
        client = (process_cpu("self") - self.c) / wall
        out = {
            "machine": round(machine, 2),
            "server": round(server, 2),
            "clients": round(client, 2),
        }
        if self.indexer is not None:  # 0 if it ended meanwhile: its last jiffies are lost
            indexer = max(0, process_cpu(self.indexer) - self.i) / wall
            out["indexer"] = round(indexer, 2)
            client += indexer
        out["others"] = round(max(0.0, machine - server - client), 2)
        return out


def wait_quiet(meter: CpuMeter, most: float) -> float:
    """Wait (at most `most` s) until other processes use under 0.2 of a core; their load."""
    started, others = time.perf_counter(), 0.0
    while True:
        meter.start()
        time.sleep(2)
        others = meter.stop()["others"]
        if others < 0.2 or time.perf_counter() - started > most:
            return others
        print(f"other processes busy ({others:.2f} cores): waiting", flush=True)


def scrape(url: str) -> str:
    return httpx.get(f"{url}/metrics", timeout=30).text


_BUCKET = re.compile(r'^simsearch_model_batch_images_bucket\{le="([^"]+)"\} (\d+)$')


def batches(text: str) -> dict:
    """The model batch size histogram: cumulative buckets, sum and count."""
    out: dict = {"buckets": {}, "sum": 0.0, "count": 0}
    for line in text.splitlines():
        if m := _BUCKET.match(line):
            out["buckets"][m.group(1)] = int(m.group(2))
        elif line.startswith("simsearch_model_batch_images_sum"):
            out["sum"] = float(line.split()[-1])
        elif line.startswith("simsearch_model_batch_images_count"):
            out["count"] = int(line.split()[-1])
    return out


def batch_delta(before: dict, after: dict) -> dict:
    """The batches between two scrapes: how many, their mean size, how many of each size
    range (from the cumulative buckets)."""
    n = after["count"] - before["count"]
    images = after["sum"] - before["sum"]
    ranges, low, previous = {}, 1, 0
    for bound, cum in after["buckets"].items():
        cum -= before["buckets"].get(bound, 0)
        if cum - previous:
            hi = "inf" if bound == "+Inf" else bound
            ranges[bound if str(low) == hi else f"{low}-{hi}"] = cum - previous
        previous = cum
        if bound != "+Inf":
            low = int(float(bound)) + 1
    return {
        "batches": n,
        "images": round(images),
        "mean": round(images / n, 2) if n else None,
        "sizes": ranges,
    }


def statuses(text: str) -> dict[str, int]:
    """Requests answered by the server, by "METHOD route status"."""
    out = {}
    pattern = r'^simsearch_requests_total\{method="(\w+)",route="([^"]*)",status="(\d+)"\} (\d+)'
    for line in text.splitlines():
        if m := re.match(pattern, line):
            out[f"{m.group(1)} {m.group(2)} {m.group(3)}"] = int(m.group(4))
    return out


def gauge(text: str, name: str) -> float | None:
    for line in text.splitlines():
        if line.startswith(f"simsearch_{name} "):
            return float(line.split()[1])
    return None


# -- load -------------------------------------------------------------------------------------


def load(url, plan: list[tuple[str, int]], clients: int, jpegs: list[bytes], deadline, meter):
    """Send `plan` (("id", N) or ("upload", j) per request) from `clients` threads, each
    with its own connection; stop early at `deadline`. Latencies in ms, by kind; cores
    busy meanwhile."""
    lock = threading.Lock()
    nxt = iter(range(len(plan)))
    latencies: dict[str, list[float]] = {"id": [], "upload": []}
    failures: list[dict] = []
    barrier = threading.Barrier(clients + 1)

    def worker() -> None:
        with httpx.Client(base_url=url, timeout=120) as client:
            client.get("/api/health")  # the connection, before the clock
            barrier.wait()
            while time.monotonic() < deadline:
                with lock:
                    i = next(nxt, None)
                if i is None:
                    return
                kind, arg = plan[i]
                started = time.perf_counter()
                try:
                    if kind == "id":
                        r = client.get("/api/search", params={"id": arg, "k": K})
                    else:
                        files = {"images": (f"query{arg}.jpg", jpegs[arg], "image/jpeg")}
                        r = client.post("/api/search", files=files, data={"k": str(K)})
                    ms = (time.perf_counter() - started) * 1000
                    ok = r.status_code == 200 and len(r.json()["results"][0]["hits"]) == K
                    if not ok:
                        failure = {"request": f"{kind} {arg}", "status": r.status_code}
                        failure["body"] = r.text[:500]
                except Exception as exc:  # a failure to record, not to stop on
                    ms, ok = (time.perf_counter() - started) * 1000, False
                    failure = {"request": f"{kind} {arg}", "error": repr(exc)}
                with lock:
                    if ok:
                        latencies[kind].append(ms)
                    else:
                        failures.append(failure)

    threads = [threading.Thread(target=worker) for _ in range(clients)]
    for t in threads:
        t.start()
    barrier.wait()
    meter.start()
    started = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - started
    cores = meter.stop()
    done = sum(len(v) for v in latencies.values()) + len(failures)
    return {
        "clients": clients,
        "planned": len(plan),
        "done": done,
        "failed": len(failures),
        "failures": failures[:5],
        "cut_short": done < len(plan),
        "seconds": round(wall, 2),
        "qps": round(done / wall, 1) if wall else None,
        "by_kind": {k: summary(v) for k, v in latencies.items() if v},
        "cores": cores,
    }


def summary(ms: list[float]) -> dict:
    a = np.asarray(ms)
    return {
        "n": len(ms),
        "p50_ms": round(float(np.percentile(a, 50)), 1),
        "p99_ms": round(float(np.percentile(a, 99)), 1),
        "max_ms": round(float(a.max()), 1),
    }


def row(kind: str, result: dict, batch: dict | None = None) -> dict:
    s = result["by_kind"].get(kind, {})
    return {
        "kind": kind,
        "clients": result["clients"],
        "requests": result["done"],
        "failed": result["failed"],
        "qps": result["qps"],
        "p50_ms": s.get("p50_ms"),
        "p99_ms": s.get("p99_ms"),
        "mean_batch": batch["mean"] if batch else None,
        "cut_short": result["cut_short"],
        "cores_server": result["cores"]["server"],
        "cores_clients": result["cores"]["clients"],
        "cores_others": result["cores"]["others"],
        "cores_indexer": result["cores"].get("indexer"),
    }


COLUMNS = (  # heading, key, width
    ("clients", "clients", 7),
    ("kind", "kind", 6),
    ("requests", "requests", 8),
    ("failed", "failed", 6),
    ("qps", "qps", 7),
    ("p50 ms", "p50_ms", 8),
    ("p99 ms", "p99_ms", 8),
    ("mean batch", "mean_batch", 10),
    ("server cores", "cores_server", 12),
    ("client cores", "cores_clients", 12),
    ("other cores", "cores_others", 11),
)


def table(rows: list[dict], title: str) -> None:
    columns = COLUMNS
    if any(r["cores_indexer"] is not None for r in rows):
        columns += (("indexer cores", "cores_indexer", 13),)
    print(f"\n{title}")
    print(" ".join(f"{head:>{width}}" for head, _, width in columns))
    for r in rows:
        cells = ["" if r[key] is None else str(r[key]) for _, key, width in columns]
        line = " ".join(f"{c:>{w}}" for c, (_, _, w) in zip(cells, columns, strict=True))
        print(line + ("  (cut short by --duration)" if r["cut_short"] else ""))


def cpu_model() -> str:
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return "?"


# -- the run ----------------------------------------------------------------------------------


PHASES = ("model", "ab", "d", "c")
NOISY = 0.3  # cores other processes may take during a level before it is measured again


def model_only(index: Path, args, jpegs: list[bytes]) -> list[dict]:
    """The forward pass alone (preprocessing included, as the server's batcher calls it),
    per batch size: what the upload figures are bounded by. A batch size that other jobs
    disturbed is measured again after a quiet wait."""
    from simsearch import Index
    from simsearch.media.decode import decode_image

    images = [decode_image(j, name=f"q{n}.jpg") for n, j in enumerate(jpegs)]
    meter, out = CpuMeter(None), []
    with Index.open(index, precision=args.precision) as idx:
        embedder = idx.embedder
        embedder.embed_images(images[:2])
        for n in (1, 4, 8, 16, 32):
            embedder.embed_images(images[:n])  # this shape once before the clock
            reps = max(2, 32 // n)
            for attempt in range(args.retries + 1):
                meter.start()
                started = time.perf_counter()
                for _ in range(reps):
                    embedder.embed_images(images[:n])
                ms = (time.perf_counter() - started) * 1000 / reps
                others = meter.stop()["others"]
                if others <= NOISY:
                    break
                if attempt < args.retries:
                    wait_quiet(meter, args.quiet_wait)
            out.append(
                {
                    "batch": n,
                    "ms": round(ms),
                    "ms_per_image": round(ms / n, 1),
                    "images_per_s": round(1000 * n / ms, 1),
                    "others_cores": others,
                }
            )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="local model folder (DINOv2-S)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/simsearch-serve-load"))
    parser.add_argument("--photos", type=int, default=600, help="images in the index")
    parser.add_argument("--new-photos", type=int, default=300, help="added during (c)")
    parser.add_argument("--precision", default="fp32", help="server's and indexer's")
    parser.add_argument("--requests", type=int, default=200, help="by id, per level")
    parser.add_argument("--uploads", type=int, default=96, help="by upload, per level")
    parser.add_argument("--memory-requests", type=int, default=10_000)
    parser.add_argument("--memory-uploads", type=int, default=300, help="of those, uploads")
    parser.add_argument(
        "--duration", type=float, default=540, help="seconds for all the measuring, at most"
    )
    parser.add_argument(
        "--phases", default=",".join(PHASES), help="model (forward pass alone), ab, d, c"
    )
    parser.add_argument(
        "--indexer-threads", type=int, default=None, help="OMP_NUM_THREADS of the indexer in c"
    )
    parser.add_argument(
        "--quiet-wait", type=float, default=120, help="seconds to wait for other jobs' CPU"
    )
    parser.add_argument(
        "--retries", type=int, default=2, help="re-measure a level other jobs disturbed"
    )
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    phases = set(args.phases.split(","))
    if phases - set(PHASES):
        parser.error(f"--phases: one or more of {', '.join(PHASES)}")

    args.work.mkdir(parents=True, exist_ok=True)
    _, new, index = prepare(args.work, args)
    ids = indexed_ids(index)
    jpegs = query_jpegs(32, seed=3)
    rng = np.random.default_rng(args.seed)
    out: dict = {
        "machine": {"nproc": os.cpu_count(), "cpu": cpu_model()},
        "model": args.model,
        "precision": args.precision,
        "collection": len(ids),
        "new_photos": args.new_photos,
        "args": {k: str(v) for k, v in vars(args).items()},
    }
    skipped: list[str] = []

    if "model" in phases:
        out["others_busy_before_model_cores"] = wait_quiet(CpuMeter(None), args.quiet_wait)
        out["model_only"] = model_only(index, args, jpegs)
        print("model alone, by batch size:")
        for m in out["model_only"]:
            print(
                f"  {m['batch']:>2}: {m['ms']} ms, {m['ms_per_image']} ms/image, "
                f"{m['images_per_s']} images/s (other jobs: {m['others_cores']} cores)"
            )

    def by_id(n: int) -> list[tuple[str, int]]:
        return [("id", int(i)) for i in rng.choice(ids, n)]

    def by_upload(n: int) -> list[tuple[str, int]]:
        return [("upload", int(j)) for j in rng.integers(0, len(jpegs), n)]

    log = args.work / "server.log"
    proc, url = start_server(index, args, log)
    try:
        meter = CpuMeter(proc.pid)
        deadline = time.monotonic() + args.duration

        def measured(kind: str, clients: int) -> dict:
            """One level, measured again (after a quiet wait) if other jobs took CPU."""
            for attempt in range(args.retries + 1):
                plan = by_id(args.requests) if kind == "id" else by_upload(args.uploads)
                before = batches(scrape(url))
                result = load(url, plan, clients, jpegs, deadline, meter)
                result["batches"] = batch_delta(before, batches(scrape(url)))
                result["attempts"] = attempt + 1
                if result["cores"]["others"] <= NOISY or time.monotonic() >= deadline:
                    break
                if attempt < args.retries:
                    print(f"  {kind} x{clients}: others took {result['cores']['others']} "
                          "cores; measuring again", flush=True)  # fmt: skip
                    wait_quiet(meter, args.quiet_wait)
            return result

        # Warm-up: the first forward passes, one connection's first requests.
        load(url, by_id(20) + by_upload(4), 1, jpegs, deadline, meter)
        load(url, by_upload(16), 8, jpegs, deadline, meter)
        out["rss_after_warmup_mb"] = rss_mb(proc.pid)
        out["others_busy_before_cores"] = wait_quiet(meter, args.quiet_wait)
        print(f"server pid {proc.pid}, RSS after warm-up {out['rss_after_warmup_mb']}")

        if "ab" in phases:  # (a) and (b)
            rows, levels = [], []
            for kind in ("id", "upload"):
                for clients in LEVELS:
                    result = measured(kind, clients)
                    batch = result["batches"] if kind == "upload" else None
                    rows.append(row(kind, result, batch))
                    levels.append(result)
            out["levels"], out["table"] = levels, rows
            out["rss_after_levels_mb"] = rss_mb(proc.pid)
            table(rows, "(a, b) search by id and by upload")
            for r in levels[len(LEVELS) :]:
                print(f"  {r['clients']:>2} clients: model batches {r['batches']}")

        if "d" in phases:  # memory
            out["memory"] = memory(url, args, by_id, by_upload, jpegs, deadline, meter, skipped)
            out["memory"]["growth_since_warmup_mb"] = round(
                out["memory"]["readings"][-1]["VmRSS"] - out["rss_after_warmup_mb"]["VmRSS"], 1
            )

        if "c" in phases:  # while an index run adds the new folder
            wait_quiet(meter, args.quiet_wait)
            out["during_indexing"] = during_indexing(
                url, index, new, args, jpegs, by_id, by_upload, deadline, meter, skipped
            )
            d = out["during_indexing"]
            if d.get("rows"):
                table(d["rows"], f"(c) at {DURING_CLIENTS} clients while `simsearch index` runs")
                print(f"  indexer: {d['indexer']}")
                print(f"  after it: {d['after']}")

        text = scrape(url)
        out["server_statuses"] = statuses(text)
        out["rss_end_mb"] = rss_mb(proc.pid)
    finally:
        out["server_exit"] = stop_server(proc)
        server_log = log.read_text(errors="replace")
        out["server_log_problems"] = [
            ln for ln in server_log.splitlines() if re.search(r"Traceback|ERROR|Error", ln)
        ][:20]
    out["skipped"] = skipped
    print(f"\nserver answered: {out.get('server_statuses')}")
    print(f"server log problems: {out['server_log_problems'] or 'none'}; exit {out['server_exit']}")
    if skipped:
        print("skipped:", skipped)
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))
        print(f"wrote {args.json}")


def memory(url, args, by_id, by_upload, jpegs, deadline, meter, skipped) -> dict:
    """The server's RSS every CHECKPOINT requests of a mix, by id and by upload."""
    plan = by_id(args.memory_requests - args.memory_uploads) + by_upload(args.memory_uploads)
    np.random.default_rng(args.seed + 1).shuffle(plan)
    readings = [{"requests": 0, **rss_mb(meter.pid)}]
    failed, started, parts = 0, time.perf_counter(), []
    for offset in range(0, len(plan), CHECKPOINT):
        if time.monotonic() >= deadline:
            skipped.append(f"memory: stopped after {offset} requests (--duration)")
            break
        part = load(url, plan[offset : offset + CHECKPOINT], MEMORY_CLIENTS, jpegs, deadline, meter)
        failed += part["failed"]
        parts.append(part)
        readings.append({"requests": offset + part["done"], **rss_mb(meter.pid)})
    print(
        f"\n(d) memory at {MEMORY_CLIENTS} clients: RSS MB by requests sent: "
        + ", ".join(f"{r['requests']}: {r['VmRSS']}" for r in readings)
        + f"; failed {failed}"
    )
    return {
        "clients": MEMORY_CLIENTS,
        "requests": readings[-1]["requests"],
        "uploads_planned": args.memory_uploads,
        "failed": failed,
        "failures": [f for p in parts for f in p["failures"]][:5],
        "seconds": round(time.perf_counter() - started, 1),
        "readings": readings,
        "growth_mb": round(readings[-1]["VmRSS"] - readings[0]["VmRSS"], 1),
        "parts": [{"done": p["done"], "by_kind": p["by_kind"], "cores": p["cores"]} for p in parts],
    }


def during_indexing(url, index, new, args, jpegs, by_id, by_upload, deadline, meter, skipped):
    """By id and by upload at 8 clients while the CLI indexer adds `new` to the index, once
    it has committed its first batch; then whether the server finds the new images."""
    if time.monotonic() >= deadline:
        skipped.append("during indexing: no time left (--duration)")
        return {}
    before = gauge(scrape(url), "index_images")
    log = args.work / "indexer.log"
    env = dict(os.environ)
    if args.indexer_threads:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(args.indexer_threads)
    started = time.perf_counter()
    indexer = subprocess.Popen(
        cli(
            "index",
            str(new),
            "--index",
            str(index),
            "--model",
            args.model,
            "--precision",
            args.precision,
            "--json",
        ),
        stdout=subprocess.PIPE,
        stderr=log.open("w"),
        text=True,
        env=env,
    )
    meter.indexer = indexer.pid
    # Wait for its first commit to show in the server's count (the reader sees it).
    first_commit = None
    while indexer.poll() is None and time.perf_counter() - started < 180:
        now = gauge(scrape(url), "index_images")
        if now is not None and before is not None and now > before:
            first_commit = round(time.perf_counter() - started, 1)
            break
        time.sleep(0.1)
    rows, results = [], []
    for kind, plan in (("id", by_id(args.requests)), ("upload", by_upload(args.uploads))):
        running_at_start = indexer.poll() is None
        count_start = gauge(scrape(url), "index_images")
        b0 = batches(scrape(url))
        result = load(url, plan, DURING_CLIENTS, jpegs, deadline, meter)
        text = scrape(url)
        batch = batch_delta(b0, batches(text)) if kind == "upload" else None
        result.update(
            indexer_running_at_start=running_at_start,
            indexer_running_at_end=indexer.poll() is None,
            index_images_start=count_start,
            index_images_end=gauge(text, "index_images"),
            batches=batch,
        )
        results.append(result)
        rows.append(row(kind, result, batch))
    meter.indexer = None
    try:
        stdout, _ = indexer.communicate(timeout=max(30, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        indexer.kill()
        stdout, _ = indexer.communicate()
        skipped.append("during indexing: the indexer was killed (--duration)")
    indexer_seconds = round(time.perf_counter() - started, 1)
    summary_line = stdout.strip().splitlines()[-1] if stdout.strip() else ""
    try:
        report = json.loads(summary_line)
    except json.JSONDecodeError:
        report = summary_line
    # Does the server find the new images now? The count, then a new file uploaded as is.
    after_count = gauge(scrape(url), "index_images")
    newest = sorted(new.glob("*.jpg"))[len(PHOTOS) // 2]
    r = httpx.post(
        f"{url}/api/search",
        files={"images": (newest.name, newest.read_bytes(), "image/jpeg")},
        data={"k": "1"},
        timeout=120,
    )
    hit = r.json()["results"][0]["hits"][0] if r.status_code == 200 else {"status": r.status_code}
    return {
        "clients": DURING_CLIENTS,
        "indexer_threads": args.indexer_threads,
        "rows": rows,
        "levels": results,
        "indexer": {
            "rc": indexer.returncode,
            "seconds": indexer_seconds,
            "first_commit_seen_after_s": first_commit,
            "report": report,
            "log_tail": log.read_text(errors="replace").splitlines()[-5:],
        },
        "after": {
            "index_images_before": before,
            "index_images_after": after_count,
            "upload_of_a_new_file": newest.name,
            "top_hit": {k: hit.get(k) for k in ("id", "path", "score", "status") if k in hit},
            "found_itself": str(hit.get("path", "")).endswith(newest.name),
        },
    }


if __name__ == "__main__":
    main()
