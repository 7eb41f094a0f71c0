"""Two gloo ranks through torchrun (real processes) meeting a run directory that changed under
them: made read-only mid-run, and restarts with other settings or from an older checkpoint.
Each must end with one line from the rank that knows, no traceback and no hang."""
from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.mounts import tmpfs
from tests.service_proc import TORCHRUN_2, Service, free_port

pytestmark = pytest.mark.slow
LAUNCH_2 = ("-m", "service.launch", *TORCHRUN_2[2:])  # make train-local NPROC=2's launcher


def test_a_run_directory_made_read_only_mid_run_is_one_line_and_exit_4(sample_shards: Path, tmp_path: Path) -> None:
    """A read-only file system mounted over the run directory during epoch 1 (a remount of the
    directory's own file system is refused while the service holds its logs open for writing; a
    mount over it fails every new file the same way, EROFS).  Rank 0's history.json write failed,
    and the removal of its temporary file, in ``except``, failed again (EROFS, not ENOENT): an
    ``OSError`` traceback over the diagnosis.  Now rank 0 names the file (exit 4), rank 1 points at
    rank 0's line."""
    out, exit_file = tmp_path / "run", tmp_path / "exit-code"
    job = Service(sample_shards, out, "--epochs", "2", "--http.port", str(free_port(2)), launcher=LAUNCH_2,
                  env={"ALEXNET_EXIT_FILE": str(exit_file)})
    try:
        job.wait_for(r"epoch 1 step 1/3")
        with tmpfs(out, "ro,size=1m"):
            rc = job.wait(timeout=120)
    finally:
        job.kill()
        subprocess.run(["umount", "-l", str(out)], capture_output=True)
    said = [line for line in job.errors if line.startswith("service: ")]
    assert "Traceback" not in job.stderr, job.stderr[-3000:]
    assert said[0] == (f"service: writing {out / 'history.json'} failed: OSError: [Errno 30] Read-only file system: "
                       f"'{out / '.history.json.tmp'}'; there is no older checkpoint"), said
    assert said[1:] == ["service: rank 1: stopped: another rank of this job ended first; its own line says why"], said
    assert rc == 4 and exit_file.read_text() == "4\n"
