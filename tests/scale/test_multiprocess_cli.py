"""``jaxquant ptq | eval | finetune`` as 2 OS processes on localhost (``--coordinator``,
``jax.distributed`` with gloo CPU collectives, 2 fake CPU devices each, one global 4-device
mesh): the same results as one process, only process 0 writes ``--json`` and the shared
files, no process crashes or hangs (each run is killed after ``TIMEOUT_S``).

Plus the process-0-only writes with a faked process index (no subprocesses)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from jaxquant import checkpoint, cli
from jaxquant.checkpoint import primary
from jaxquant.core import QArray
from jaxquant.errors import JaxquantError
from jaxquant.eval import finetune as ft
from jaxquant.models import saved
from jaxquant.nn.config import TransformerConfig

ROOT = Path(__file__).resolve().parents[2]
TIMEOUT_S = 240
MESH = ("--mesh", "fsdp=2,tensor=2")  # fsdp across the two processes, tensor inside each
EV = ("--max-tokens", "1024", "--seq-len", "64", "--batch-size", "4")
RTN = ("--model", "tiny", "--method", "rtn", "--qtype", "int4", "--group-size", "32")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def run_two(workdir: Path, *argv: str, devices: int = 2) -> tuple[dict, list[str]]:
    """Runs ``jaxquant ARGV --json workdir/result.json`` as processes 0 and 1; returns the JSON
    and both logs. Fails (never hangs) when a process fails or outlives ``TIMEOUT_S``."""
    workdir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
           "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    port, procs, codes = _free_port(), [], []
    json_path = workdir / "result.json"
    try:
        for i in range(2):
            cmd = [sys.executable, "-m", "jaxquant.cli", *argv, "--json", str(json_path),
                   "--coordinator", f"localhost:{port}", "--num-processes", "2",
                   "--process-id", str(i)]
            log = open(workdir / f"p{i}.log", "w")  # noqa: SIM115  (closed with the process)
            procs.append((subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                           cwd=ROOT), log))
        for p, _ in procs:
            try:
                codes.append(p.wait(timeout=TIMEOUT_S))
            except subprocess.TimeoutExpired:
                codes.append("hung")
                break
    finally:
        for p, log in procs:  # SIGKILL: JAX catches SIGTERM (its preemption notifier)
            if p.poll() is None:
                p.kill()
                p.wait()
            log.close()
    logs = [(workdir / f"p{i}.log").read_text() for i in range(2)]
    assert codes == [0, 0], "\n".join(f"--- process {i} ---\n{t[-3000:]}"
                                      for i, t in enumerate(logs))
    # Only process 0 writes --json (each prints "wrote PATH" when it does).
    assert f"wrote {json_path}" in logs[0] and "wrote " not in logs[1], logs[1][-2000:]
    return json.loads(json_path.read_text()), logs


def _one(tmp_path: Path, name: str, *argv: str) -> dict:
    """The same command in this process, on one device (no mesh)."""
    out = tmp_path / f"{name}.json"
    assert cli.main([*argv, "--json", str(out)]) == 0
    return json.loads(out.read_text())


_is_q = lambda x: isinstance(x, QArray)  # noqa: E731


def assert_same_quantized(a, b, *, max_code_frac: float = 0.0, max_steps: int = 0) -> None:
    """``b`` equals ``a``: float leaves and QArray scales to float precision, codes exactly
    except a fraction ``max_code_frac`` of them (over all kernels) that may be up to
    ``max_steps`` quantization steps apart."""
    pairs = list(zip(jax.tree.leaves(a, is_leaf=_is_q), jax.tree.leaves(b, is_leaf=_is_q),
                     strict=True))
    n_codes, n_diff = 0, 0
    for x, y in pairs:
        if not _is_q(x):
            np.testing.assert_allclose(np.asarray(y), np.asarray(x), rtol=1e-5, atol=1e-7)
            continue
        np.testing.assert_allclose(np.asarray(y.scale), np.asarray(x.scale), rtol=1e-5)
        cx, cy = np.asarray(x.codes(), np.int32), np.asarray(y.codes(), np.int32)
        assert np.abs(cx - cy).max(initial=0) <= max_steps
        n_codes, n_diff = n_codes + cx.size, n_diff + int((cx != cy).sum())
    assert n_codes > 0 and n_diff <= max_code_frac * n_codes, (n_diff, n_codes)


@pytest.fixture(scope="module")
def rtn_two(tmp_path_factory):
    """``jaxquant ptq rtn:int4:g32 --out`` written by 2 processes."""
    d = tmp_path_factory.mktemp("ptq2")
    result, logs = run_two(d, "ptq", *RTN, *MESH, "--out", str(d / "ck"))
    return d, result, logs


def test_two_process_ptq_writes_one_checkpoint_equal_to_one_process(rtn_two, tmp_path):
    """The Orbax params are written by both processes into one staging folder, the sidecar and
    the swap by process 0: one finished checkpoint, no staging leftovers, and RTN's codes and
    scales equal the one-process run's (RTN is elementwise: no tolerance on the codes)."""
    d, result, logs = rtn_two
    assert result["scale"] == {"mesh": {"data": 1, "fsdp": 2, "tensor": 2}, "devices": 4,
                               "processes": 2}
    assert all(f"saved rtn:int4:g32 checkpoint to {d / 'ck'}" in t for t in logs)
    assert sorted(p.name for p in d.iterdir() if p.name.startswith("ck")) == ["ck"]
    assert sorted(p.name for p in (d / "ck").iterdir()) == ["jaxquant.json", "params"]
    _one(tmp_path, "one", "ptq", *RTN, "--out", str(tmp_path / "ck"))
    one_cfg, one, _ = saved.load_quantized(tmp_path / "ck")
    two_cfg, two, side = saved.load_quantized(d / "ck")
    assert two_cfg == one_cfg and side["info"]["scale"]["processes"] == 2
    assert_same_quantized(one, two)


