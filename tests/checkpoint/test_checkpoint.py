"""Orbax checkpoints with QArray leaves: bit-identical round trips, sharded restore, safety."""

import functools
import gc
import importlib.util
import json
import os
import pathlib
import pickle
import signal
import subprocess
import sys
import textwrap
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxquant import checkpoint
from jaxquant.checkpoint.common import TMP_SUFFIX
from jaxquant.checkpoint.tree_codec import ARRAYS_ITEM, META_ITEM
from jaxquant.core import QuantSpec, quantize_operand

REPO = pathlib.Path(__file__).resolve().parents[2]

QSPECS = {
    "int8": QuantSpec(qtype="int8"),
    "int4": QuantSpec(qtype="int4", group_size=128),
    "int4_asym": QuantSpec(qtype="int4", group_size=32, symmetric=False),
    "int2": QuantSpec(qtype="int2", group_size=64),
    "fp8_e4m3": QuantSpec(qtype="fp8_e4m3"),
    "fp8_e5m2": QuantSpec(qtype="fp8_e5m2"),
    "nf4": QuantSpec(qtype="nf4", group_size=64),
}


# Jitted: compiling once per shape is much faster than quantizing op by op.
_quantize = jax.jit(quantize_operand, static_argnums=(1, 2))


def _w(shape, seed=0, dtype=jnp.float32):
    return jax.random.normal(jax.random.key(seed), shape, jnp.float32).astype(dtype)


def qtree(name: str) -> dict:
    """A small model-like tree: QArray kernels, float biases and norms, a list, scalars."""
    return jax.tree.map(lambda x: x, _qtree(name))  # fresh containers, shared leaves


@functools.cache  # quantizing is the slow part of these tests
def _qtree(name: str) -> dict:
    spec = QSPECS[name]
    return {
        "block_0": {
            "attn": {
                "q_proj": {"kernel": _quantize(_w((256, 64), 1), spec, (0,))},
                "o_proj": {"kernel": _quantize(_w((128, 256), 2), spec, (0,))},
            },
            "norm": _w((64,), 3, jnp.bfloat16),
        },
        "head": [_quantize(_w((128, 32), 4, jnp.bfloat16), spec, (0,)), _w((32,), 5)],
        "step": jnp.int32(7),
        "info": (3, 0.1, None, "run-a", True),
    }


def assert_identical(a, b):
    """Same tree (QArray metadata included), same leaf types, dtypes and bytes."""
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        assert type(x) is type(y) or (isinstance(x, jax.Array) and isinstance(y, jax.Array))
        if hasattr(x, "shape"):
            assert x.dtype == y.dtype and x.shape == y.shape
            assert np.asarray(x).tobytes() == np.asarray(y).tobytes()
        else:
            assert x == y


def abstract(tree):
    """Like ``jax.eval_shape(lambda: tree)``, but passes non-array leaves (str) through."""
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype) if hasattr(x, "shape") else x, tree
    )


def dir_bytes(path) -> int:
    return sum(f.stat().st_size for f in pathlib.Path(path).rglob("*") if f.is_file())


# --- round trips ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(QSPECS))
def test_round_trip_bit_identical(tmp_path, name):
    tree = qtree(name)
    kernel = tree["block_0"]["attn"]["q_proj"]["kernel"]
    if name in ("int4", "int4_asym", "int2", "nf4"):
        assert kernel.pack_axis is not None and kernel.qvalue.dtype == jnp.uint8  # packed
    assert (kernel.zero_point is not None) == (name == "int4_asym")
    checkpoint.save(tmp_path / "ckpt", tree)
    assert_identical(checkpoint.restore(tmp_path / "ckpt"), tree)
    assert_identical(checkpoint.restore(tmp_path / "ckpt", abstract(tree)), tree)
    # The restored QArray still works: same dequantized values.
    back = checkpoint.restore(tmp_path / "ckpt")["block_0"]["attn"]["q_proj"]["kernel"]
    np.testing.assert_array_equal(back.dequantize(), kernel.dequantize())


