"""Building a teacher store survives what builds meet: a killed process resumes from its last complete shard,
several workers build one store together, and a full disk stops the build with one line and nothing that reads
as complete. Each ends in the same shards, byte for byte, as one uninterrupted build."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from store_jobs import REGISTRY, store_job

from dskd.config import load_config
from dskd.store.build import BuildOptions, build_store
from dskd.store.layout import MANIFEST, SHARDS
from dskd.store.shards import complete_sidecar, file_sha256

pytestmark = pytest.mark.integration
SAMPLES = 40
OPTIONS = ["--shard-samples", "1", "--batch-size", "1"]


def cli(job: Path, out: Path, *extra: str, wait: bool = True):
    cmd = [sys.executable, "-m", "dskd", "teacher-store", "build", str(job), "--out", str(out), *OPTIONS, *extra]
    process = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if not wait:
        return process
    out_text, err_text = process.communicate(timeout=600)
    return process.returncode, out_text, err_text


def shard_digests(store: Path) -> dict[str, str]:
    return {p.name: file_sha256(p) for p in sorted((store / SHARDS).glob("*.safetensors"))}


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    """The job, and the store one uninterrupted in-process build makes of it."""
    root = tmp_path_factory.mktemp("clean")
    job = store_job(root, samples=SAMPLES)
    config = load_config(job, registry=REGISTRY)
    assert build_store(config, REGISTRY, root / "store", BuildOptions(shard_samples=1, batch_size=1)).finished
    return job, root / "store"


def test_a_killed_build_resumes_after_its_last_complete_shard_and_ends_identical(clean, tmp_path):
    job, reference = clean
    out = tmp_path / "store"
    process = cli(job, out, wait=False)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and process.poll() is None:
        if len(list((out / SHARDS).glob("*.json"))) >= 3 if (out / SHARDS).is_dir() else False:
            break
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.communicate()
    assert not (out / MANIFEST).exists(), "the build finished before it could be killed; raise SAMPLES"
    complete = [s for s in range(SAMPLES) if complete_sidecar(out, s) is not None]
    assert len(complete) >= 3
    code, text, err = cli(job, out)
    assert code == 0, err[-2000:]
    assert f"{len(complete)} already complete" in text
    assert shard_digests(out) == shard_digests(reference)
    assert not [p for p in out.rglob("*") if ".tmp-" in p.name]  # no temporaries left behind


def test_two_workers_build_one_store_with_the_shards_of_a_single_build(clean, tmp_path):
    job, reference = clean
    out = tmp_path / "store"
    workers = [cli(job, out, "--worker", str(w), "--workers", "2", wait=False) for w in range(2)]
    results = [w.communicate(timeout=600) + (w.returncode,) for w in workers]
    assert all(code == 0 for *_, code in results), [err[-1500:] for _, err, _ in results]
    assert (out / MANIFEST).exists()
    assert sum("store finished" in text for text, _, _ in results) >= 1
    assert shard_digests(out) == shard_digests(reference)
    code, _, err = cli(job, out)  # and a finished store is never written again
    assert code == 2 and "never overwritten" in err


def _small_disk(path: Path, size: str):
    path.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(
            f"a small disk needs a tmpfs mount, which this user cannot make ({mounted.stderr.decode().strip()})"
        )


def test_a_full_disk_stops_the_build_with_one_line_and_leaves_nothing_that_reads_complete(clean, tmp_path):
    job, reference = clean
    disk = tmp_path / f"disk-{uuid.uuid4().hex[:6]}"
    _small_disk(disk, "48k")  # room for some shards, not for the 3 MB head
    try:
        out = disk / "store"
        code, _, err = cli(job, out)
        lines = [line for line in err.splitlines() if line.startswith("dskd: error:")]
        assert code == 2 and len(lines) == 1 and "Traceback" not in err, err[-2000:]
        assert "disk full" in lines[0] and "run the same command again" in lines[0]
        assert not (out / MANIFEST).exists()
        for shard in range(SAMPLES):  # whatever reads as complete is complete and intact
            sidecar = complete_sidecar(out, shard)
            if sidecar is not None:
                assert file_sha256(out / SHARDS / sidecar["file"]) == sidecar["sha256"]
        assert not [p for p in out.rglob("*") if ".tmp-" in p.name]
        moved = tmp_path / "moved"
        shutil.copytree(out, moved)  # "free space": the partial build continues on a larger disk
    finally:
        subprocess.run(["umount", str(disk)], check=False)
    code, text, err = cli(job, moved)
    assert code == 0, err[-2000:]
    assert shard_digests(moved) == shard_digests(reference)
    assert os.path.exists(moved / MANIFEST)
