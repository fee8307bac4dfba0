"""Batch inference on Ray Data: the same predictions as ``predict``, spread over a pool of actors.

Ray reads the files' bytes (local folders and files, or object-store URIs where the filesystem is installed); each actor opens one runtime from the artifact (its files hash-checked on that worker) and
decodes and transforms the images itself with the artifact's own preprocessing (``read_images(size=...)`` only
resizes and would skip the centre crop). A file that cannot be decoded is a row with its error, never a failed
job. Output: Parquet with the path, the top-k class indices, labels and probabilities, and the error.
"""
from __future__ import annotations

import os
from pathlib import Path

from .backends import open_artifact
from .env import require
from .predict import Predictor
from .preprocess import DEFAULT_MAX_PIXELS, IMAGE_SUFFIXES, expand_inputs

COLUMNS = ("path", "ok", "error", "indices", "labels", "probs")


def result_schema():
    """The Parquet schema of the results (pyarrow is imported only when Ray runs)."""
    import pyarrow as pa

    return pa.schema([("path", pa.string()), ("ok", pa.bool_()), ("error", pa.string()),
                      ("indices", pa.list_(pa.int64())), ("labels", pa.list_(pa.string())),
                      ("probs", pa.list_(pa.float64()))])


class PredictActor:
    """One runtime per actor, opened from the artifact; Ray calls it with batches of {"path", "bytes"}."""

    def __init__(self, artifact: str, topk: int, threads: int, max_pixels: int):
        self.predictor = Predictor(artifact, threads=threads)
        self.topk, self.max_pixels = topk, max_pixels

    def __call__(self, batch: dict):
        import pyarrow as pa

        items = [(str(p), bytes(b)) for p, b in zip(batch["path"], batch["bytes"])]
        rows = self.predictor.predict_items(items, self.topk, self.max_pixels)
        columns = {"path": [r.path for r in rows], "ok": [r.ok for r in rows], "error": [r.error or "" for r in rows],
                   "indices": [[t["index"] for t in r.topk] for r in rows],
                   "labels": [[t["label"] for t in r.topk] for r in rows],
                   "probs": [[t["prob"] for t in r.topk] for r in rows]}
        # an explicit schema: a batch of only bad images must not write list<null> columns beside list<int64> ones
        return pa.Table.from_pydict(columns, schema=result_schema())


def ray_sources(sources: list[str]) -> list[str]:
    """What Ray reads: local folders expand to their image files (the same list ``predict`` takes, sorted), local
    files by absolute path; URIs pass through. A local path that does not exist is refused here (Ray would fail
    the whole job on it)."""
    out: list[str] = []
    for s in sources:
        if "://" in s:
            out.append(s)
        elif Path(s).is_dir():
            out.extend(str(p.resolve()) for p in expand_inputs([s]))
        elif Path(s).exists():
            out.append(str(Path(s).resolve()))
        else:
            raise ValueError(f"{s}: no such file or folder (Ray reads local paths, and URIs such as s3://bucket/prefix)")
    if not out:
        raise ValueError(f"no image files ({', '.join(sorted(IMAGE_SUFFIXES))}) under {', '.join(sources)}")
    return out


def connect(address: str | None, actors: int):
    """Join the cluster at ``address``, or start a local Ray with room for its own read tasks: an actor pool
    that takes every CPU starves them and the job hangs (2 CPUs with 2 one-CPU actors deadlocked here; the
    local instance declares at least actors + 2 logical CPUs)."""
    ray = require("ray", "--ray", "ray")
    if ray.is_initialized():
        return ray
    if address:
        ray.init(address=address, include_dashboard=False, log_to_driver=False)
    else:
        ray.init(num_cpus=max(os.cpu_count() or 1, actors + 2), include_dashboard=False, log_to_driver=False)
    return ray


def predict_on_ray(artifact, sources: list[str], output, actors: int = 1, batch: int = 32, topk: int = 5,
                   threads: int = 1, address: str | None = None, max_pixels: int = DEFAULT_MAX_PIXELS) -> dict:
    """Classify every image under ``sources`` on Ray with ``actors`` actors, writing Parquet into ``output``.
    Returns {"rows", "failed", "output"}. ``artifact`` must be readable at the same path on every worker."""
    manifest, folder, _, _ = open_artifact(Path(artifact).resolve())  # here first: a bad artifact is one line before any worker starts
    require_dynamic_batch(manifest, "predict --ray")
    paths = ray_sources([str(s) for s in sources])
    ray = connect(address, actors)
    ds = ray.data.read_binary_files(paths, include_paths=True)
    predicted = ds.map_batches(PredictActor, fn_constructor_kwargs={"artifact": str(folder), "topk": topk,
                                                                    "threads": threads, "max_pixels": max_pixels},
                               batch_size=batch, batch_format="numpy", num_cpus=1,
                               compute=ray.data.ActorPoolStrategy(size=actors))
    output = Path(output)
    from ray.data import SaveMode
    predicted.write_parquet(str(output), mode=SaveMode.OVERWRITE)  # a rerun replaces, never adds to, the results
    table = read_results(output)
    return {"rows": len(table["path"]), "failed": sum(not ok for ok in table["ok"]), "output": str(output)}


def require_dynamic_batch(manifest: dict, purpose: str) -> None:
    """Ray's batches and Serve's end up any size: a fixed-batch artifact would refuse most of them."""
    batch = manifest["input"]["shape"][0]
    if isinstance(batch, int):
        raise ValueError(f"{purpose} needs an artifact with a dynamic batch; this one was exported for a fixed batch "
                         f"of {batch}: re-export with --batch dynamic")


def read_results(output) -> dict[str, list]:
    """The Parquet rows written by ``predict_on_ray`` as columns of Python values."""
    pq = require("pyarrow.parquet", "reading --ray results", "ray")
    table = pq.read_table(str(output))
    return {name: table.column(name).to_pylist() for name in COLUMNS}