def test_nested_float_tree_round_trip(tmp_path):
    tree = {
        "a": {"b": {"c": _w((8, 3)), "d": _w((5,), 1, jnp.bfloat16)}, "e": []},
        "f16": _w((4, 4), 2, jnp.float16),
        "f8": _w((16,), 3).astype(jnp.float8_e4m3fn),
        "ints": [jnp.arange(6, dtype=jnp.int8), np.arange(3, dtype=np.uint16), {}],
        "none": None,
        "np_scalar": np.float32(1.5),
        "nan": float("nan"),
    }
    checkpoint.save(tmp_path / "c", tree)
    for target in (None, abstract(tree)):
        back = checkpoint.restore(tmp_path / "c", target)
        assert np.isnan(back.pop("nan")) and type(back["none"]) is type(None)
        # numpy leaves come back as jax.Arrays with the same dtype and bytes
        expected = jax.tree.map(jnp.asarray, {k: v for k, v in tree.items() if k != "nan"})
        assert_identical(back, expected)


def test_metadata_is_json_with_dtype_names_and_nothing_is_unpickled(tmp_path, monkeypatch):
    tree = qtree("fp8_e5m2") | {"nf4": qtree("nf4")["head"][0]}
    checkpoint.save(tmp_path / "c", tree)
    meta = json.loads((tmp_path / "c" / META_ITEM / "metadata").read_text())
    assert meta["format"] == checkpoint.FORMAT
    q = meta["tree"]["children"][0]["children"][0]["children"][0]["children"][0]
    assert q["type"] == "qarray" and q["qtype"] == "fp8_e5m2"
    assert q["arrays"]["qvalue"]["dtype"] == "float8_e5m2"
    assert checkpoint.metadata(tmp_path / "c") == meta

    def no_pickle(*args, **kwargs):
        raise AssertionError("restore must not unpickle anything")

    for name in ("load", "loads", "Unpickler"):
        monkeypatch.setattr(pickle, name, no_pickle)
    assert_identical(checkpoint.restore(tmp_path / "c"), tree)


def test_custom_nodes_restore_with_target(tmp_path):
    params = {"w": _w((16, 8)), "b": jnp.zeros(8)}
    state = {"params": params, "opt": optax.adam(1e-3).init(params), "step": 3}
    checkpoint.save(tmp_path / "c", state)
    with pytest.raises(ValueError, match=r"opt/0: .*ScaleByAdamState.*target="):
        checkpoint.restore(tmp_path / "c")
    back = checkpoint.restore(tmp_path / "c", jax.eval_shape(lambda: state))
    assert_identical(back, state)
    assert back["step"] == 3 and type(back["step"]) is int


def test_int4_g128_is_under_a_fifth_of_f32_on_disk(tmp_path):
    kernels = {f"layer_{i}": _w((512, 1536), i) for i in range(4)}
    spec = QuantSpec(qtype="int4", group_size=128)
    q = {k: _quantize(w, spec, (0,)) for k, w in kernels.items()}
    checkpoint.save(tmp_path / "f32", kernels)
    checkpoint.save(tmp_path / "int4", q)
    f32, int4 = dir_bytes(tmp_path / "f32"), dir_bytes(tmp_path / "int4")
    assert f32 > 0.9 * 4 * 4 * 512 * 1536  # the f32 values really are on disk
    assert int4 < 0.2 * f32, (int4, f32)


# --- sharded restore -----------------------------------------------------------------------------


def test_restore_into_named_shardings_on_8_devices(tmp_path):
    mesh = Mesh(np.array(jax.devices()[:8]), ("model",))
    col = NamedSharding(mesh, P(None, "model"))  # output axis sharded, codes and scales alike
    rep = NamedSharding(mesh, P())
    tree = {
        "q_proj": {"kernel": _quantize(_w((512, 256)), QSPECS["int4"], (0,))},
        "up": {"kernel": _quantize(_w((256, 512), 1), QSPECS["int4_asym"], (0,))},
        "fp8": _quantize(_w((128, 64), 2), QSPECS["fp8_e4m3"], (0,)),
        "bias": _w((256,), 3),
    }
    checkpoint.save(tmp_path / "c", tree)

    def target_leaf(x):
        s = col if x.ndim == 2 else rep
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s)

    target = jax.tree.map(target_leaf, jax.eval_shape(lambda: tree))
    assert target["q_proj"]["kernel"].scale.shape == (4, 256)  # g128 over 512 rows
    back = checkpoint.restore(tmp_path / "c", target)
    assert_identical(back, tree)
    for got, want in zip(jax.tree.leaves(back), jax.tree.leaves(target), strict=True):
        assert got.sharding == want.sharding
    codes = back["q_proj"]["kernel"].qvalue
    assert len(codes.addressable_shards) == 8
    assert codes.addressable_shards[0].data.shape == (256, 32)  # packed rows, 256 / 8 columns