@pytest.mark.slow  # 2 fresh JAX processes, 2 perplexity runs: ~40 s of CPU
def test_two_process_eval_of_the_checkpoint_equals_one_process(rtn_two, tmp_path):
    """The windows split over the processes' devices, the per-window losses gathered
    (``process_allgather``): the perplexity of the 2-process checkpoint, on PTB and a held-out
    set, equals one process quantizing on the fly with the same recipe."""
    d, _, _ = rtn_two
    two, _ = run_two(tmp_path / "ev", "eval", *EV, "--heldout", "shakespeare", *MESH,
                     "--checkpoint", str(d / "ck"))
    one = _one(tmp_path, "one", "eval", "--model", "tiny", *EV, "--heldout", "shakespeare",
               "--quant", "rtn:int4:g32")
    assert two["scale"]["processes"] == 2 and two["tokens_scored"] == one["tokens_scored"] > 0
    assert two["perplexity"] == pytest.approx(one["perplexity"], rel=1e-5)
    assert two["heldout"]["shakespeare"] == pytest.approx(one["heldout"]["shakespeare"],
                                                          rel=1e-5)


GPTQ = ("--model", "tiny", "--method", "gptq", "--qtype", "int4", "--group-size", "32",
        "--calib-windows", "8", "--calib-len", "64")


