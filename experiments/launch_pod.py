"""Sharded QAT steps and a checkpoint written by every process: one host, several, or a TPU pod.

Every process runs the same command. It joins the others (``jax.distributed.initialize``:
with ``--coordinator`` on CPU / GPU hosts, from the environment on a TPU pod), builds one
global mesh over all devices, runs ``--steps`` QAT steps (int4 weights, groups of 32) of a
Transformer with the state sharded FSDP x tensor parallel, saves the training state with
``jaxquant.checkpoint.save`` (each process writes its own shards), restores it onto the same
shardings and checks every shard it holds bit for bit. Process 0 writes ``--json``.

TPU pod (every worker; nothing to configure, the pod is found)::

    gcloud compute tpus tpu-vm ssh $TPU --worker=all --command \\
      "cd jaxquant && python experiments/launch_pod.py --mesh data=4,fsdp=4,tensor=2 \\
       --model small --out /tmp/pod-run --json experiments/results/launch_pod.json"

Two processes on this machine, 4 fake CPU devices each (what tests/scale/test_multiprocess.py
runs)::

    for i in 0 1; do XLA_FLAGS=--xla_force_host_platform_device_count=4 JAX_PLATFORMS=cpu \\
      python experiments/launch_pod.py --mesh fsdp=4,tensor=2 --coordinator localhost:12355 \\
      --num-processes 2 --process-id $i --out /tmp/run --json /tmp/run.json & done; wait

Step time on fake CPU devices says nothing about scaling; the JSON records losses, bytes per
device and whether the checkpoint round trip held.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mesh", required=True, help="e.g. fsdp=4,tensor=2 (product = all devices)")
    p.add_argument("--coordinator", help="HOST:PORT of process 0 (not on a TPU pod)")
    p.add_argument("--num-processes", type=int)
    p.add_argument("--process-id", type=int)
    p.add_argument("--model", choices=["tiny", "small"], default="tiny",
                   help="tiny: TransformerConfig.tiny(); small: d_model 512, 8 layers")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="checkpoint directory (shared by all processes)")
    p.add_argument("--json", help="result JSON (process 0 writes it)")
    return p.parse_args(argv)


def batches(steps: int, batch_size: int, seq_len: int, vocab: int, seed: int):
    """The global batches, the same on every process (shifted windows of one random text)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    text = rng.integers(0, vocab, 4 * seq_len)
    return [np.stack([text[s:s + seq_len] for s in rng.integers(0, 3 * seq_len, batch_size)])
            .astype(np.int32) for _ in range(steps)]


def model_config(name: str):
    import jaxquant as jq
    from jaxquant.nn import TransformerConfig

    cfg = TransformerConfig.tiny() if name == "tiny" else TransformerConfig.tiny(
        vocab_size=4096, d_model=512, n_layers=8, n_heads=8, n_kv_heads=4, head_dim=64,
        ffn_dim=1536, max_seq_len=512)
    return cfg.with_quantization(jq.weight_only("int4", group_size=32))


def run(mesh, *, model: str = "tiny", steps: int = 4, batch_size: int = 8, seq_len: int = 32,
        seed: int = 0, out: str | Path) -> dict:
    """QAT steps on ``mesh`` and a checkpoint round trip; the result dict (every process)."""
    import jax
    import numpy as np

    from jaxquant import checkpoint
    from jaxquant.nn import Transformer
    from jaxquant.train import init_train_state, make_optimizer, make_train_step
    from jaxquant.train.sharding import compile_step, memory_report, place_batch, shard_train_step

    cfg = model_config(model)
    net = Transformer(cfg)
    opt = make_optimizer(learning_rate=1e-2, warmup_steps=1, total_steps=max(2, steps))
    data = batches(steps, batch_size, seq_len, cfg.vocab_size, seed)
    state = init_train_state(net, opt, jax.random.key(seed), data[0])  # same on every process
    state, step = shard_train_step(make_train_step(net, opt, jit=False), state, mesh)
    compiled = compile_step(step, state, data[0])
    memory = memory_report(compiled, state)
    losses, t0 = [], time.perf_counter()
    for b in data:
        state, metrics = compiled(state, place_batch(b, mesh))
        losses.append(float(metrics["loss"]))
    seconds = time.perf_counter() - t0
    path = Path(out).absolute() / "state"
    checkpoint.save(path, state)
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                          state)
    restored = checkpoint.restore(path, target)
    same = all(
        np.array_equal(np.asarray(a.data), np.asarray(b.data))
        for x, y in zip(jax.tree.leaves(state), jax.tree.leaves(restored), strict=True)
        for a, b in zip(x.addressable_shards, y.addressable_shards, strict=True))
    kernel = state.params["block_0"]["mlp"]["up_proj"]["kernel"]
    return {
        "mesh": dict(mesh.shape), "processes": jax.process_count(),
        "process_index": jax.process_index(), "devices": jax.device_count(),
        "local_devices": jax.local_device_count(), "model": model, "steps": steps,
        "losses": losses, "checkpoint": str(path), "checkpoint_bit_identical": bool(same),
        "kernel_spec": [e if e is None or isinstance(e, str) else list(e)
                        for e in kernel.sharding.spec], "memory": memory,
        "state_fraction_per_device": memory["state_bytes_per_device"]
        / memory["state_bytes_total"],
        "step_seconds_not_a_scaling_result": seconds / max(1, steps),
    }


def main(argv=None) -> int:
    args = parse_args(argv)
    from jaxquant.eval import scale as sc

    scale = sc.setup(args)  # joins the processes (or the pod), builds the global mesh
    result = run(scale.mesh, model=args.model, steps=args.steps, batch_size=args.batch_size,
                 seq_len=args.seq_len, seed=args.seed, out=args.out)
    from jaxquant.eval.tasks import environment

    result["environment"] = environment()
    print(f"process {result['process_index']}/{result['processes']}: losses "
          f"{[round(v, 4) for v in result['losses']]}, checkpoint bit-identical: "
          f"{result['checkpoint_bit_identical']}, state per device "
          f"{result['state_fraction_per_device']:.3f} of the whole", flush=True)
    scale.write_json(args.json, result)
    return 0 if result["checkpoint_bit_identical"] else 1


if __name__ == "__main__":
    sys.exit(main())
