"""bench: the protocol's bookkeeping, the side-by-side table, cold starts, baselines, sweep, plot and Ctrl-C."""
import dataclasses
import json
import math

import pytest
from typer.testing import CliRunner

import levit_deploy as ld
from levit_deploy import bench
from levit_deploy.bench import BenchResult, format_table
from levit_deploy.cli import app
from levit_deploy.reference import build_reference_set

runner = CliRunner()
FAST = ["--duration", "0.6", "--warmup", "0.2", "--no-cold-start"]


def test_percentiles():
    stats = bench.percentiles([0.1] * 10 + [0.2] * 10, batch=16)
    assert stats["p50_ms"] == pytest.approx(150.0) and stats["images_per_s"] == pytest.approx(16 / 0.15)
    assert stats["p99_ms"] == pytest.approx(200.0) and stats["calls"] == 20


def test_largest_power_of_two_batch():
    assert bench.largest_power_of_two_batch(lambda b: b <= 300) == 256
    with pytest.raises(RuntimeError, match="not even batch 1"):
        bench.largest_power_of_two_batch(lambda b: False)


def test_side_by_side_table_and_json():
    result = runner.invoke(app, ["bench", "levit_128s", "--init", "random", "-r", "torch", "-r", "ort", "--batch",
                                 "2", "--duration", "0.6", "--warmup", "0.2", "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    labels = [r["label"] for r in doc["results"]]
    assert labels == ["torch unfused (eager)", "torch fused (eager)", "ort plain export (unfused)", "ort levit-deploy"]
    for r in doc["results"]:
        assert r["status"] == "ok" and r["images_per_s"] > 0 and r["p50_ms"] <= r["p99_ms"]
        assert r["parity_passed"] and r["parity_margin"] <= 1 and r["calls"] >= 3
        assert r["images_per_s_ci"][0] <= r["images_per_s"] <= r["images_per_s_ci"][1]
        assert len(r["round_ms"]) >= 1 and r["cold_error"] is None
        # each case reopened in a fresh process: its own open + first batch, and memory above the bare imports
        assert r["cold_start_ms"] == pytest.approx(r["open_ms"] + r["first_ms"]) and r["first_ms"] > 0
        assert r["peak_rss_mb"] > r["base_rss_mb"] > 50
    assert doc["results"][0]["speedup"] == pytest.approx(1.0)
    assert doc["protocol"]["threads"] == 1 and doc["protocol"]["batch"] == 2
    assert doc["machine"]["cpu"]["model"] and doc["results"][3]["size_mb"] > 1
    assert doc["results"][3]["info"]["threads"] == 1 and doc["results"][3]["info"]["graph_optimization"] == "all"
    text = runner.invoke(app, ["bench", "levit_128s", "--init", "random", "-r", "torch", "--batch", "1", *FAST])
    assert "speed-up" in text.output and "✅ ok" in text.output


@pytest.mark.slow
def test_bench_of_two_families_side_by_side_on_trained_like_artifacts(artifacts):
    """One JSON document per model, in the order given: what `bench lightvit_tiny levit_128s` measures (the
    shared table's layout is checked on format_table below)."""
    folders = [str(artifacts(v, "onnx").folder) for v in ("lightvit_tiny", "levit_128s")]
    result = runner.invoke(app, ["bench", *folders, "--batch", "1", *FAST, "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert [d["model"] for d in doc] == ["lightvit_tiny", "levit_128s"]
    assert all(r["status"] == "ok" and r["parity_passed"] for d in doc for r in d["results"])
    fields = {f.name for f in dataclasses.fields(BenchResult)}
    results = [BenchResult(**{k: v for k, v in r.items() if k in fields}) for d in doc for r in d["results"]]
    table = [line for line in format_table(results, [d["model"] for d in doc for _ in d["results"]]).splitlines()
             if "artifact " in line]
    assert [line.split()[0] for line in table] == ["lightvit_tiny", "levit_128s"]


def test_sweep_and_plot(tmp_path):
    pytest.importorskip("matplotlib")
    png = tmp_path / "sweep.png"
    result = runner.invoke(app, ["bench", "levit_128s", "--init", "random", "-r", "torch", "--batch", "1", "--sweep",
                                 "--max-batch", "4", "--plot", str(png), *FAST, "--json"])
    assert result.exit_code == 0, result.output
    sweeps = [r["sweep"] for r in json.loads(result.stdout)["results"]]
    assert all(sorted(map(int, s)) == [1, 2, 4] for s in sweeps)
    assert png.stat().st_size > 10_000 and png.read_bytes()[:4] == b"\x89PNG"


def test_ctrl_c_keeps_what_was_measured(monkeypatch):
    model = ld.load("levit_128s", init="random")
    calls = {"n": 0}

    class Flaky:
        name, precision = "fake", "fp32"

        def __init__(self):
            self.inner = ld.open_runtime(ld.fuse(model), "torch")

        def infer(self, x):
            calls["n"] += 1
            if calls["n"] > 12:
                raise KeyboardInterrupt
            return self.inner.infer(x)

        def info(self):
            return {}

        def close(self):
            pass
    protocol = bench.Protocol(batch=1, warmup_s=0.0, duration_s=60, round_calls=2)
    cases = [bench.BenchCase("flaky", Flaky, "fake")]
    results, interrupted = bench.run_cases(cases, None, protocol)
    assert interrupted and results[0].calls > 0 and results[0].images_per_s > 0


def test_a_failing_case_does_not_stop_the_others():
    model = ld.load("levit_128s", init="random")

    def broken():
        raise RuntimeError("backend exploded")
    cases = [bench.BenchCase("broken", broken, "x"),
             bench.BenchCase("torch", lambda: ld.open_runtime(model, "torch"), "torch")]
    reference = build_reference_set(model, photos=False, noise=2, synthetic=0)
    results, _ = bench.run_cases(cases, reference, bench.Protocol(batch=1, warmup_s=0, duration_s=0.3))
    assert results[0].status == "error" and "backend exploded" in results[0].error
    assert results[1].status == "ok" and results[1].images_per_s > 0
    assert "backend exploded" in bench.format_table(results)


def test_cuda_without_gpu_is_one_clear_line():
    import torch
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    result = runner.invoke(app, ["bench", "levit_128s", "--init", "random", "--device", "cuda", *FAST])
    assert result.exit_code == 2 and "PyTorch sees no CUDA GPU" in result.output


def rounds_of(runtime_opener, threads: int, seconds: float = 2.5) -> dict:
    protocol = bench.Protocol(threads=threads, batch=16, warmup_s=0.5, duration_s=seconds, cold_start=False)
    results, _ = bench.run_cases([bench.BenchCase("ort plain", runtime_opener(threads), "ort")], None, protocol)
    return bench.report_document(results, protocol, False, "levit_128s")


@pytest.mark.slow  # with the next line: `make test-all` runs it after the parallel part, on an idle machine
@pytest.mark.alone  # timings compared across runs
def test_a_baseline_tells_a_rerun_from_a_real_speed_up(tmp_path):
    from levit_deploy.backends.onnx import write_plain
    path = write_plain(ld.load("levit_128s", init="random"), tmp_path / "plain")
    opener = lambda threads: lambda: ld.open_runtime(path, None, "cpu", threads)  # noqa: E731
    base_file = tmp_path / "base.json"
    base_file.write_text(json.dumps(rounds_of(opener, 1)))
    earlier = bench.read_baseline(base_file)
    same, rerun, faster = json.loads(base_file.read_text()), rounds_of(opener, 1), rounds_of(opener, 2)
    for doc in (same, rerun, faster):
        bench.compare_with_baseline(doc, earlier, str(base_file))
        assert doc["baseline"]["matched"] == 1
    assert same["results"][0]["vs_baseline"]["verdict"] == "not significantly different"
    assert same["results"][0]["vs_baseline"]["ratio"] == 1 and same["results"][0]["vs_baseline"]["p_value"] == 1
    # a rerun drifts (0.93-1.01x here, see timing_stats), far less than a second thread speeds the case up
    rerun_ratio, faster_ratio = rerun["results"][0]["vs_baseline"]["ratio"], faster["results"][0]["vs_baseline"]["ratio"]
    assert abs(math.log(rerun_ratio)) < abs(math.log(faster_ratio)) / 2, (rerun_ratio, faster_ratio)
    assert faster["results"][0]["vs_baseline"]["verdict"] == "significantly faster", faster["results"][0]
    assert faster["results"][0]["vs_baseline"]["significant"] and faster["results"][0]["vs_baseline"]["ratio"] > 1
    result = BenchResult(**faster["results"][0])
    assert "significantly faster" in format_table([result]) and "p = " in format_table([result])


@pytest.mark.parametrize("content,expected", [
    ("not json", "cannot read it as JSON"),
    ('{"results": [{"label": "x"}]}', "expected the output of `levit-deploy bench --json`"),
    ('{"model": "levit_128s", "results": [{"label": "x"}]}', "no case in it has per-round times"),
])
def test_a_baseline_that_is_not_a_bench_run_is_one_line_before_anything_runs(tmp_path, content, expected):
    path = tmp_path / "baseline.json"
    path.write_text(content)
    result = runner.invoke(app, ["bench", "levit_128s", "--init", "random", "-r", "ort", *FAST, "--baseline",
                                 str(path)])
    assert result.exit_code == 2 and expected in result.output and "Traceback" not in result.output
    assert "img/s" not in result.output  # refused before measuring


def test_a_cold_start_probe_that_fails_leaves_the_timing_and_says_why(tmp_path):
    model = ld.load("levit_128s", init="random")
    missing = tmp_path / "gone.onnx"
    case = bench.BenchCase("torch", lambda: ld.open_runtime(model, "torch"), "torch",
                           cold={"artifact": str(missing)})
    results, _ = bench.run_cases([case], None, bench.Protocol(batch=1, warmup_s=0, duration_s=0.2))
    assert results[0].status == "ok" and results[0].images_per_s > 0 and results[0].cold_start_ms is None
    assert "gone.onnx" in results[0].cold_error and "no cold start" in bench.format_table(results)
