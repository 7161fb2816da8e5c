"""fastaccum's annotations as users' type checkers see them.

fastaccum ships ``py.typed`` (PEP 561), so mypy and IDEs read its annotations. mypy checks
tests/typing_samples/user_code.py (the public API used as the README uses it; it must pass, with
the types its ``reveal_type`` comments name) and tests/typing_samples/misuse.py (each marked line
must be flagged with its error code, and nothing else).
"""

import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = Path(__file__).parent / "typing_samples"


def marked(path: Path, pattern: str) -> dict[int, str]:
    """Line number -> the text after ``pattern`` in that line's trailing comment."""
    found = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        match = re.search(pattern, line)
        if match:
            found[number] = match.group(1).strip()
    return found


@pytest.fixture(scope="module")
def mypy_output(tmp_path_factory) -> str:
    pytest.importorskip("mypy")
    cache = tmp_path_factory.mktemp("mypy-cache")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "mypy",
            "--follow-imports=silent",  # fastaccum's own internals are not checked here
            "--cache-dir",
            str(cache),
            "--no-error-summary",
            str(SAMPLES / "user_code.py"),
            str(SAMPLES / "misuse.py"),
        ],
        cwd=ROOT,  # fastaccum is found as source from here
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode in (0, 1), result.stderr  # 1: the misuse errors
    return result.stdout


def reports(output: str, path: Path, kind: str) -> dict[int, str]:
    """mypy's ``kind`` ("note" or "error") lines for ``path``: line number -> message."""
    pattern = re.compile(rf"^{re.escape(path.name)}:(\d+): {kind}: (.*)$")
    found = {}
    for line in output.splitlines():
        match = pattern.match(line.replace(str(path.relative_to(ROOT).parent) + "/", ""))
        if match:
            found[int(match.group(1))] = match.group(2)
    return found


def test_user_code_checks_with_the_documented_types(mypy_output):
    sample = SAMPLES / "user_code.py"
    assert reports(mypy_output, sample, "error") == {}, mypy_output
    revealed = {
        line: message.removeprefix("Revealed type is ").strip('"')
        for line, message in reports(mypy_output, sample, "note").items()
    }
    expected = marked(sample, r"reveal_type\(.*\)\s+#\s*(.+)$")
    assert expected, "the sample names no types"
    assert revealed == expected


def test_misuse_is_flagged_where_marked(mypy_output):
    sample = SAMPLES / "misuse.py"
    flagged = {
        line: re.search(r"\[([a-z-]+)\]$", message).group(1)
        for line, message in reports(mypy_output, sample, "error").items()
    }
    assert flagged == marked(sample, r"#\s*error:\s*([a-z-]+)$"), mypy_output


def test_the_wheel_ships_the_annotations(tmp_path):
    """A pure-Python wheel (FASTACCUM_NO_EXT=1, no compiler run) holds py.typed and the
    extension's stub."""
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-build-isolation",
            "--no-deps",
            "--wheel-dir",
            str(tmp_path),
            str(ROOT),
        ],
        check=True,
        capture_output=True,
        env={**os.environ, "FASTACCUM_NO_EXT": "1"},
        timeout=600,
    )
    (wheel,) = tmp_path.glob("fastaccum-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {"fastaccum/py.typed", "fastaccum/_C.pyi", "fastaccum/__init__.py"} <= names