def test_restore_without_target_lands_on_one_device(tmp_path):
    checkpoint.save(tmp_path / "c", {"w": _w((8, 8))})
    w = checkpoint.restore(tmp_path / "c")["w"]
    assert w.sharding == jax.sharding.SingleDeviceSharding(jax.local_devices()[0])


# --- errors --------------------------------------------------------------------------------------


def test_existing_directory_needs_force_and_force_replaces(tmp_path):
    a, b = {"w": _w((4, 4))}, {"w": _w((2,), 1), "v": jnp.ones(3)}
    checkpoint.save(tmp_path / "c", a)
    with pytest.raises(FileExistsError, match=r"already exists.*force=True"):
        checkpoint.save(tmp_path / "c", b)
    assert_identical(checkpoint.restore(tmp_path / "c"), a)
    checkpoint.save(tmp_path / "c", b, force=True)
    assert_identical(checkpoint.restore(tmp_path / "c"), b)
    with pytest.raises(ValueError, match="can't save a leaf"):  # a failing save...
        checkpoint.save(tmp_path / "c", {"w": object()}, force=True)
    assert_identical(checkpoint.restore(tmp_path / "c"), b)  # ...leaves the old one alone
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]  # no staging dirs left


def test_force_refuses_to_replace_a_non_checkpoint_directory(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "notes.txt").write_text("precious")
    with pytest.raises(ValueError, match="not a checkpoint; refusing"):
        checkpoint.save(tmp_path / "data", {"w": jnp.ones(2)}, force=True)
    assert (tmp_path / "data" / "notes.txt").read_text() == "precious"


def test_unsupported_leaf_fails_before_writing(tmp_path):
    with pytest.raises(ValueError, match=r"a/1: can't save a leaf of type object"):
        checkpoint.save(tmp_path / "c", {"a": [jnp.ones(2), object()]})
    with pytest.raises(ValueError, match="ShapeDtypeStruct is abstract"):
        checkpoint.save(tmp_path / "c", abstract({"w": jnp.ones(2)}))
    assert not (tmp_path / "c").exists()


def test_mismatched_target_names_the_first_differing_path(tmp_path):
    tree = {
        "block_0": {"attn": {"q_proj": {"kernel": _w((64, 64))}}, "mlp": {"kernel": _w((64, 8))}},
        "block_1": {"attn": {"q_proj": {"kernel": _w((64, 64))}}},
    }
    checkpoint.save(tmp_path / "c", tree)
    bad = abstract(tree)
    bad["block_0"]["attn"]["q_proj"]["kernel"] = jax.ShapeDtypeStruct((64, 32), jnp.float32)
    bad["block_1"]["attn"]["q_proj"]["kernel"] = jax.ShapeDtypeStruct((8, 8), jnp.float32)
    with pytest.raises(
        ValueError,
        match=r"^block_0/attn/q_proj/kernel: checkpoint has shape \(64, 64\), target has \(64, 32\)",
    ):
        checkpoint.restore(tmp_path / "c", bad)

    missing = abstract(tree)
    del missing["block_0"]["mlp"]
    with pytest.raises(ValueError, match=r"^block_0/mlp/kernel: the checkpoint has this leaf"):
        checkpoint.restore(tmp_path / "c", missing)
    extra = abstract(tree)
    extra["block_0"]["attn"]["k_proj"] = {"kernel": jax.ShapeDtypeStruct((64, 64), jnp.float32)}
    with pytest.raises(ValueError, match=r"^block_0/attn/k_proj/kernel: the target has this leaf"):
        checkpoint.restore(tmp_path / "c", extra)
    wrong_dtype = abstract(tree)
    wrong_dtype["block_1"]["attn"]["q_proj"]["kernel"] = jax.ShapeDtypeStruct(
        (64, 64), jnp.bfloat16
    )
    with pytest.raises(
        ValueError, match=r"block_1/attn/q_proj/kernel: checkpoint has dtype float32"
    ):
        checkpoint.restore(tmp_path / "c", wrong_dtype)


