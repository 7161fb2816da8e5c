"""One spawn of the gloo ranks for every scenario module selected in this session.

Process start-up dominates the distributed tests, so the scenarios of test_ddp.py and
test_fsdp.py (each module's ``SCENARIOS``) run in one pair of processes; each test then
reads its own scenario's outcome.
"""

from __future__ import annotations

import pytest

from tests.distributed.launch import run_scenarios


@pytest.fixture(scope="session")
def outcomes(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """{"<module>.<scenario>": [traceback or None per rank]} for the selected modules."""
    modules = {
        item.module.__name__: item.module
        for item in request.session.items
        if hasattr(getattr(item, "module", None), "SCENARIOS")
    }
    scenarios = {
        f"{name.rsplit('.', 1)[-1]}.{key}": fn
        for name, module in sorted(modules.items())
        for key, fn in module.SCENARIOS.items()
    }
    return run_scenarios(scenarios, tmp_path_factory.mktemp("ranks"))
