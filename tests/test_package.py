"""The package's public names: listed by dir() before first use, and all importable."""

import subprocess
import sys

CHECK = """
import sys
import fastaccum
names = dir(fastaccum)
missing = [n for n in fastaccum.__all__ if n not in names]
assert not missing, missing
assert "fastaccum.memory.planner" not in sys.modules  # still lazy: dir() loaded nothing
for name in fastaccum.__all__:
    getattr(fastaccum, name)
print("ok")
"""


def test_every_public_name_is_listed_before_first_use_and_resolves():
    # A fresh interpreter, so that no test has loaded the lazy modules yet.
    done = subprocess.run(
        [sys.executable, "-c", CHECK], capture_output=True, text=True, timeout=300, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"
