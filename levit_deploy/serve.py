"""Online serving on Ray Serve: POST an image's bytes (JPEG, PNG, WebP, ...) to ``/``, get its top-k classes as JSON.

Each replica holds one runtime opened from the artifact (hash-checked). Requests are decoded as they arrive, so
an undecodable image is answered 400 on its own and never enters a batch; decoded images are grouped by
``serve.batch`` (up to ``max_batch``, waiting at most ``batch_wait_ms`` to fill one) and inferred together off
the event loop. ``GET /healthz`` answers the model and the batch sizes served so far (also logged). Bodies
larger than ``max_bytes`` are refused with 413 before they are read whole.

Under abuse and load: a body that is not all there ``body_timeout_s`` after the replica starts reading it (a
declared Content-Length larger than what is sent, a client that stalls) is answered 408 and its connection
closed, so it holds a replica slot for at most that long. Each replica takes ``4 * max_batch`` requests at once
(``max_ongoing_requests``); beyond that, up to ``max_queued`` wait at the proxy and the next are answered 503 by
Ray Serve itself (``max_queued_requests``) instead of queueing without bound. Malformed HTTP (a non-numeric
Content-Length, ...) is answered 400 by the proxy's HTTP server before it reaches a replica. Not covered: a client
that stalls inside its request headers is held by the proxy's HTTP server (uvicorn has no header timeout; put a
reverse proxy in front of a public endpoint).
"""
from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import Counter
from pathlib import Path

from .artifacts import read_manifest, verify_artifact
from .env import require
from .predict import Predictor
from .preprocess import DEFAULT_MAX_PIXELS
from .ray_predict import connect, require_dynamic_batch

MAX_BYTES = 20 * 1024 * 1024
BODY_TIMEOUT_S = 10.0  # for the whole body: 20 MB at 2 MB/s; a slower client raises --body-timeout
MAX_QUEUED = 128  # requests waiting at the proxy beyond the replicas' max_ongoing_requests (-1: no limit)
APP = "levit-deploy"  # the Serve application's name: `serve.delete(APP)` stops it and nothing else
logger = logging.getLogger("ray.serve")


class Classifier:
    """The replica: one Predictor, a batcher, and the two routes."""

    def __init__(self, artifact: str, topk: int, threads: int, max_batch: int, batch_wait_ms: float, max_bytes: int,
                 body_timeout_s: float = BODY_TIMEOUT_S):
        self.predictor = Predictor(artifact, threads=threads)
        self.topk, self.max_bytes, self.body_timeout_s = topk, max_bytes, body_timeout_s
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
        if isinstance(body, int):
            error = {413: f"request body over {self.max_bytes} bytes",
                     408: f"request body not received within {self.body_timeout_s:g} s",
                     400: "client disconnected before its body was received"}[body]
            # 408: the rest of that body may still come; closing the connection keeps it from being read as a request
            return JSONResponse({"ok": False, "error": error}, status_code=body,
                                headers={"Connection": "close"} if body == 408 else None)
        name = request.query_params.get("name", "request")
        _, x, error = await asyncio.to_thread(self.predictor.prepare, name, body, DEFAULT_MAX_PIXELS)
        if x is None:
            return JSONResponse({"ok": False, "error": error}, status_code=400)
        return JSONResponse({"ok": True, "topk": await self.infer_batch((name, x))})

    async def _bounded_body(self, request) -> bytes | int:
        """The body, or the status that refuses it: 413 over ``max_bytes``, 408 not all there within
        ``body_timeout_s``, 400 when the client went away."""
        from starlette.requests import ClientDisconnect

        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            return 413

        async def read() -> bytes | int:
            chunks, size = [], 0
            async for chunk in request.stream():
                size += len(chunk)
                if size > self.max_bytes:
                    return 413
                chunks.append(chunk)
            return b"".join(chunks)

        try:
            return await asyncio.wait_for(read(), self.body_timeout_s)
        except asyncio.TimeoutError:
            return 408
        except ClientDisconnect:
            return 400

    async def infer_batch(self, items: list[tuple[str, object]]) -> list[list[dict]]:
        self.batch_sizes[len(items)] += 1
        logger.info("levit-deploy: batch of %d", len(items))
        predictions = await asyncio.to_thread(lambda: list(self.predictor.classify(
            [(name, x, None) for name, x in items], self.topk)))
        return [p.topk for p in predictions]


def deployment(artifact, replicas: int = 1, max_batch: int = 16, batch_wait_ms: float = 10.0, topk: int = 5,
               threads: int = 1, max_bytes: int = MAX_BYTES, body_timeout_s: float = BODY_TIMEOUT_S,
               max_queued: int = MAX_QUEUED):
    """The bound Ray Serve application for ``artifact`` (a folder with its manifest)."""
    serve = require("ray.serve", "serving", "ray")
    manifest, folder = read_manifest(Path(artifact).resolve())
    verify_artifact(manifest, folder)  # a bad artifact is one line here, before any replica starts
    require_dynamic_batch(manifest, "serve")
    if replicas < 1 or max_batch < 1 or batch_wait_ms < 0 or max_bytes < 1 or not body_timeout_s > 0:
        raise ValueError("replicas, max_batch, max_bytes and body_timeout_s must be positive and batch_wait_ms "
                         "not negative")
    if max_queued < 1 and max_queued != -1:
        raise ValueError("max_queued must be positive, or -1 for no limit")
    batched = type("Classifier", (Classifier,), {"infer_batch": serve.batch(Classifier.infer_batch)})
    app = serve.deployment(batched, name=APP, num_replicas=replicas,
                           ray_actor_options={"num_cpus": 1}, max_ongoing_requests=4 * max_batch,
                           max_queued_requests=max_queued)  # a full queue: 503 from Serve's proxy
    return app.bind(str(folder), topk, threads, max_batch, batch_wait_ms, max_bytes, body_timeout_s)


def start(artifact, host: str = "127.0.0.1", port: int = 8000, replicas: int = 1, max_batch: int = 16,
          batch_wait_ms: float = 10.0, topk: int = 5, threads: int = 1, max_bytes: int = MAX_BYTES,
          address: str | None = None, body_timeout_s: float = BODY_TIMEOUT_S, max_queued: int = MAX_QUEUED) -> str:
    """Start (or join) Ray, run the application on ``host:port``; returns its URL. ``serve.delete(APP)`` stops it."""
    app = deployment(artifact, replicas, max_batch, batch_wait_ms, topk, threads, max_bytes, body_timeout_s,
                     max_queued)
    connect(address, replicas)
    serve = require("ray.serve", "serving", "ray")
    # an idle connection, or one whose unread body follows a 503 or 413, is closed after body_timeout_s (not Ray's 90 s)
    serve.start(http_options={"host": host, "port": port, "keep_alive_timeout_s": max(5, math.ceil(body_timeout_s))})
    serve.run(app, name=APP, route_prefix="/", blocking=False)
    return f"http://{host}:{port}/"


def run_until_interrupted(address: str | None = None) -> None:
    """Block until Ctrl-C, then delete only our Serve application (a shared cluster's other Serve apps keep
    running), and shut Serve down when it runs on the local Ray that start() began."""
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        serve = require("ray.serve", "serving", "ray")
        serve.delete(APP)
        if address is None:
            serve.shutdown()