def test_mismatched_qarray_target(tmp_path):
    w = _w((256, 64))
    checkpoint.save(tmp_path / "c", {"k": _quantize(w, QSPECS["int4"], (0,))})
    g32 = abstract({"k": _quantize(w, QuantSpec(qtype="int4", group_size=32), (0,))})
    with pytest.raises(
        ValueError, match=r"^k: checkpoint QArray has group_size=128, target has 32"
    ):
        checkpoint.restore(tmp_path / "c", g32)
    with pytest.raises(ValueError, match=r"^k: checkpoint has a QArray \(int4"):
        checkpoint.restore(tmp_path / "c", {"k": jax.ShapeDtypeStruct(w.shape, w.dtype)})


def test_missing_and_foreign_directories(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"No checkpoint at {tmp_path / 'nope'}"):
        checkpoint.restore(tmp_path / "nope")
    ckptr = ocp.StandardCheckpointer()
    ckptr.save(tmp_path / "plain", {"w": np.ones(2)})
    ckptr.wait_until_finished()
    ckptr.close()
    with pytest.raises(ValueError, match="is not a jaxquant checkpoint"):
        checkpoint.restore(tmp_path / "plain")


# Orbax leaves its failed read coroutines to the garbage collector; collect them here.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("damage", ["delete", "truncate", "metadata"])
def test_corrupted_checkpoint_is_a_clear_error(tmp_path, damage):
    tree = {"w": _w((256, 256)), "q": _quantize(_w((256, 64), 1), QSPECS["int4"], (0,))}
    path = checkpoint.save(tmp_path / "c", tree)
    data = sorted(
        (
            f
            for f in (path / ARRAYS_ITEM).rglob("*")
            if f.is_file() and f.parent.name == "d"
        ),
        key=lambda f: f.stat().st_size,
    )
    assert data, "expected OCDBT data files"
    if damage == "delete":
        for f in data:
            f.unlink()
        match = r"could not read the checkpoint's arrays.*truncated or corrupted"
    elif damage == "truncate":
        biggest = data[-1]
        with open(biggest, "r+b") as fh:
            fh.truncate(biggest.stat().st_size // 2)
        match = r"could not read the checkpoint's arrays.*truncated or corrupted"
    else:
        meta = path / META_ITEM / "metadata"
        meta.write_text(meta.read_text()[:40])
        match = r"could not read the checkpoint metadata.*truncated or corrupted"
    with pytest.raises(ValueError, match=match) as info:
        checkpoint.restore(path)
    assert str(path) in str(info.value)
    del info
    gc.collect()


# --- a save killed mid-way never damages the previous checkpoint -------------------------------

# The child blocks Orbax's finalizing rename (``<dir>.orbax-checkpoint-tmp`` -> ``<dir>``), so
# the kill always lands before the commit, whichever moment the test picks.
_CHILD = textwrap.dedent(
    """
    import os, sys, time
    _rename = os.rename

    def _blocking_rename(src, dst, *a, **k):
        if ".orbax-checkpoint-tmp" in os.fspath(src):
            print("FINALIZING", flush=True)
            time.sleep(600)
        return _rename(src, dst, *a, **k)

    os.rename = _blocking_rename
    import numpy as np
    from jaxquant import checkpoint
    from jaxquant.checkpoint.manager import CheckpointManager

    where, mode = sys.argv[1], sys.argv[2]
    rng = np.random.default_rng(0)
    big = {f"w{i}": rng.standard_normal((1024, 1024), dtype=np.float32) for i in range(16)}
    print("START", flush=True)
    if mode == "manager":
        mngr = CheckpointManager(where, max_to_keep=3)
        mngr.save(2, {"w": big["w0"], "big": big})
        mngr.wait_until_finished()
    else:
        checkpoint.save(where, big, force=(mode == "replace"))
    print("DONE", flush=True)
    """
)


def run_and_kill(where: pathlib.Path, mode: str, kill_when: str) -> None:
    """Runs the child saving to ``where``; SIGKILLs it when ``kill_when`` happens."""
    env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu")
    proc = subprocess.Popen(
        [sys.executable, "-c", _CHILD, str(where), mode],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=REPO,
    )
    try:
        deadline = time.monotonic() + 120
        if kill_when == "finalizing":
            for line in proc.stdout:
                if line.strip() == "FINALIZING":
                    break
        else:  # as soon as Orbax's temporary directory holds a file: mid-write
            while not any(
                p.is_file() for tmp in where.parent.glob(f"*{TMP_SUFFIX}*") for p in tmp.rglob("*")
            ):
                assert proc.poll() is None and time.monotonic() < deadline
                time.sleep(0.005)
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()
        proc.stderr.close()


@pytest.mark.parametrize("kill_when", ["mid_write", "finalizing"])
def test_killed_replace_keeps_the_previous_checkpoint(tmp_path, kill_when):
    old = qtree("int4_asym")
    path = checkpoint.save(tmp_path / "ckpt", old)
    run_and_kill(path, "replace", kill_when)
    assert any(TMP_SUFFIX in p.name for p in tmp_path.iterdir())  # it was mid-save
    assert_identical(checkpoint.restore(path), old)
    # A later save cleans up and succeeds.
    new = {"w": _w((3, 3))}
    checkpoint.save(path, new, force=True)
    assert_identical(checkpoint.restore(path), new)
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]


