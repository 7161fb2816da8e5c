"""The command line: ``fastaccum bench`` (training workload) and ``fastaccum bench-ops``
(op micro-benchmark), run end to end on small settings."""

import json
import math
import subprocess
import sys

import pytest
import torch

from fastaccum.bench.runs import FP32_TOLERANCE
from fastaccum.cli import main

RUNS = ["native-large-batch", "native-accum", "fastaccum-wrap", "fastaccum-fused", "fastaccum-act8"]
EXACT = RUNS[:4]  # fastaccum-act8 keeps 8-bit activations: close, not exact
SMALL = ["--steps", "3", "--micro-batch", "2", "--accum-steps", "3", "--no-progress"]
# One thread: on a busy 2-core machine, two threads per op contend with other processes.
ONE_THREAD = ["--threads", "1"]


@pytest.fixture
def one_thread():
    """torch on one thread for the test, restored after (see ONE_THREAD)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def table_rows(out: str) -> dict[str, list[str]]:
    """The rows of the printed bench table, by run name."""
    return {
        line.split()[0]: line.split()
        for line in out.splitlines()
        if line.split()[:1] in ([r] for r in RUNS)
    }


@pytest.fixture(scope="module")
def bench_out(tmp_path_factory):
    """One small default-workload bench (stdlib text), shared by the assertions below."""
    out = tmp_path_factory.mktemp("bench")
    proc = subprocess.run(
        [sys.executable, "-m", "fastaccum", "bench", *SMALL, *ONE_THREAD, "--out", str(out)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    return out, proc.stdout


def test_bench_prints_every_run(bench_out):
    out_dir, stdout = bench_out
    rows = table_rows(stdout)
    assert list(rows) == RUNS
    for name, row in rows.items():
        ms, tokens_per_s, speedup, peak, loss, dev = row[1:7]
        assert float(ms) > 0 and float(tokens_per_s.replace(",", "")) > 0, name
        assert speedup.endswith("x") and float(speedup[:-1]) > 0
        assert math.isfinite(float(loss))
        assert float(dev) >= 0 and (peak == "-" or float(peak) >= 0)
    assert "3 x 2 sequences" in stdout and "standard library" in stdout
    assert "fp32 check" in stdout and "PASS" in stdout
    assert "gradient noise scale (opt.stats(), in micro-batches): fastaccum-wrap" in stdout
    noise = stdout.split("gradient noise scale")[1].splitlines()[0]
    assert "fastaccum-fused" in noise
    # the fused-wgrad runs are named as estimating from first micro-batches; wrap is not
    assert "fastaccum-fused and fastaccum-act8 estimate their fused layers" in noise
    assert str(out_dir / "bench.json") in stdout


def test_bench_json_matches_reference(bench_out):
    out_dir, _ = bench_out
    report = json.loads((out_dir / "bench.json").read_text())
    runs = {r["name"]: r for r in report["runs"]}
    assert list(runs) == RUNS
    assert report["reference"] == "native-large-batch"
    assert report["tokens_per_step"] == 3 * 2 * 64  # K x b x context of the tiny model
    assert report["config"]["dtype"] == "fp32" and report["fp32_check"] is True
    first = runs["native-large-batch"]["losses"][0]
    assert first == pytest.approx(math.log(256), abs=0.5)  # untrained: near uniform over bytes
    for name, r in runs.items():
        assert r["status"] == "ok" and len(r["losses"]) == 3 and len(r["step_ms"]) == 3
        # same initial weights and batches: the first window's loss agrees everywhere
        assert r["losses"][0] == pytest.approx(
            first, rel=1e-3 if name == "fastaccum-act8" else 1e-5
        )
        assert r["losses"][-1] < r["losses"][0], name  # it trains
        assert r["exact"] == (name in EXACT)
        if r["exact"]:
            assert r["max_abs_param_deviation"] <= FP32_TOLERANCE, name
        assert r["tokens_per_s"] == pytest.approx(
            report["tokens_per_step"] / r["ms_per_step"] * 1e3
        )
        assert r["peak_memory_bytes"] > 0
    assert runs["native-accum"]["speedup_vs_native_accum"] == pytest.approx(1.0)
    # 8-bit activations change the gradients measurably, and the loss hardly
    act8 = runs["fastaccum-act8"]
    assert FP32_TOLERANCE < act8["max_abs_param_deviation"] < math.inf
    assert act8["final_loss"] == pytest.approx(runs["native-large-batch"]["final_loss"], rel=1e-2)
    # a micro-batch of 2 sequences holds less than the large batch of 6 at its peak
    assert (
        runs["native-accum"]["peak_memory_bytes"] < runs["native-large-batch"]["peak_memory_bytes"]
    )
    assert report["memory_cap"] is None
    # opt.stats()'s noise scale: every window of fastaccum-wrap; the fused runs leave out
    # their first, where the tied output head tells the wrapper that the embedding is fused
    windows = {name: r["noise_scale_windows"] for name, r in runs.items()}
    assert windows == {
        "native-large-batch": 0,
        "native-accum": 0,
        "fastaccum-wrap": 3,
        "fastaccum-fused": 2,
        "fastaccum-act8": 2,
    }
    for name, r in runs.items():
        scale = r["noise_scale"]
        assert scale is None or (math.isfinite(scale) and scale >= 0), name
        assert r["noise_scale_units"] == (None if name.startswith("native") else "micro-batches")
        # every fastaccum run's AdamW update ran in the fused kernel (wrap: fused_update)
        assert r["fused_update"] == (None if name.startswith("native") else True)
    from fastaccum import _backend

    assert report["backends"] == _backend.backends_on("cpu")
    assert report["extension"] == _backend.extension_status()
    assert report["order"] == "interleaved"  # the CPU's default


def test_bench_writes_plot(bench_out):
    pytest.importorskip("matplotlib")
    png = (bench_out[0] / "bench.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def small_bench():
    """A 1-layer ByteGPT and its batches, for run_all at 2 x 2 micro-batches."""
    from fastaccum.bench.data import ByteBatches, load_bytes
    from fastaccum.workloads import ByteGPT

    torch.manual_seed(0)
    return ByteGPT(dim=32, heads=2, layers=1, ctx=16), ByteBatches(load_bytes(), 2, 2, 16, seed=0)


def test_deviation_catches_a_different_update(one_thread):
    """The deviation column is a real check: a run whose update differs (lr x 1.5) from
    the reference's is reported far above the fp32 tolerance."""
    from fastaccum.bench.runs import BenchConfig, TrainRun, bench_runs, run_all

    config = BenchConfig(micro_batch=2, accum_steps=2, steps=2)
    reference = bench_runs()[0]
    faster = TrainRun(
        "lr-x1.5",
        "the reference with a larger learning rate",
        lambda model, cfg: reference.prepare(model, BenchConfig(lr=cfg.lr * 1.5)),
    )
    model, batches = small_bench()
    results = list(run_all(config, model, batches, [reference, faster]))
    assert results[0].max_abs_deviation == 0.0
    assert results[1].max_abs_deviation > 10 * FP32_TOLERANCE


