"""Two OS processes on localhost, 4 fake CPU devices each, one global 8-device mesh
(``jax.distributed`` with gloo collectives): sharded QAT steps and a checkpoint written by
both processes (experiments/launch_pod.py, unchanged from what a TPU pod runs)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from jaxquant.nn.mesh import make_mesh
from tests.experiments.helpers import load_experiment

ROOT = Path(__file__).resolve().parents[2]
TIMEOUT_S = 300
ARGS = ("--mesh", "fsdp=4,tensor=2", "--steps", "3", "--batch-size", "8", "--seq-len", "16")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    out = tmp_path_factory.mktemp("pod")
    env = {**os.environ, "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
           "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    port = _free_port()
    procs = []
    try:
        for i in range(2):
            cmd = [sys.executable, str(ROOT / "experiments" / "launch_pod.py"), *ARGS,
                   "--coordinator", f"localhost:{port}", "--num-processes", "2",
                   "--process-id", str(i), "--out", str(out / "run"),
                   "--json", str(out / "result.json")]
            log = open(out / f"p{i}.log", "w")  # noqa: SIM115  (closed with the process)
            procs.append((subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                           cwd=ROOT), log))
        codes = [p.wait(timeout=TIMEOUT_S) for p, _ in procs]
    finally:
        for p, log in procs:  # always: a hung collective must not outlive the test
            if p.poll() is None:
                p.kill()
                p.wait()
            log.close()
    logs = [(out / f"p{i}.log").read_text() for i in range(2)]
    assert codes == [0, 0], "\n".join(f"--- process {i} ---\n{t[-3000:]}"
                                      for i, t in enumerate(logs))
    return out, logs


@pytest.mark.slow  # two fresh JAX processes compiling the step: ~1 min of CPU
def test_two_processes_train_and_checkpoint_together(two_processes):
    out, logs = two_processes
    result = json.loads((out / "result.json").read_text())
    assert result["process_index"] == 0  # only process 0 writes --json
    assert (result["processes"], result["devices"], result["local_devices"]) == (2, 8, 4)
    assert result["checkpoint_bit_identical"]
    assert all("checkpoint bit-identical: True" in t for t in logs)  # both processes checked
    assert result["kernel_spec"] == ["fsdp", "tensor"]
    assert 0.125 <= result["state_fraction_per_device"] < 0.14
    # The same steps on one device of this process: the same losses.
    pod = load_experiment("launch_pod")
    one = pod.run(make_mesh("data=1", devices=jax.devices()[:1]), steps=3, batch_size=8,
                  seq_len=16, out=out / "one")
    np.testing.assert_allclose(result["losses"], one["losses"], rtol=1e-5)
