"""The scripts in examples/, run in reduced form (``--smoke``: a few optimizer steps) with
their outcome asserted here as well as inside the script.

Each test skips only when the example's optional dependency is missing; ``make install``
installs them (the ``examples`` extra), so CI runs every one.
"""

import importlib.util
import math
from pathlib import Path
from types import ModuleType

import pytest
import torch

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def load_example(name: str, requires: str) -> ModuleType:
    """Import examples/<name>.py as a module (skip if ``requires`` is not installed)."""
    pytest.importorskip(requires)
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(autouse=True)
def one_thread():
    # Small models: one thread is faster than two contending ones on a busy CI machine.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_hf_gpt2_matches_native_large_batch():
    example = load_example("hf_gpt2", "transformers")
    summary = example.main(["--smoke"])
    losses = summary["losses"]
    assert len(losses) == 4 and all(math.isfinite(x) for x in losses)
    assert losses[-1] < losses[0]
    # micro-batches of different token counts, still the large batch's update...
    assert len(set(summary["tokens_per_micro_batch"])) > 1
    assert summary["max_abs_deviation"] <= 1e-5
    # the same with every weight fused (Conv1D projections, embeddings, tied head)
    assert summary["max_abs_deviation_fuse_wgrad"] <= 1e-5
    # ...which equal weighting of micro-batches does not give
    assert summary["max_abs_deviation_without_num_items"] > 100 * summary["max_abs_deviation"]


def test_cnn_batchnorm_running_stats_match_large_batch():
    example = load_example("cnn_batchnorm", "sklearn")
    summary = example.main(["--smoke"])
    losses = summary["losses"]
    assert len(losses) == 6 and all(math.isfinite(x) for x in losses)
    assert sum(losses[-2:]) < sum(losses[:2])
    errors = summary["running_stats_error"]
    assert errors["fastaccum"] <= 1e-5
    assert errors["native_micro_batches"] > 0.01  # what plain BatchNorm on micro-batches gets
    assert 0.0 <= summary["test_accuracy"] <= 1.0


def test_batch_ramp_grows_k_and_every_window_is_its_large_batch():
    example = load_example("batch_ramp", "sklearn")
    summary = example.main(["--smoke"])
    losses = summary["losses"]
    assert len(losses) == 40 and all(math.isfinite(x) for x in losses)
    assert sum(losses[-5:]) < sum(losses[:5])
    ks = [change["accum_steps"] for change in summary["schedule"]]
    assert ks and ks == sorted(ks) and ks[0] == 4  # K doubled from 2, never shrank
    assert summary["final_accum_steps"] == ks[-1]
    # the windows were of different sizes, and each gave its large batch's update
    assert summary["images_seen"] > 40 * 2 * 8
    assert summary["max_rel_deviation_from_native_replay"] <= 1e-5


@pytest.mark.parametrize(
    ("name", "requires"),
    [("hf_gpt2", "transformers"), ("cnn_batchnorm", "sklearn"), ("batch_ramp", "sklearn")],
)
def test_examples_reject_bad_sizes(name, requires, capsys):
    example = load_example(name, requires)
    with pytest.raises(SystemExit) as exc:
        example.main(["--accum-steps", "0"])
    assert exc.value.code == 2
    assert "--accum-steps must be >= 1, got 0" in capsys.readouterr().err
