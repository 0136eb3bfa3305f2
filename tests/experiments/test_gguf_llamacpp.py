"""experiments/gguf_llamacpp.py: its log-prob helper, and (slow, needs the ``llama`` extra)
llama.cpp itself reading jaxquant's exported files of a tiny model."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

from tests.experiments.helpers import load_experiment
from tests.models.test_gguf_export import write_source_gguf


@pytest.fixture(scope="module")
def experiment():
    return load_experiment("gguf_llamacpp")


def test_log_softmax_targets_matches_jax(experiment):
    logits = np.asarray(jax.random.normal(jax.random.key(0), (7, 50)), np.float32) * 30
    targets = np.arange(7) * 3
    want = np.asarray(jax.nn.log_softmax(logits.astype(np.float64), axis=-1))[np.arange(7),
                                                                             targets]
    np.testing.assert_allclose(experiment.log_softmax_targets(logits, targets), want, rtol=1e-6)


@pytest.mark.slow
def test_llama_cpp_reads_the_export_and_agrees(experiment, tmp_path):
    pytest.importorskip("llama_cpp")
    src = tmp_path / "tiny.gguf"
    write_source_gguf(src)
    out = tmp_path / "r.json"
    experiment.main(["--model", str(src), "--recipes", "rtn:q4_0,rtn:q4_1,rtn:q8_0",
                     "--llama-types", "Q4_0", "--max-tokens", "512", "--seq-len", "128",
                     "--no-speed", "--work", str(tmp_path), "--json", str(out)])
    rows = {r["name"]: r for r in json.loads(out.read_text())["rows"]}
    # F32 weights: only float summation order differs.
    assert rows["jaxquant fp32 exported F32"]["logprob_max_abs_diff"] < 1e-2
    for name in ("jaxquant rtn:q4_0", "jaxquant rtn:q4_1", "jaxquant rtn:q8_0"):
        # llama.cpp rounds activations to 8 bits (Q8_0/Q8_1 blocks) inside its quantized
        # matmuls, jaxquant keeps them float: the 0.5% perplexity budget.
        assert abs(rows[name]["ppl_rel_diff"]) < 5e-3, rows[name]
        assert rows[name]["types"].get(name[-4:].upper()) == 14  # every block kernel
