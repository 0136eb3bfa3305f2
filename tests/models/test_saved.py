"""`jaxquant ptq --out` checkpoints are one atomic unit: params and sidecar swap together."""

import json
import os
import pathlib

import jax.numpy as jnp
import pytest

from jaxquant.errors import CorruptCheckpointError
from jaxquant.models import saved
from jaxquant.nn.config import TransformerConfig

CFG = TransformerConfig.tiny()


def _save(out, value, **kw):
    return saved.save_quantized(
        out,
        CFG,
        {"w": jnp.full((4,), value)},
        {"recipe": "fp32", "model": "tiny", "tag": value},
        **kw,
    )


def _load(out):
    _, params, side = saved.load_quantized(out)
    return float(params["w"][0]), side["info"]["tag"]


def test_failure_before_the_swap_keeps_the_old_pair(tmp_path, monkeypatch):
    out = tmp_path / "ck"
    _save(out, 1.0)
    real = os.rename

    def crash(src, dst):  # the kill lands after params and sidecar are written, before the swap
        if os.path.basename(src).startswith("ck"):
            assert (pathlib.Path(src) / saved.SIDECAR).is_file()
            raise KeyboardInterrupt
        return real(src, dst)

    monkeypatch.setattr(os, "rename", crash)
    with pytest.raises(KeyboardInterrupt):
        _save(out, 2.0, force=True)
    monkeypatch.setattr(os, "rename", real)
    assert _load(out) == (1.0, 1.0)  # old params with the old sidecar, never mixed
    _save(out, 3.0, force=True)  # the next save cleans up
    assert _load(out) == (3.0, 3.0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]


def test_crash_between_the_two_renames_recovers_the_new_checkpoint(tmp_path, monkeypatch, capsys):
    out = tmp_path / "ck"
    _save(out, 1.0)
    real, calls = os.rename, []

    def second_rename_dies(src, dst):
        if not os.path.basename(src).startswith("ck"):  # Orbax's own renames
            return real(src, dst)
        calls.append(src)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(src, dst)

    monkeypatch.setattr(os, "rename", second_rename_dies)
    with pytest.raises(KeyboardInterrupt):
        _save(out, 2.0, force=True)
    monkeypatch.setattr(os, "rename", real)
    assert not out.exists()  # moved aside, the new one still under its staging name
    assert saved.recorded_model(out) == "tiny"
    assert _load(out) == (2.0, 2.0)
    assert "using the finished new checkpoint" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]


def test_existing_out_needs_force_and_names_the_flag(tmp_path):
    out = tmp_path / "ck"
    _save(out, 1.0)
    with pytest.raises(FileExistsError, match="--force"):
        saved.check_writable(out)
    with pytest.raises(FileExistsError, match="--force"):
        _save(out, 2.0)
    saved.check_writable(out, force=True)
    saved.check_writable(tmp_path / "new")


def test_damaged_sidecar_is_a_clear_error(tmp_path):
    out = tmp_path / "ck"
    _save(out, 1.0)
    (out / saved.SIDECAR).write_text(json.dumps({"recipe": "fp32"})[:9])
    with pytest.raises(CorruptCheckpointError, match=rf"{out / saved.SIDECAR} is damaged"):
        saved.load_quantized(out)
