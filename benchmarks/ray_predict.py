"""images/s of `predict --ray` with 1 and 2 actors beside plain `predict`, on the same folder and artifact.

    python benchmarks/ray_predict.py ARTIFACT_FOLDER [--images N] [--repeats R]

Writes N real-photo crops (scikit-image, as the tests do) into a temporary folder, then times, end to end
(decoding, preprocessing, inference, writing the results): plain `Predictor.predict` (one process, runtime
threads 1) and `predict_on_ray` with 1 and 2 actors (one thread each) on a local Ray started once with 4
logical CPUs. Ray's start-up is not timed; its per-job overhead (actor start, runtime open) is.
Reports the median of R runs per case.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("artifact")
    parser.add_argument("--images", type=int, default=400)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    import ray

    from levit_deploy.predict import Predictor
    from levit_deploy.preprocess import expand_inputs
    from levit_deploy.ray_predict import predict_on_ray
    from real_photos import GATE_PHOTOS, OTHER_PHOTOS, photo_crops, write_images

    with tempfile.TemporaryDirectory() as tmp:
        names = OTHER_PHOTOS + GATE_PHOTOS
        folder = write_images(Path(tmp) / "images", photo_crops(names, -(-args.images // len(names)), seed=9)
                              [:args.images])
        paths = list(expand_inputs([folder]))

        def plain() -> None:
            predictor = Predictor(args.artifact, threads=1)
            try:
                rows = list(predictor.predict(paths, batch=32))
            finally:
                predictor.close()
            assert len(rows) == len(paths)

        def on_ray(actors: int):
            def run() -> None:
                out = Path(tmp) / f"out-{actors}-{time.perf_counter_ns()}"
                summary = predict_on_ray(args.artifact, [str(folder)], out, actors=actors, batch=32)
                assert summary["rows"] == len(paths)
            return run

        ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
        try:
            cases = {"predict (1 process)": plain, "predict --ray, 1 actor": on_ray(1),
                     "predict --ray, 2 actors": on_ray(2)}
            times: dict[str, list[float]] = {k: [] for k in cases}
            for _ in range(args.repeats):  # interleaved rounds
                for name, fn in cases.items():
                    start = time.perf_counter()
                    fn()
                    times[name].append(time.perf_counter() - start)
        finally:
            ray.shutdown()
    base = len(paths) / statistics.median(times["predict (1 process)"])
    print(f"{len(paths)} images, artifact {args.artifact}, median of {args.repeats}")
    print(f"{'case':<26}{'img/s':>8}{'vs predict':>12}")
    for name, ts in times.items():
        rate = len(paths) / statistics.median(ts)
        print(f"{name:<26}{rate:8.1f}{rate / base:11.2f}x")


if __name__ == "__main__":
    main()