@pytest.mark.slow  # GPTQ of the tiny model in 2 processes and in one: ~1.5 min of CPU
def test_two_process_gptq_equals_one_process(tmp_path):
    """Calibration windows split over the processes, the Hessians summed across them by XLA:
    the same GPTQ model as one process.

    Block 0's q/k/v see the same float inputs in both runs: the same codes up to the rare one
    a reassociated Hessian sum moves by one step. Later layers calibrate on the outputs of
    already quantized ones, and GPTQ feeds each rounding error into the next columns, so one
    flipped code can move a few more (measured: 0.9% of all codes, at most 2 steps). A wrong
    calibration set (another seed, or half of the windows, as a process that summed only its
    own Hessians would use) changes 20-35% of the codes of every layer: the 5% bound below
    catches it."""
    two, _ = run_two(tmp_path / "two", "ptq", *GPTQ, "--mesh", "data=2,tensor=2",
                     "--out", str(tmp_path / "two" / "ck"))
    _one(tmp_path, "one", "ptq", *GPTQ, "--out", str(tmp_path / "one"))
    assert two["calibration"]["windows"] == 8
    one, two = (saved.load_quantized(p)[1] for p in (tmp_path / "one", tmp_path / "two" / "ck"))
    first = lambda p: {k: p["block_0"]["attn"][k] for k in ("q_proj", "k_proj", "v_proj")}
    assert_same_quantized(first(one), first(two), max_code_frac=1e-3, max_steps=1)
    assert_same_quantized(one, two, max_code_frac=0.05, max_steps=3)


FT = ("finetune", "--model", "tiny", "--method", "qat:int4:g32", "--steps", "4",
      "--batch-size", "4", "--seq-len", "32", "--lr", "3e-3", "--warmup", "1",
      "--max-tokens", "512", "--eval-seq-len", "64", "--checkpoint-every", "2")


@pytest.mark.slow  # QAT in 2 processes (compile, 4 steps, 2 checkpoints, convert, eval): ~1 min
def test_two_process_finetune_equals_one_process(tmp_path):
    """QAT with the state sharded over both processes: the loss curve and the served model's
    perplexity equal one process's; the training checkpoints (Orbax, every process), run.json,
    the serving checkpoint and the plot (process 0) are all there once."""
    two, logs = run_two(tmp_path / "two", *FT, *MESH, "--out", str(tmp_path / "two" / "run"))
    one = _one(tmp_path, "one", *FT, "--out", str(tmp_path / "one"))
    np.testing.assert_allclose(two["loss_curve"], one["loss_curve"], rtol=1e-5)
    assert two["perplexity"] == pytest.approx(one["perplexity"], rel=1e-4)
    run = tmp_path / "two" / "run"
    assert sorted(p.name for p in run.iterdir()) == ["jaxquant.json", "params", "train"]
    assert sorted(p.name for p in (run / "train").iterdir()) == ["2", "4", "run.json"]
    assert (tmp_path / "two" / "result.png").is_file() and two["plot"].endswith("result.png")
    assert_same_quantized(saved.load_quantized(tmp_path / "one")[1],
                          saved.load_quantized(run)[1], max_code_frac=1e-3, max_steps=1)


@pytest.mark.slow  # QAT in one process, then resumed in 2: ~1.5 min
def test_two_processes_resume_a_one_process_run(tmp_path):
    """A run that one process stopped after step 2 (its step-4 checkpoint and serving model
    removed) resumes in 2 processes onto the mesh (each restores its shards): steps 3 and 4
    give the uninterrupted run's losses."""
    one = _one(tmp_path, "one", *FT, "--out", str(tmp_path / "one"))
    cut = tmp_path / "cut"
    shutil.copytree(tmp_path / "one", cut)
    shutil.rmtree(cut / "train" / "4")
    shutil.rmtree(cut / "params")
    (cut / "jaxquant.json").unlink()
    two, _ = run_two(tmp_path / "two", *FT, *MESH, "--out", str(cut), "--resume")
    assert two["resumed_from"] == 2
    np.testing.assert_allclose(two["loss_curve"], one["loss_curve"], rtol=1e-5)
    assert two["perplexity"] == pytest.approx(one["perplexity"], rel=1e-4)


# --- process 0 only, with a faked process index ---------------------------------------------


@pytest.fixture
def process_1(monkeypatch):
    """This process plays process 1 of 2; the broadcast returns ``told["failed"]`` (process
    0's verdict) and counts the collectives."""
    told = {"failed": 0, "calls": 0}

    def broadcast(values):
        told["calls"] += 1
        return np.int32(told["failed"]) if np.ndim(values) == 0 else np.asarray(values)

    monkeypatch.setattr(primary.jax, "process_index", lambda: 1)
    monkeypatch.setattr(primary.jax, "process_count", lambda: 2)
    monkeypatch.setattr(primary, "_broadcast", broadcast)
    return told