def test_killed_first_save_is_not_a_checkpoint(tmp_path):
    run_and_kill(tmp_path / "fresh", "new", "mid_write")
    with pytest.raises(FileNotFoundError, match=r"unfinished save \(fresh\.orbax-checkpoint-tmp"):
        checkpoint.restore(tmp_path / "fresh")
    with pytest.raises(ValueError, match="unfinished Orbax save"):
        checkpoint.restore(tmp_path / f"fresh{TMP_SUFFIX}")
    checkpoint.save(tmp_path / "fresh", {"w": jnp.ones(2)})  # retrying works
    assert_identical(checkpoint.restore(tmp_path / "fresh"), {"w": jnp.ones(2)})


# --- the experiment ------------------------------------------------------------------------------


def test_checkpoint_sizes_experiment_smoke(tmp_path):
    spec = importlib.util.spec_from_file_location(
        "checkpoint_sizes", REPO / "experiments" / "checkpoint_sizes.py"
    )
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses resolve annotations through sys.modules
    try:
        spec.loader.exec_module(mod)
    finally:
        del sys.modules[spec.name]
    tiny = mod.Shapes(
        n_layers=1, d_model=96, n_heads=2, n_kv_heads=1, head_dim=48, d_ff=256, vocab=256
    )
    mod.RECIPES = {k: mod.RECIPES[k] for k in ("f32", "int4 g128")}
    rows = mod.measure(tiny, tmp_path)
    assert [r["recipe"] for r in rows] == ["f32", "int4 g128", "int4 g128"]
    assert rows[0]["ratio_vs_f32"] == 1.0
    assert rows[2]["disk_bytes"] < rows[1]["disk_bytes"] < rows[0]["disk_bytes"]
    assert rows[1]["group_sizes_used"] == {"32": 6, "128": 1}  # 96 = 3 x 32; 256 % 128 == 0
    assert isinstance(rows[0]["bits_per_param"], float) and "| f32 |" in mod.table(rows)


def test_public_names():
    assert checkpoint.__all__ == [
        "FORMAT",
        "FORMAT_VERSION",
        "CheckpointManager",
        "metadata",
        "restore",
        "save",
    ]
    for name in ("CheckpointManager", "metadata", "restore", "save"):
        assert callable(getattr(checkpoint, name))
