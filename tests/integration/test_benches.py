"""Each benchmark in bench/ still runs end to end, on the smallest load.

These runs check that the scripts work against the current code, not how
fast anything is: the figures of a tiny run on a shared machine mean
nothing, and no test here asserts on them.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]

#: Script, tiny arguments, and lines its summary must print.
RUNS = {
    "upload": (
        ["--size", "0.01", "--runs", "1"],
        ["gateway / raw sink  :", "target peak RSS", "writes per byte"],
    ),
    "gateway": (
        [
            "--requests",
            "100",
            "--loadgen",
            "python",
            "--processes",
            "2",
            "--no-nginx",
            "--decisions",
            "200",
            "--core-rounds",
            "1",
            "--core-sizes",
            "10:100,20:200",
        ],
        ["gateway/direct", "target gateway >= 0.5 x direct", "per decision"],
    ),
    "throttle": (["--calls", "50", "--rounds", "1", "--keys", "5"], ["Redis ", " / "]),
    "s3": (["--size", "1", "--runs", "1"], ["ratio adapter / smart-open:"]),
}


@pytest.mark.parametrize("name", sorted(RUNS))
def test_bench_runs(name: str, tmp_path: Path) -> None:
    """The script finishes with status 0 and prints its summary."""
    arguments, expected = RUNS[name]
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / f"{name}.py"), *arguments],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    for line in expected:
        assert line in done.stdout, output