def test_interleaved_timing_trains_every_run_as_sequential_timing_does(one_thread):
    """Each run keeps its own model and optimizer when the runs are timed step by step in
    turn: losses, deviations and noise scales equal those of one run after another."""
    import dataclasses

    from fastaccum.bench.runs import BenchConfig, bench_runs, run_all

    model, batches = small_bench()
    results = {}
    for order in ("interleaved", "sequential"):
        config = BenchConfig(micro_batch=2, accum_steps=2, steps=3, order=order)
        results[order] = list(run_all(config, model, batches, bench_runs()))
    for a, b in zip(results["interleaved"], results["sequential"], strict=True):
        assert a.name == b.name and a.status == b.status == "ok"
        assert len(a.step_seconds) == 3
        same = ("losses", "max_abs_deviation", "noise_scale", "noise_scale_windows")
        assert {k: getattr(a, k) for k in same} == {k: getattr(b, k) for k in same}, a.name
        assert dataclasses.asdict(a).keys() == dataclasses.asdict(b).keys()
    assert results["interleaved"][1].max_abs_deviation < FP32_TOLERANCE  # native-accum


def test_interleaved_timing_drops_a_run_that_runs_out_of_memory(one_thread):
    """A run that raises torch.OutOfMemoryError in its second timed window is marked
    "oom" and leaves the rotation; the others finish, against the same reference."""
    from fastaccum.bench.runs import BenchConfig, TrainRun, bench_runs, run_all

    reference = bench_runs()[1]  # native-accum
    calls = {"n": 0}

    def prepare(model, cfg):
        step = reference.prepare(model, cfg)

        def failing(window):
            calls["n"] += 1
            if calls["n"] == 4:  # after the two probe windows and one timed window
                raise torch.OutOfMemoryError("out of memory (test)")
            return step(window)

        return failing

    flaky = TrainRun("flaky", "native-accum that runs out of memory", prepare)
    model, batches = small_bench()
    config = BenchConfig(micro_batch=2, accum_steps=2, steps=3, order="interleaved")
    done = list(run_all(config, model, batches, [reference, flaky, bench_runs()[2]]))
    assert [r.status for r in done] == ["ok", "oom", "ok"]
    assert len(done[1].step_seconds) == 1 and done[1].max_abs_deviation is None
    assert len(done[0].step_seconds) == len(done[2].step_seconds) == 3
    assert done[0].max_abs_deviation == 0.0 and done[2].max_abs_deviation < FP32_TOLERANCE