def test_on_primary_runs_only_on_process_0_and_reports_its_failure(process_1):
    ran = []
    assert primary.on_primary(lambda: ran.append(1), "writing x") is None
    assert ran == [] and process_1["calls"] == 1  # waited for process 0, did not write
    process_1["failed"] = 1
    with pytest.raises(JaxquantError, match="writing x failed on process 0"):
        primary.on_primary(lambda: ran.append(1), "writing x")
    assert ran == []


def test_save_quantized_on_process_1_writes_only_its_shards(process_1, tmp_path, monkeypatch):
    """Process 1 writes the params (its shards, through Orbax) into the agreed staging folder,
    but neither the sidecar nor the rename: those are process 0's."""
    written = []

    def fake_save(path, tree):  # Orbax's part, every process
        written.append(Path(path))
        Path(path).mkdir(parents=True)

    monkeypatch.setattr(saved.checkpoint, "save", fake_save)
    out = tmp_path / "ck"
    saved.save_quantized(out, TransformerConfig.tiny(), {}, {"recipe": "rtn:int4"})
    assert not out.exists()  # process 0 renames the staging folder into place
    (staging,) = [p for p in tmp_path.iterdir()]
    assert written == [staging / "params"] and staging.name.startswith("ck.jaxquant-new-")
    assert sorted(p.name for p in staging.iterdir()) == ["params"]  # no sidecar from process 1


def test_finetune_plot_only_on_process_0(process_1, tmp_path):
    result = {"loss_curve": [3.0, 2.0], "model": "tiny", "method": "float", "dataset": "ptb",
              "out": str(tmp_path)}
    png = ft.write_plot(result, tmp_path / "r.json")
    assert result["plot"] == str(png) and not png.exists()


def test_agreed_token_is_process_0s(monkeypatch):
    """Every process names the staging folder with process 0's token."""
    monkeypatch.setattr(primary.jax, "process_count", lambda: 2)
    monkeypatch.setattr(primary, "_broadcast", lambda v: np.array([0xDEADBEEF, 7], np.uint32))
    assert primary.agreed_token() == "deadbeef00000007"
    monkeypatch.setattr(primary.jax, "process_count", lambda: 1)
    assert len({primary.agreed_token() for _ in range(3)}) == 3


def test_checkpoint_round_trip_unaffected_on_one_process(tmp_path):
    """One process: on_primary is a plain call; the save is the usual atomic one."""
    params = {"w": np.arange(6, dtype=np.float32).reshape(2, 3)}
    saved.save_quantized(tmp_path / "ck", TransformerConfig.tiny(), params, {"recipe": "fp32"})
    restored = checkpoint.restore(tmp_path / "ck" / "params")
    np.testing.assert_array_equal(np.asarray(restored["w"]), params["w"])


def test_forced_checkpoint_save_on_process_1_leaves_the_swap_to_process_0(process_1, tmp_path,
                                                                          monkeypatch):
    """``checkpoint.save(force=True)`` with several processes (e.g. a (Q)LoRA run's adapters
    saved again on --resume): process 1 writes its shards into the agreed staging folder and
    neither deletes nor renames anything."""
    from jaxquant.checkpoint import store
    from jaxquant.checkpoint.tree_codec import META_ITEM

    existing = tmp_path / "adapters"
    (existing / META_ITEM).mkdir(parents=True)
    monkeypatch.setattr(store, "_write", lambda path, arrays, meta: path.mkdir())
    store.save(existing, {"w": np.zeros(3, np.float32)}, force=True)
    assert (existing / META_ITEM).is_dir()  # the old one stays until process 0 swaps
    (staging,) = [p for p in tmp_path.iterdir() if p != existing]
    assert staging.name.startswith("adapters.jaxquant-new-") and process_1["calls"] == 3
