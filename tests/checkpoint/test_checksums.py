"""Per-array sha256 in the checkpoint metadata, verified on restore (issue 13)."""

import gc
import json

import jax.numpy as jnp
import numpy as np
import pytest

from jaxquant import checkpoint
from jaxquant.checkpoint.manager import CheckpointManager
from jaxquant.checkpoint.tree_codec import ARRAYS_ITEM, META_ITEM
from jaxquant.errors import CorruptCheckpointError


def _tree():
    rng = np.random.default_rng(0)
    return {"w": rng.standard_normal((256, 256)).astype(np.float32), "b": jnp.arange(8.0)}


def _biggest_data_file(path):
    data = [f for f in (path / ARRAYS_ITEM).rglob("*") if f.is_file() and f.parent.name == "d"]
    return max(data, key=lambda f: f.stat().st_size)


def _flip(file, where=0.5, bit=0x10):
    b = bytearray(file.read_bytes())
    b[int(len(b) * where)] ^= bit
    file.write_bytes(bytes(b))


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("where", [0.3, 0.5, 0.9])
def test_flipped_byte_is_a_clear_error(tmp_path, where):
    path = checkpoint.save(tmp_path / "c", _tree())
    _flip(_biggest_data_file(path), where)
    with pytest.raises(CorruptCheckpointError, match="corrupted") as info:
        checkpoint.restore(path)
    msg = str(info.value)
    assert str(path) in msg and "earlier checkpoint" in msg
    if "sha256" in msg:
        assert "array w " in msg and ARRAYS_ITEM in msg
    del info
    gc.collect()


def test_checksum_is_recorded_per_array(tmp_path):
    path = checkpoint.save(tmp_path / "c", _tree())
    meta = checkpoint.metadata(path)
    digests = [c["sha256"] for c in meta["tree"]["children"]]
    assert len(digests) == 2 and all(len(d) == 64 for d in digests) and digests[0] != digests[1]


def test_checkpoint_without_checksums_still_restores(tmp_path):
    """Checkpoints written before checksums existed have no sha256 keys: nothing to verify."""
    tree = _tree()
    path = checkpoint.save(tmp_path / "c", tree)
    meta_file = path / META_ITEM / "metadata"
    meta = json.loads(meta_file.read_text())
    for c in meta["tree"]["children"]:
        del c["sha256"]
    meta_file.write_text(json.dumps(meta))
    np.testing.assert_array_equal(checkpoint.restore(path)["w"], tree["w"])


def test_wrong_checksum_in_metadata_is_caught(tmp_path):
    path = checkpoint.save(tmp_path / "c", _tree())
    meta_file = path / META_ITEM / "metadata"
    meta = json.loads(meta_file.read_text())
    meta["tree"]["children"][0]["sha256"] = "0" * 64
    meta_file.write_text(json.dumps(meta))
    with pytest.raises(CorruptCheckpointError, match=r"array b fails its sha256 check"):
        checkpoint.restore(path)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_manager_step_with_flipped_byte_is_a_clear_error(tmp_path):
    with CheckpointManager(tmp_path / "run", async_save=False) as mngr:
        mngr.save(1, _tree())
    _flip(_biggest_data_file(tmp_path / "run" / "1"))
    with (
        CheckpointManager(tmp_path / "run") as mngr,
        pytest.raises(CorruptCheckpointError, match=r"step 1.*corrupted"),
    ):
        mngr.restore()
    gc.collect()


def test_crash_between_the_two_renames_of_a_forced_save_is_recovered(tmp_path, monkeypatch):
    """save(force=True) moves the old checkpoint aside, then the new one in; a crash between
    the two renames leaves no directory: restore finishes the swap with the complete new one."""
    import os

    path = checkpoint.save(tmp_path / "c", {"w": jnp.zeros(3)})
    real, calls = os.rename, []

    def second_rename_dies(src, dst):
        if ".orbax-checkpoint-tmp" in os.fspath(src):  # Orbax's own finalizing rename
            return real(src, dst)
        calls.append(src)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(src, dst)

    monkeypatch.setattr(os, "rename", second_rename_dies)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save(path, {"w": jnp.ones(3)}, force=True)
    monkeypatch.setattr(os, "rename", real)
    assert not path.exists()
    np.testing.assert_array_equal(checkpoint.restore(path)["w"], np.ones(3))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]
