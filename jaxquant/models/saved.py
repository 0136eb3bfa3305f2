"""Quantized checkpoints as the command line writes them: Orbax params plus a JSON sidecar.

Layout of ``DIR``::

    DIR/params/         the serving params (jaxquant.checkpoint: packed codes + scales)
    DIR/jaxquant.json   the full serving TransformerConfig (rules and attention configs
                        included), the recipe, source model and versions

The sidecar's ``transformer_config`` is ``TransformerConfig.to_dict()`` (format 2), so a model
quantized by any rules restores without a recipe. Format 1 sidecars (written before the rules
were stored) hold the config without ``quant_rules`` / attention configs; their serving config
is rebuilt from the ``recipe`` string.

The two are one atomic unit: :func:`save_quantized` writes both into a staging folder next to
``DIR`` and swaps it in with two renames, so a killed save never pairs new params with an old
sidecar. A crash between the two renames leaves the finished new folder under its staging name;
:func:`load_quantized` recognises it, finishes the swap and uses it.

``DIR`` may hold more than the serving pair: ``jaxquant finetune --out DIR`` keeps its training
checkpoints (``DIR/train``), LoRA adapters and run record there. ``save_quantized(...,
keep_others=True)`` carries every other entry of the existing ``DIR`` into the staging folder
(hard links, a copy where the file system has none) before the sidecar completes it, so the
swap replaces only the serving pair and a failed save leaves the old ``DIR`` untouched.

In a multi-process run (``jax.distributed``) every process calls :func:`save_quantized`: all of
them write their shards of the params into one staging folder (Orbax), process 0 alone writes
the sidecar and renames, and no process returns before the swap is done.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

from jaxquant import checkpoint
from jaxquant.checkpoint.primary import agreed_token, on_primary
from jaxquant.errors import CorruptCheckpointError, JaxquantError
from jaxquant.nn.config import TransformerConfig

SIDECAR = "jaxquant.json"
FORMAT = 2


def save_quantized(
    out: str | os.PathLike,
    serve_cfg: TransformerConfig,
    params: Any,
    info: dict,
    *,
    force: bool = False,
    keep_others: bool = False,
) -> Path:
    """Writes ``params`` and the sidecar as one unit; the previous checkpoint survives a failed
    save (see the module docstring). Raises FileExistsError when ``out`` holds a checkpoint and
    not ``force`` (call :func:`check_writable` before long work to fail early).

    With ``keep_others``, the entries of an existing ``out`` other than ``params`` and the
    sidecar (e.g. a fine-tuning run's ``train/`` checkpoints) are kept, and ``out`` need not be
    a checkpoint yet."""
    out = Path(out).absolute()

    def prepare():
        _recover(out)
        check_writable(out, force=force, keep_others=keep_others)
        _remove_leftovers(out)

    on_primary(prepare, f"preparing to save {out}")
    staging = out.with_name(f"{out.name}{_NEW}{agreed_token()}")  # one name for all processes
    checkpoint.save(staging / "params", params)  # every process: Orbax writes each one's shards

    def finish():
        if keep_others and out.is_dir():
            for entry in out.iterdir():
                if entry.name not in _SERVING:
                    _link_tree(entry, staging / entry.name)
        sidecar = {
            "format": FORMAT,
            "recipe": info.get("recipe"),  # for reference; loading needs only transformer_config
            "info": info,
            "transformer_config": serve_cfg.to_dict(),
        }
        tmp = staging / (SIDECAR + ".tmp")
        tmp.write_text(json.dumps(sidecar, indent=2, default=str))
        tmp.replace(staging / SIDECAR)  # the staging folder is complete from here on
        _swap(staging, out)

    on_primary(finish, f"saving {out}")  # the others wait: after it, all see the finished `out`
    return out


_NEW = ".jaxquant-new-"
_OLD = ".jaxquant-old-"
_SERVING = ("params", SIDECAR, SIDECAR + ".tmp")  # what a save replaces; the rest may be kept


def _link_or_copy(src, dst) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _link_tree(src: Path, dst: Path) -> None:
    """``src`` (a file or folder) at ``dst`` by hard links: instant, and ``src`` is untouched."""
    if src.is_dir() and not src.is_symlink():
        shutil.copytree(src, dst, symlinks=True, copy_function=_link_or_copy)
    else:
        _link_or_copy(src, dst)


def check_writable(out: str | os.PathLike, *, force: bool = False,
                   keep_others: bool = False) -> None:
    """Raises unless :func:`save_quantized` may write ``out`` (cheap: run it before quantizing).

    Raises:
      FileExistsError: ``out`` exists and ``force`` is False (the message names ``--force``);
        with ``keep_others``, only when ``out`` already holds a serving checkpoint.
      JaxquantError: ``out`` exists but is not a checkpoint of this module, so ``force`` would
        delete someone's folder (never with ``keep_others``: nothing of it is deleted).
    """
    out = Path(out).absolute()
    _recover(out)
    if not out.exists():
        return
    if keep_others:
        if not out.is_dir():
            raise JaxquantError(f"{out} exists and is a file, not a checkpoint folder; choose "
                                "another --out.")
        if (out / SIDECAR).is_file() and not force:
            raise FileExistsError(f"{out} already holds a serving checkpoint. Pass --force to "
                                  "replace it (force=True in Python), or choose another --out.")
        return
    if not force:
        raise FileExistsError(
            f"{out} already exists. Pass --force to replace it (force=True in Python; the old "
            "checkpoint is kept until the new one is complete), or choose another --out."
        )
    if not out.is_dir() or (any(out.iterdir()) and not (out / SIDECAR).is_file()):
        raise JaxquantError(
            f"{out} exists and is not a `jaxquant ptq --out` checkpoint (no {SIDECAR}); refusing "
            "to replace it even with --force. Delete it yourself or choose another --out."
        )


def _complete(folder: Path) -> bool:
    return (folder / SIDECAR).is_file() and (folder / "params").is_dir()


def _swap(staging: Path, out: Path) -> None:
    """Moves the complete ``staging`` folder to ``out``, replacing what was there."""
    if out.exists():
        old = out.with_name(f"{out.name}{_OLD}{staging.name.rsplit(_NEW, 1)[-1]}")
        os.rename(out, old)
        # A crash here leaves no `out`, but a complete `staging`: see _recover.
        os.rename(staging, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(staging, out)


def _remove_leftovers(out: Path) -> None:
    """Deletes staging and moved-aside folders of interrupted saves next to an intact ``out``."""
    if out.exists():
        for p in out.parent.glob(f"{out.name}.jaxquant-*"):
            if _NEW in p.name or _OLD in p.name:
                shutil.rmtree(p, ignore_errors=True)


def _recover(directory: Path) -> None:
    """If a save crashed between its two renames, finishes it (the new folder is complete)."""
    if directory.exists() or not directory.parent.is_dir():
        return
    done = [p for p in directory.parent.glob(f"{directory.name}{_NEW}*") if _complete(p)]
    if not done:
        return
    newest = max(done, key=lambda p: (p / SIDECAR).stat().st_mtime_ns)
    print(
        f"jaxquant: {directory} was being replaced when a save was interrupted; using the "
        f"finished new checkpoint {newest.name}",
        file=sys.stderr,
    )
    try:
        os.rename(newest, directory)
    except OSError:
        if not _complete(directory):
            raise
        return  # another process of a multi-process run finished it first
    _remove_leftovers(directory)


def _sidecar(directory: str | os.PathLike) -> tuple[Path, Path]:
    """``(directory, its sidecar)``, after finishing an interrupted swap; the sidecar must exist."""
    directory = Path(directory).absolute()
    _recover(directory)
    side = directory / SIDECAR
    if not side.is_file():
        raise FileNotFoundError(
            f"{side} is missing: {directory} is not a checkpoint written by `jaxquant ptq --out`."
        )
    return directory, side


def recorded_model(directory: str | os.PathLike) -> str | None:
    """The model a checkpoint of :func:`save_quantized` was made from (its ``--model``), if
    recorded; reads only the sidecar."""
    directory, side = _sidecar(directory)
    try:
        info = json.loads(side.read_text()).get("info", {})
    except (ValueError, UnicodeDecodeError, AttributeError) as e:
        raise CorruptCheckpointError(
            f"{side} is damaged ({e}); write the checkpoint again with `jaxquant ptq --out`."
        ) from e
    model = info.get("model") if isinstance(info, dict) else None
    return model if isinstance(model, str) else None


def load_quantized(directory: str | os.PathLike) -> tuple[TransformerConfig, Any, dict]:
    """Reads a checkpoint of :func:`save_quantized`: ``(serve_cfg, params, sidecar)``."""
    directory, side = _sidecar(directory)
    try:
        sidecar = json.loads(side.read_text())
        if not isinstance(sidecar, dict) or "transformer_config" not in sidecar:
            raise ValueError("not a JSON object with a transformer_config")
        fmt = sidecar.get("format", 1)
        if fmt == 1 and "recipe" not in sidecar:
            raise ValueError("a format 1 sidecar without a recipe")
    except (ValueError, UnicodeDecodeError) as e:
        raise CorruptCheckpointError(
            f"{side} is damaged ({e}); it holds the recipe and model config of {directory}. "
            "Write the checkpoint again with `jaxquant ptq --out ... --force`."
        ) from e
    if fmt == 1:
        serve_cfg = _format1_serving_config(sidecar)
    elif fmt == FORMAT:
        serve_cfg = TransformerConfig.from_dict(sidecar["transformer_config"])
    else:
        raise ValueError(
            f"{side} has format {fmt!r}; this jaxquant reads formats 1 and {FORMAT}. Upgrade "
            "jaxquant to read it."
        )
    return serve_cfg, checkpoint.restore(directory / "params"), sidecar


def _format1_serving_config(sidecar: dict) -> TransformerConfig:
    """Format 1 stored the config without its rules: rebuild them from the recipe string."""
    from jaxquant.ptq import parse_recipe, serving_config

    base = TransformerConfig.from_dict(sidecar["transformer_config"])
    return serving_config(base, parse_recipe(sidecar["recipe"]))
