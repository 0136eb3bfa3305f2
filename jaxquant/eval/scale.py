"""The command line's scale flags: a device mesh, several processes, and sharded jobs.

``jaxquant ptq | eval | finetune`` take ``--mesh data=2,fsdp=2,tensor=2`` (see
:func:`jaxquant.nn.mesh.make_mesh`) and, for several processes, ``--coordinator HOST:PORT
--num-processes N --process-id I`` (:func:`jax.distributed.initialize`; on a TPU pod none of
them: the pod is found from its environment). Every process runs the same command line; only
process 0 writes ``--json`` and the files the run shares (the checkpoint's sidecar and its
renames, ``run.json``, the loss plot), and the others wait for those
(:mod:`jaxquant.checkpoint.primary`); Orbax array checkpoints are written by every process,
each its own shards. Two processes on one machine (gloo CPU collectives; what
``tests/scale/test_multiprocess_cli.py`` runs)::

    for i in 0 1; do XLA_FLAGS=--xla_force_host_platform_device_count=2 JAX_PLATFORMS=cpu \\
      jaxquant ptq --model tiny --method gptq --mesh data=2,tensor=2 --out /tmp/q --json \\
      /tmp/q.json --coordinator localhost:12355 --num-processes 2 --process-id $i & done; wait

What runs sharded, all through ``jax.jit`` and XLA's SPMD partitioner (no hand-written
communication):

* eval: the params (float or serving QArrays) placed by the logical axis rules, each batch of
  windows split over ``data`` x ``fsdp``; the per-window losses are gathered to every process.
* ptq: the float params sharded the same way and the calibration windows split over the batch
  axes, so the statistics (GPTQ Hessians, AWQ / SmoothQuant abs-means) reduce across them
  inside XLA.
* finetune: the training state (params and optimizer state) and each batch; see
  :func:`sharded_method`.

Example::

    scale = setup(args)                     # first thing: before any other JAX call
    model = scale.shard_model(load("tiny"))
    result = evaluate(model, scale, dataset="ptb")
    scale.write_json(args.json, result)
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh

from jaxquant.nn.mesh import (
    batch_sharding,
    make_mesh,
    parse_mesh_spec,
    place,
    replicated,
    shard_params,
)

# The jobs' modules load on first use, so the command line's parser stays light.
LoadedModel = Any

__all__ = [
    "Scale",
    "add_scale_args",
    "evaluate",
    "evaluate_checkpoint",
    "evaluate_params",
    "initialize",
    "quantize",
    "setup",
    "sharded_method",
]


def add_scale_args(parser) -> None:
    """Adds ``--mesh``, ``--coordinator``, ``--num-processes``, ``--process-id``."""
    g = parser.add_argument_group("scale (sharding over devices and processes)")
    g.add_argument("--mesh", help="device mesh, e.g. data=2,fsdp=2,tensor=2 (axes data, fsdp, "
                                  "tensor; the sizes multiply to the number of devices)")
    g.add_argument("--coordinator", help="HOST:PORT of process 0, for a multi-process run "
                                         "(on a TPU pod leave it out: the pod is found)")
    g.add_argument("--num-processes", type=int, help="processes in the run (with --coordinator)")
    g.add_argument("--process-id", type=int, help="this process's index, 0..N-1")


def _on_pod() -> bool:
    """A multi-host TPU slice (its workers are listed in the environment)."""
    hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
    return len([h for h in hosts.split(",") if h.strip()]) > 1


def initialize(coordinator: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> None:
    """``jax.distributed.initialize`` for a multi-process run (a no-op for one process).

    With a coordinator, all three are needed; with none on a multi-host TPU slice,
    ``jax.distributed.initialize()`` finds the pod. On CPU the collectives go through gloo.
    Call it before anything else touches JAX's devices.

    Raises:
      ValueError: some but not all of the three given, or a process id out of range.
    """
    given = [v is not None for v in (coordinator, num_processes, process_id)]
    if any(given) and not all(given):
        raise ValueError("--coordinator, --num-processes and --process-id go together: give "
                         "all three (every process the same coordinator and count, its own id), "
                         "or none for one process (or a TPU pod, which is found by itself).")
    if all(given):
        if ":" not in coordinator:
            raise ValueError(f"--coordinator {coordinator!r}: write HOST:PORT, e.g. "
                             "10.0.0.1:1234 (process 0's address).")
        if num_processes < 1 or not 0 <= process_id < num_processes:
            raise ValueError(f"--process-id must be in 0..{num_processes - 1} and "
                             f"--num-processes >= 1; got {process_id} of {num_processes}.")
        if num_processes == 1:
            return
        _cpu_collectives()
        jax.distributed.initialize(coordinator_address=coordinator,
                                   num_processes=num_processes, process_id=process_id)
    elif _on_pod():
        jax.distributed.initialize()


def _cpu_collectives() -> None:
    """CPU devices of several processes talk through gloo (where this JAX has the option)."""
    platforms = os.environ.get("JAX_PLATFORMS", "") or str(jax.config.jax_platforms or "")
    if platforms.split(",")[0] in ("cpu", "") and hasattr(jax.config,
                                                         "jax_cpu_collectives_implementation"):
        try:
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
        except Exception:  # noqa: BLE001  (an older spelling of the option; the default stays)
            pass


@dataclasses.dataclass(frozen=True)
class Scale:
    """Where a command runs: the mesh (None: one device) and this process's place.

    Attributes:
      mesh: the device mesh, or None.
      process_index: this process (0 writes the results).
      process_count: processes in the run.
    """

    mesh: Mesh | None
    process_index: int = 0
    process_count: int = 1

    @property
    def writer(self) -> bool:
        """Whether this process writes ``--json`` (process 0)."""
        return self.process_index == 0

    @property
    def batch_shards(self) -> int:
        """Into how many parts a batch is split: ``data`` x ``fsdp`` (1 without a mesh)."""
        if self.mesh is None:
            return 1
        return int(np.prod([self.mesh.shape[a] for a in ("data", "fsdp")]))

    def describe(self) -> dict[str, Any]:
        """What goes into the result JSON."""
        return {"mesh": None if self.mesh is None else dict(self.mesh.shape),
                "devices": jax.device_count(), "processes": self.process_count}

    def shard(self, params: Any) -> Any:
        """``params`` placed on the mesh by the logical rules (an axis that does not divide is
        replicated: results never depend on it), or as they are without a mesh."""
        if self.mesh is None:
            return params
        return shard_params(params, self.mesh, strict=False)

    def place_calibration(self, params: Any, calib: np.ndarray | None) -> tuple[Any, Any]:
        """``params`` sharded by the rules and the calibration windows ``[windows, length]``
        split over the batch axes ``data`` x ``fsdp`` (replicated when their number does not
        divide): the placement hook of :func:`jaxquant.eval.tasks.quantize`."""
        params = self.shard(params)
        if calib is None or self.mesh is None:
            return params, calib
        sharding = (batch_sharding(self.mesh, 2) if len(calib) % self.batch_shards == 0
                    else replicated(self.mesh))
        return params, place(np.asarray(calib, np.int32), sharding)

    def shard_model(self, model: LoadedModel) -> LoadedModel:
        """``model`` with its params on the mesh."""
        return dataclasses.replace(model, params=self.shard(model.params))

    def write_json(self, path: str | None, result: dict) -> None:
        """Writes ``result`` to ``path`` on process 0 only."""
        if path and self.writer:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            Path(path).write_text(json.dumps(result, indent=2, default=str))
            print(f"wrote {path}")


def setup(args) -> Scale:
    """From the parsed flags: join the processes, build the mesh.

    Without ``--mesh`` one process runs on one device as before; several processes without a
    mesh get ``data=<all devices>``.
    """
    initialize(getattr(args, "coordinator", None), getattr(args, "num_processes", None),
               getattr(args, "process_id", None))
    spec = getattr(args, "mesh", None)
    if spec is not None:
        parse_mesh_spec(spec)  # syntax errors before the device count
    elif jax.process_count() > 1:
        spec = f"data={jax.device_count()}"
    mesh = make_mesh(spec) if spec is not None else None
    return Scale(mesh, jax.process_index(), jax.process_count())


def _batch_constrained(apply_fn, scale: Scale, batch_size: int):
    if scale.mesh is None:
        return apply_fn
    sharding = batch_sharding(scale.mesh, 2)
    n = scale.batch_shards
    if batch_size % n:
        raise ValueError(f"--batch-size {batch_size} does not split over the mesh's batch "
                         f"axes data x fsdp = {n}; use a multiple of {n}.")

    def constrained(params, tokens):
        return apply_fn(params, jax.lax.with_sharding_constraint(tokens, sharding))

    return constrained


def evaluate_params(cfg, params, tokens: np.ndarray, scale: Scale, *, seq_len: int = 2048,
                    stride: int | None = None, max_tokens: int | None = None,
                    batch_size: int = 1, progress: bool = True) -> dict[str, Any]:
    """:func:`jaxquant.eval.tasks.evaluate_params` on the mesh: params sharded by the rules,
    each batch of windows split over ``data`` x ``fsdp``."""
    from jaxquant.eval.perplexity import perplexity
    from jaxquant.nn.modes import QuantMode
    from jaxquant.nn.transformer import Transformer

    mode = QuantMode.SERVE if cfg.quant_rules else QuantMode.TRAIN
    model = Transformer(cfg, mode=mode)
    apply_fn = _batch_constrained(lambda p, t: model.apply({"params": p}, t), scale, batch_size)
    res = perplexity(apply_fn, scale.shard(params), tokens, seq_len=min(seq_len, cfg.max_seq_len),
                     stride=stride, max_tokens=max_tokens, batch_size=batch_size,
                     progress=progress and scale.writer)
    return res.to_dict()


def quantize(model: LoadedModel, recipe, scale: Scale, *, dataset: str = "ptb",
             calib_data: str | None = None, calib_windows: int = 128, calib_len: int = 512,
             seed: int = 0, options=None, progress: bool = True):
    """:func:`jaxquant.eval.tasks.quantize` on the mesh: the float params sharded by the rules,
    the calibration windows split over the batch axes (``data`` x ``fsdp``; when their number
    divides), so each block's statistics are reduced across devices by XLA.

    Returns:
      ``(serve_cfg, serve_params, info)`` as :func:`~jaxquant.eval.tasks.quantize`.
    """
    from jaxquant.eval import tasks

    return tasks.quantize(model, recipe, dataset=dataset, calib_data=calib_data,
                          calib_windows=calib_windows, calib_len=calib_len, seed=seed,
                          options=options, progress=progress and scale.writer,
                          place=None if scale.mesh is None else scale.place_calibration)


def evaluate(model: LoadedModel, scale: Scale, *, dataset: str = "ptb", split: str = "test",
             recipe=None, heldout: tuple[str, ...] = (), calib_data: str | None = None,
             calib_windows: int = 128, calib_len: int = 512, seed: int = 0,
             progress: bool = True, **ppl) -> dict[str, Any]:
    """:func:`jaxquant.eval.tasks.evaluate` on the mesh (``scale.mesh`` None: the same job on
    one device). ``**ppl``: ``seq_len``, ``stride``, ``max_tokens``, ``batch_size``."""
    from jaxquant.eval import tasks
    from jaxquant.ptq.recipe import Recipe

    recipe = recipe or Recipe(method="fp32")
    cfg, params, info = quantize(model, recipe, scale, dataset=dataset, calib_data=calib_data,
                                 calib_windows=calib_windows, calib_len=calib_len, seed=seed,
                                 progress=progress)
    tokens = tasks.tokens_for(model, dataset, split)
    result = {"model": model.name, "dataset": dataset, "split": split, **info,
              **evaluate_params(cfg, params, tokens, scale, progress=progress, **ppl),
              **tasks.weight_stats(params), "environment": tasks.environment(),
              "scale": scale.describe()}
    result["heldout"] = {
        name: evaluate_params(cfg, params, tasks.tokens_for(model, name, "test"), scale,
                              progress=progress, **ppl)["perplexity"]
        for name in heldout if name != dataset}
    return result


def evaluate_checkpoint(model: LoadedModel, directory, *, scale: Scale, dataset: str = "ptb",
                        split: str = "test", heldout: tuple[str, ...] = (),
                        progress: bool = True, **ppl) -> dict[str, Any]:
    """:func:`jaxquant.eval.tasks.evaluate_checkpoint` on the mesh: the saved QArrays sharded
    by the rules (codes, scales and zero points alike), windows split over the batch axes."""
    from jaxquant.eval import tasks
    from jaxquant.models.saved import load_quantized

    cfg, params, sidecar = load_quantized(directory)
    tasks.check_model_matches(model, cfg, params, directory,
                              (sidecar.get("info") or {}).get("model")
                              if isinstance(sidecar, dict) else None)
    run = lambda name: evaluate_params(cfg, params, tasks.tokens_for(model, name, split if
                                                                     name == dataset else "test"),
                                       scale, progress=progress, **ppl)
    return {"model": model.name, "checkpoint": str(directory), "dataset": dataset,
            "split": split, "recipe": sidecar["recipe"], **run(dataset),
            "heldout": {n: run(n)["perplexity"] for n in heldout if n != dataset},
            **tasks.weight_stats(params), "environment": tasks.environment(),
            "scale": scale.describe()}


def sharded_method(method, scale: Scale):
    """The fine-tuning ``method`` (:func:`jaxquant.eval.finetune.parse_method`) run on
    ``scale.mesh``: its state sharded by the logical rules (params and optimizer state alike),
    its step jitted with those shardings, each batch split over ``data`` x ``fsdp``. The method's
    name is unchanged, so a run can be resumed on another mesh (or none). Without a mesh,
    ``method`` itself."""
    if scale.mesh is None:
        return method
    from jaxquant.eval import finetune as ft

    @dataclasses.dataclass(frozen=True, kw_only=True)
    class Sharded(ft.FinetuneMethod):
        inner: ft.FinetuneMethod
        mesh: Mesh

        kind = "sharded"

        @classmethod
        def parse(cls, options, text):
            raise ValueError("a sharded method wraps a parsed one: sharded_method(method, scale)")

        @property
        def name(self) -> str:
            return self.inner.name

        def __getattr__(self, attr):  # whatever else a method grows, from the wrapped one
            if attr == "inner":
                raise AttributeError(attr)
            return getattr(self.inner, attr)

        def check(self, config) -> None:
            self.inner.check(config)
            n = self.mesh.shape["data"] * self.mesh.shape["fsdp"]
            if config.batch_size % n:
                raise ValueError(f"--batch-size {config.batch_size} does not split over the "
                                 f"mesh's batch axes data x fsdp = {n}; use a multiple of {n}.")

        def prepare(self, *args, **kwargs):
            return self.inner.prepare(*args, **kwargs)

        def init_state(self, prepared, optimizer):
            from jaxquant.train.sharding import shard_train_state

            return shard_train_state(self.inner.init_state(prepared, optimizer), self.mesh,
                                     strict=False)[0]

        def make_step(self, prepared, optimizer, config):
            from jaxquant.train.sharding import shard_step, state_shardings

            abstract = jax.eval_shape(lambda: self.inner.init_state(prepared, optimizer))
            return shard_step(self.inner.make_step(prepared, optimizer, config), self.mesh,
                              state_shardings(abstract, self.mesh, strict=False))

        def save_extra(self, *args, **kwargs):
            return self.inner.save_extra(*args, **kwargs)

        def to_serving(self, *args, **kwargs):
            return self.inner.to_serving(*args, **kwargs)

    return Sharded(inner=method, mesh=scale.mesh)
