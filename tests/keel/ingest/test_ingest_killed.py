"""An ingest killed mid-way leaves its staging folder under KEEL_HOME; `keel maintain` removes it."""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

from keel.cli.main import main
from pipelines.generate import generate, write_files

REPO = Path(__file__).resolve().parents[3]
# `keel ingest`, paused after validating its first batch until the test kills it.
PAUSED_INGEST = """
import sys
from keel.ingest import validation

real = validation.read_batches


def paused(path, columns, **options):
    for batch in real(path, columns, **options):
        yield batch
        print("validated a batch", flush=True)
        sys.stdin.readline()


validation.read_batches = paused
from keel.cli.main import main

sys.exit(main(sys.argv[1:]))
"""


def read_line(proc: subprocess.Popen, seconds: float = 120.0) -> str:
    """The child's next line of output, waited for with a deadline."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stdout], [], [], deadline - time.monotonic())
        if ready:
            return proc.stdout.readline()
    raise AssertionError(f"no output from the ingest in {seconds}s")


def test_an_ingest_killed_mid_way_leaves_a_folder_that_keel_maintain_removes(keel_home, monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("KEEL_PROJECT", "pipelines")
    txn = next(p for p in write_files(generate(days=3, users=40, seed=7), tmp_path) if p.parent.name == "transactions")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen(
        [sys.executable, "-c", PAUSED_INGEST, "ingest", str(txn), "--source", "transactions"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=REPO,
    )
    try:
        assert read_line(proc) == "validated a batch\n", proc.stderr.read()
        staging = keel_home / "staging"
        (left,) = staging.iterdir()
        assert (left / "staging.duckdb").is_file()
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=60) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    size = sum(p.stat().st_size for p in left.rglob("*") if p.is_file())
    assert left.is_dir() and size > 0

    assert main(["maintain"]) == 0

    out = capsys.readouterr().out
    assert out.splitlines()[-1] == (
        f"staging {staging}: removed 1 folder(s) left by killed ingests, freed {size:,} bytes; "
        "kept 0 of running ingests"
    )
    assert list(staging.iterdir()) == []
