"""Online serving on Ray Serve: POST an image's bytes (JPEG, PNG, WebP, ...) to ``/``, get its top-k classes as JSON.

Each replica holds one runtime opened from the artifact (hash-checked). Requests are decoded as they arrive, so
an undecodable image is answered 400 on its own and never enters a batch; decoded images are grouped by
``serve.batch`` (up to ``max_batch``, waiting at most ``batch_wait_ms`` to fill one) and inferred together off
the event loop. ``GET /healthz`` answers the model and the batch sizes served so far (also logged). Bodies
larger than ``max_bytes`` are refused with 413 before they are read whole.
"""
from __future__ import annotations

import asyncio
import logging
from collections import Counter
from pathlib import Path

from .env import require
from .preprocess import DEFAULT_MAX_PIXELS

MAX_BYTES = 20 * 1024 * 1024
APP = "levit-deploy"  # the Serve application's name: `serve.delete(APP)` stops it and nothing else
logger = logging.getLogger("ray.serve")


class Classifier:
    """The replica: one Predictor, a batcher, and the two routes."""

    def __init__(self, artifact: str, topk: int, threads: int, max_batch: int, batch_wait_ms: float, max_bytes: int):
        from .predict import Predictor

        self.predictor = Predictor(artifact, threads=threads)
        self.topk, self.max_bytes = topk, max_bytes
        self.batch_sizes: Counter = Counter()
        self.infer_batch.set_max_batch_size(max_batch)
        self.infer_batch.set_batch_wait_timeout_s(batch_wait_ms / 1000)

    async def __call__(self, request):
        from starlette.responses import JSONResponse

        if request.method == "GET" and request.url.path.rstrip("/").endswith("healthz"):
            return JSONResponse({"ok": True, "model": self.predictor.description,
                                 "batch_sizes": {str(k): v for k, v in sorted(self.batch_sizes.items())}})
        if request.method != "POST":
            return JSONResponse({"ok": False, "error": "POST an image's bytes, or GET /healthz"}, status_code=405)
        body = await self._bounded_body(request)
        if body is None:
            return JSONResponse({"ok": False, "error": f"request body over {self.max_bytes} bytes"}, status_code=413)
        name = request.query_params.get("name", "request")
        _, x, error = await asyncio.to_thread(self.predictor.prepare, name, body, DEFAULT_MAX_PIXELS)
        if x is None:
            return JSONResponse({"ok": False, "error": error}, status_code=400)
        return JSONResponse({"ok": True, "topk": await self.infer_batch((name, x))})

    async def _bounded_body(self, request) -> bytes | None:
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            return None
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > self.max_bytes:
                return None
            chunks.append(chunk)
        return b"".join(chunks)

    async def infer_batch(self, items: list[tuple[str, object]]) -> list[list[dict]]:
        self.batch_sizes[len(items)] += 1
        logger.info("levit-deploy: batch of %d", len(items))
        predictions = await asyncio.to_thread(lambda: list(self.predictor.classify(
            [(name, x, None) for name, x in items], self.topk)))
        return [p.topk for p in predictions]


def deployment(artifact, replicas: int = 1, max_batch: int = 16, batch_wait_ms: float = 10.0, topk: int = 5,
               threads: int = 1, max_bytes: int = MAX_BYTES):
    """The bound Ray Serve application for ``artifact`` (a folder with its manifest)."""
    serve = require("ray.serve", "serving", "ray")
    from .artifacts import read_manifest, verify_artifact

    from .ray_predict import require_dynamic_batch

    manifest, folder = read_manifest(Path(artifact).resolve())
    verify_artifact(manifest, folder)  # a bad artifact is one line here, before any replica starts
    require_dynamic_batch(manifest, "serve")
    if replicas < 1 or max_batch < 1 or batch_wait_ms < 0 or max_bytes < 1:
        raise ValueError("replicas, max_batch and max_bytes must be positive and batch_wait_ms not negative")
    batched = type("Classifier", (Classifier,), {"infer_batch": serve.batch(Classifier.infer_batch)})
    app = serve.deployment(batched, name=APP, num_replicas=replicas,
                           ray_actor_options={"num_cpus": 1}, max_ongoing_requests=4 * max_batch)
    return app.bind(str(folder), topk, threads, max_batch, batch_wait_ms, max_bytes)


def start(artifact, host: str = "127.0.0.1", port: int = 8000, replicas: int = 1, max_batch: int = 16,
          batch_wait_ms: float = 10.0, topk: int = 5, threads: int = 1, max_bytes: int = MAX_BYTES,
          address: str | None = None) -> str:
    """Start (or join) Ray, run the application on ``host:port``; returns its URL. ``serve.delete(APP)`` stops it."""
    from .ray_predict import connect

    app = deployment(artifact, replicas, max_batch, batch_wait_ms, topk, threads, max_bytes)
    connect(address, replicas)
    serve = require("ray.serve", "serving", "ray")
    serve.start(http_options={"host": host, "port": port})
    serve.run(app, name=APP, route_prefix="/", blocking=False)
    return f"http://{host}:{port}/"
