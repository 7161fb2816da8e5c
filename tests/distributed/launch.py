"""Spawning gloo process groups on this machine for the distributed tests.

Process start-up dominates these tests, so each test module spawns its ranks once and runs
all its scenarios there (:func:`run_scenarios`); the tests then read one outcome each.
"""

from __future__ import annotations

import datetime
import json
import os
import socket
import subprocess
import sys
import traceback
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

WORLD = 2
Scenario = Callable[[int, int], None]


def free_port() -> int:
    """A TCP port nobody listens on right now (each spawn gets its own)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world: int, port: int, scenarios: dict[str, Scenario], out: str) -> None:
    # One intra-op thread per process: the ranks share the machine's cores.
    torch.set_num_threads(1)
    # A failed rank leaves the other one waiting in a collective: time out, do not hang.
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=60),
    )
    outcome: dict[str, str | None] = {}
    failed = None
    try:
        for name, scenario in scenarios.items():
            if failed is not None:
                outcome[name] = f"not run: scenario {failed} failed before it"
                continue
            try:
                scenario(rank, world)
                outcome[name] = None
            except BaseException:  # pytest.raises/warns fail with a BaseException
                outcome[name] = traceback.format_exc()
                failed = name
    finally:
        Path(out, f"rank{rank}.json").write_text(json.dumps(outcome))
        if failed is None:
            dist.destroy_process_group()
    # The outcome is written: leave without the interpreter's teardown, where torch's gloo
    # objects are destroyed in no fixed order and now and then abort the process ("terminate
    # called without an active exception", about 1 spawn in 6 on a 2-core machine).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_scenarios(scenarios: dict[str, Scenario], out: Path, world: int = WORLD) -> dict:
    """Run every ``scenario(rank, world)`` in order in ``world`` fresh processes joined in
    a gloo group. Returns {name: [traceback or None per rank]}; after the first failure
    the remaining scenarios are reported as not run."""
    mp.spawn(_entry, args=(world, free_port(), scenarios, str(out)), nprocs=world, join=True)
    per_rank = [json.loads(Path(out, f"rank{r}.json").read_text()) for r in range(world)]
    return {name: [ranks[name] for ranks in per_rank] for name in scenarios}


def torchrun(script: Path, *args: str, world: int = WORLD) -> list[dict]:
    """Run ``script`` under ``python -m torch.distributed.run --standalone`` with ``world``
    processes of one thread each; the JSON objects it printed, one per line. Fails the test
    with the end of its output when it exits non-zero."""
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        str(world),
        "--standalone",
        str(script),
        *args,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        command,
        cwd=Path(script).parents[1],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    # JSON objects only: Trainer prints its logs as Python dicts ("{'loss': ...}").
    return [json.loads(line) for line in done.stdout.splitlines() if line.startswith('{"')]


def by_name(*scenarios: Scenario) -> dict[str, Scenario]:
    """A test module's ``SCENARIOS`` table: each scenario function under its own name."""
    return {fn.__name__: fn for fn in scenarios}


def scenario_test(scenarios: dict[str, Scenario]) -> Callable[..., None]:
    """The test function of a scenario module: one test per scenario, which fails with the
    rank's traceback when that scenario failed on any rank (``outcomes`` is the session
    fixture of tests/distributed/conftest.py)."""

    @pytest.mark.parametrize("name", list(scenarios))
    def test_scenario(outcomes: dict, name: str, request: pytest.FixtureRequest) -> None:
        key = f"{request.module.__name__.rsplit('.', 1)[-1]}.{name}"
        for rank, error in enumerate(outcomes[key]):
            assert error is None, f"rank {rank}:\n{error}"

    return test_scenario
