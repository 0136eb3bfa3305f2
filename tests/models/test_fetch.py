"""The model cache cannot be poisoned: lock, per-process temporary names, RECORD sha256 (issue 13)."""

import os
import pathlib
import shutil
import subprocess
import sys

import pytest

from jaxquant.errors import DownloadError, JaxquantError
from jaxquant.models import fetch
from jaxquant.models.fetch import resolve_model
from tests.models.wheel_helpers import WHEEL_NAME, write_fake_wheel

REPO = pathlib.Path(__file__).resolve().parents[2]
PAYLOAD = bytes(range(256)) * 4096  # 1 MiB standing in for the 93 MB GGUF
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv(fetch.CACHE_ENV, str(tmp_path / "cache"))
    return tmp_path / "cache"


def _pip_from(index: pathlib.Path, calls: list):
    """A stand-in for ``subprocess.run(pip download ... -d DEST)`` copying from ``index``."""

    def run(command, **kwargs):
        calls.append(command)
        shutil.copy(index / WHEEL_NAME, pathlib.Path(command[-1]) / WHEEL_NAME)
        return subprocess.CompletedProcess(command, 0, "", "")

    return run


def test_poisoned_gguf_is_detected_deleted_and_extracted_again(cache, capsys):
    cache.mkdir()
    write_fake_wheel(cache, PAYLOAD)
    (cache / GGUF_NAME).write_bytes(b"\0" * len(PAYLOAD))  # what a killed extraction left
    path = resolve_model("smollm2-135m")
    assert path.read_bytes() == PAYLOAD
    assert "does not match the sha256" in capsys.readouterr().err
    # Verified once: later calls neither hash nor extract.
    assert resolve_model("smollm2-135m") == path and capsys.readouterr().err == ""


def test_gguf_changed_after_verification_is_checked_again(cache, capsys):
    cache.mkdir()
    write_fake_wheel(cache, PAYLOAD)
    path = resolve_model("smollm2-135m")
    with open(path, "r+b") as f:  # zeros over the second half, size unchanged
        f.seek(len(PAYLOAD) // 2)
        f.write(b"\0" * (len(PAYLOAD) // 2))
    capsys.readouterr()
    assert resolve_model("smollm2-135m").read_bytes() == PAYLOAD
    assert "does not match the sha256" in capsys.readouterr().err


def test_truncated_wheel_is_fetched_again(cache, tmp_path, monkeypatch, capsys):
    index = tmp_path / "index"
    index.mkdir()
    cache.mkdir()
    good = write_fake_wheel(index, PAYLOAD)
    (cache / WHEEL_NAME).write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    calls = []
    monkeypatch.setattr(subprocess, "run", _pip_from(index, calls))
    assert resolve_model("smollm2-135m").read_bytes() == PAYLOAD
    assert len(calls) == 1 and "truncated or corrupt" in capsys.readouterr().err


def test_wheel_whose_member_fails_record_twice_is_a_clear_error(cache, tmp_path, monkeypatch):
    index = tmp_path / "index"
    index.mkdir()
    write_fake_wheel(index, PAYLOAD, record_payload=b"something else")
    calls = []
    monkeypatch.setattr(subprocess, "run", _pip_from(index, calls))
    with pytest.raises(DownloadError, match=r"corrupt both times.*retry"):
        resolve_model("smollm2-135m")
    assert len(calls) == 2
    assert not (cache / GGUF_NAME).exists()  # nothing unverified is left for the next run
    assert not list(cache.glob("*jaxquant-tmp*"))


def test_failed_download_is_a_jaxquant_and_runtime_error(cache, monkeypatch):
    failed = subprocess.CompletedProcess([], returncode=1, stdout="", stderr="no network")
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: failed)
    with pytest.raises(DownloadError, match="no network") as info:
        resolve_model("smollm2-135m")
    assert isinstance(info.value, JaxquantError) and isinstance(info.value, RuntimeError)


def test_leftovers_of_a_killed_fetch_are_cleaned(cache):
    cache.mkdir()
    write_fake_wheel(cache, PAYLOAD)
    (cache / f"{GGUF_NAME}.jaxquant-tmp-123-abcd").write_bytes(b"\0" * 10)
    (cache / ".jaxquant-tmp-download-x").mkdir()
    (cache / f"{GGUF_NAME}.partial").write_bytes(b"\0")
    assert resolve_model("smollm2-135m").read_bytes() == PAYLOAD
    assert sorted(p.name for p in cache.iterdir()) == sorted(
        [GGUF_NAME, f"{GGUF_NAME}.sha256", f"{GGUF_NAME}.lock", WHEEL_NAME]
    )


_CHILD = "from jaxquant.models.fetch import resolve_model; print(resolve_model('smollm2-135m'))"


def test_four_processes_on_a_fresh_cache_all_succeed(tmp_path):
    """Real pip, from a local folder (PIP_NO_INDEX + PIP_FIND_LINKS): no network."""
    index = tmp_path / "index"
    index.mkdir()
    write_fake_wheel(index, PAYLOAD)
    env = dict(
        os.environ,
        PYTHONPATH=str(REPO),
        JAXQUANT_CACHE=str(tmp_path / "cache"),
        PIP_NO_INDEX="1",
        PIP_FIND_LINKS=str(index),
        PIP_DISABLE_PIP_VERSION_CHECK="1",
    )
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _CHILD],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(4)
    ]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (out, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err[-2000:]
        assert pathlib.Path(out.strip()).read_bytes() == PAYLOAD
    assert sum("downloading" in err for _, err in outs) == 1  # the lock serialised the fetch