def test_bench_trains_on_a_given_file(tmp_path, capsys):
    text = tmp_path / "text.txt"
    text.write_bytes(b"the quick brown fox jumps over the lazy dog. " * 40)
    args = ["bench", *ONE_THREAD, "--steps", "1", "--micro-batch", "1", "--accum-steps", "2"]
    assert main([*args, "--no-progress", "--data", str(text), "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert str(text) in out and list(table_rows(out)) == RUNS
    assert json.loads((tmp_path / "bench.json").read_text())["fp32_check"] is True


def test_bench_says_when_fastaccum_ran_without_its_kernels(tmp_path, capsys, monkeypatch):
    """With the ops forced onto their PyTorch reference, the bench still trains exactly,
    and says that its fastaccum timings understate fastaccum."""
    monkeypatch.setenv("FASTACCUM_BACKEND", "reference")
    args = ["bench", *ONE_THREAD, "--steps", "1", "--micro-batch", "1", "--accum-steps", "2"]
    assert main([*args, "--no-progress", "--out", str(tmp_path)]) == 0
    err = capsys.readouterr().err  # where the bench prints its notes
    from fastaccum import _backend

    ops = len(_backend.OPS)
    assert f"note: {ops} of fastaccum's {ops} ops ran without their cpu kernels" in err
    assert "(accumulate_, finalize_, sumsq, ...: reference)" in err
    report = json.loads((tmp_path / "bench.json").read_text())
    assert set(report["backends"].values()) == {"reference"}
    assert report["fp32_check"] is True


def test_bench_compile_compiles_every_run_and_matches_the_reference(tmp_path, capsys):
    """--compile: every run goes through torch.compile (dynamo compiles frames; the CPU
    peak is left out, as its counter would keep the model eager), the exact runs still
    come within 1e-5 of the compiled large batch, and the lossy one still runs."""
    from torch._dynamo.utils import counters

    before = counters["frames"]["ok"]
    args = ["bench", *SMALL, *ONE_THREAD, "--compile", "--out", str(tmp_path)]
    assert main(args) == 0
    assert counters["frames"]["ok"] > before
    out = capsys.readouterr().out
    assert list(table_rows(out)) == RUNS and "torch.compile" in out
    report = json.loads((tmp_path / "bench.json").read_text())
    assert report["config"]["compile"] is True and report["fp32_check"] is True
    assert all(r["peak_memory_bytes"] is None for r in report["runs"])
    assert "not counted on the CPU under --compile" in report["peak_memory"]


def test_bench_memory_cap_plans_the_micro_batch(bench_out, tmp_path, capsys):
    """A cap between the peaks of micro-batch 2 and of the large batch of 6 (measured by
    the uncapped run): plan_batch must split the 6 sequences into micro-batches whose runs
    all stay under the cap, and the large batch is marked as over it."""
    uncapped = {r["name"]: r for r in json.loads((bench_out[0] / "bench.json").read_text())["runs"]}
    low = uncapped["native-accum"]["peak_memory_bytes"]
    high = uncapped["native-large-batch"]["peak_memory_bytes"]
    cap_gib = (low + high) / 2 / 2**30
    args = [*SMALL, *ONE_THREAD, "--steps", "1", "--memory-cap", repr(cap_gib)]
    assert main(["bench", *args, "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    report = json.loads((tmp_path / "bench.json").read_text())
    plan = report["memory_cap"]
    assert plan["target_batch"] == 6
    assert plan["micro_batch"] * plan["accum_steps"] == 6
    assert 1 <= plan["micro_batch"] <= plan["largest_micro_batch_that_fits"] < 6
    assert report["config"]["micro_batch"] == plan["micro_batch"]
    runs = {r["name"]: r for r in report["runs"]}
    assert runs["native-large-batch"]["peak_memory_bytes"] > cap_gib * 2**30
    for name in RUNS[1:]:
        assert runs[name]["peak_memory_bytes"] <= cap_gib * 2**30, name
    assert report["fp32_check"] is True  # same sequences, split differently
    assert table_rows(out)["native-large-batch"][4].endswith("*")
    assert "fastaccum.plan_batch found at most" in out


def test_bench_memory_cap_too_small_says_what_is_missing(tmp_path, capsys):
    assert main(["bench", *SMALL, "--memory-cap", "0.0001", "--out", str(tmp_path)]) == 2
    assert "micro-batch 1 does not fit" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--steps", "0"], "steps must be >= 1, got 0"),
        (["--micro-batch", "-1"], "micro-batch must be >= 1, got -1"),
        (["--memory-cap", "0"], "memory-cap must be > 0 GiB, got 0.0"),
        (["--device", "tpu"], "device must be cpu or cuda, got 'tpu'"),
        (["--threads", "0"], "--threads must be >= 1, got 0"),
        (["--data", "/nonexistent/file.txt"], "no such file"),
    ],
)
def test_bench_rejects_bad_settings(tmp_path, capsys, args, message):
    assert main(["bench", *args, "--out", str(tmp_path)]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "bench.json").exists()


def test_bench_rejects_text_shorter_than_a_sequence(tmp_path, capsys):
    short = tmp_path / "short.txt"
    short.write_bytes(b"x" * 10)
    assert main(["bench", "--data", str(short), "--out", str(tmp_path)]) == 2
    assert "holds 10 bytes but one sequence needs 65" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_bench_without_gpu_rejects_cuda(tmp_path, capsys):
    assert main(["bench", "--device", "cuda", "--out", str(tmp_path)]) == 2
    assert "no CUDA GPU is available" in capsys.readouterr().err


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_bench_on_gpu_matches_reference(tmp_path):
    assert main(["bench", *SMALL, "--device", "cuda", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "bench.json").read_text())
    assert report["fp32_check"] is True
    assert all(r["peak_memory_bytes"] > 0 for r in report["runs"])


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_bench_compile_on_gpu_matches_reference(tmp_path):
    assert main(["bench", *SMALL, "--device", "cuda", "--compile", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "bench.json").read_text())
    assert report["fp32_check"] is True
    assert all(r["peak_memory_bytes"] > 0 for r in report["runs"])


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_bench_memory_cap_on_gpu_is_restored(tmp_path):
    # A cap far below the large batch's need: the large batch must fail with OOM, the
    # reference then falls to native accumulation, and the cap is lifted afterwards.
    args = ["--model", "small", "--micro-batch", "1", "--accum-steps", "128", "--steps", "2"]
    assert (
        main(
            [
                "bench",
                *args,
                "--device",
                "cuda",
                "--memory-cap",
                "0.25",
                "--no-progress",
                "--out",
                str(tmp_path),
            ]
        )
        == 0
    )
    report = json.loads((tmp_path / "bench.json").read_text())
    runs = {r["name"]: r for r in report["runs"]}
    assert runs["native-large-batch"]["status"] == "oom"
    assert report["reference"] == "native-accum"
    assert runs["fastaccum-fused"]["status"] == "ok"
    big = torch.empty(int(0.5 * 2**30), dtype=torch.uint8, device="cuda")  # over the cap
    del big


def test_bench_ops_prints_native_and_fused_rows(capsys):
    argv = ["bench-ops", "--params", "tiny", "--repeats", "2", "--dtype", "bf16", "fp32"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    rows = [line.split() for line in out.splitlines() if line.startswith(("bf16", "fp32"))]
    assert [(r[0], r[1]) for r in rows] == [
        ("bf16", "native"),
        ("bf16", "fastaccum"),
        ("fp32", "native"),
        ("fp32", "fastaccum"),
    ]
    for r in rows:
        assert float(r[3]) > 0  # ms per micro-step
        assert r[4].endswith("x") and float(r[4][:-1]) > 0
    assert "889,984 parameters in 40 tensors" in out


def test_bench_ops_rejects_bad_repeats(capsys):
    assert main(["bench-ops", "--repeats", "0"]) == 2
    assert "--repeats must be >= 1, got 0" in capsys.readouterr().err


def test_bench_ops_rejects_unknown_param_set():
    with pytest.raises(SystemExit) as exc:
        main(["bench-ops", "--params", "huge"])
    assert exc.value.code == 2


def test_bench_rejects_unknown_model():
    with pytest.raises(SystemExit) as exc:
        main(["bench", "--model", "huge"])
    assert exc.value.code == 2


def test_bench_help_lists_the_flags(capsys):
    # `python -m fastaccum` itself is exercised by the bench_out fixture.
    with pytest.raises(SystemExit) as exc:
        main(["bench", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--device", "--micro-batch", "--accum-steps", "--steps", "--dtype", "--seed"):
        assert flag in out
    for flag in ("--model", "--data", "--out", "--memory-cap", "--compile"):
        assert flag in out


def test_top_level_help_names_every_command_in_whole_sentences(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    description = out.split("positional arguments")[0].split("\n\n", 1)[1].strip()
    assert description.endswith("."), description
    for command in ("bench", "bench-ops", "plan", "info"):
        assert command in description


def test_plan_prints_a_plan_for_the_bench_model(capsys):
    assert main(["plan", "--device", "cpu", "--memory-budget", "0.02", "--target", "16"]) == 0
    out = capsys.readouterr().out
    assert "micro_batch_size" in out and "target 16" in out


def test_plan_with_too_small_a_budget_says_what_is_missing(capsys):
    assert main(["plan", "--device", "cpu", "--memory-budget", "0.0001", "--target", "4"]) == 2
    assert "MiB missing" in capsys.readouterr().err


def test_info_lists_what_each_op_runs_on(capsys):
    from fastaccum import _backend

    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert f"torch          {torch.__version__}" in out
    assert _backend.extension_status() in out
    rows = {line.split()[0]: line.split()[1:] for line in out.splitlines() if line.strip()}
    devices = rows["op"]
    for op in _backend.OPS:
        assert rows[op] == [_backend.select(d, op=op) for d in devices]


def test_info_json_is_describe(capsys):
    from fastaccum import _backend

    assert main(["info", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["ops"] == _backend.describe()["ops"]
    assert info["python"] == ".".join(map(str, sys.version_info[:3]))


def test_info_shows_a_forced_backend_that_cannot_run(capsys, monkeypatch):
    monkeypatch.setenv("FASTACCUM_BACKEND", "bogus")
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "forced backend bogus" in out
    assert "accumulate_         error" in out
    assert out.count("FASTACCUM_BACKEND must be one of") == 1


def test_bench_config_rejects_an_unknown_order():
    from fastaccum.bench.runs import BenchConfig
    from fastaccum.bench.training import check_config

    with pytest.raises(ValueError, match=r"order must be one of \['auto', 'interleaved'"):
        check_config(BenchConfig(order="random"))
    with pytest.raises(SystemExit):
        main(["bench", "--order", "random"])
