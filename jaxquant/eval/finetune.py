"""Fine-tuning workflows behind ``jaxquant finetune``: float, QAT and (Q)LoRA, resumable.

A method string is parsed once into a frozen, validated method object, found by its first
field in :data:`METHODS`:

==================  ==========================================================================
``float``           plain fine-tuning of every float param (the fair reference).
``qat:QTYPE[:gN]``  quantization-aware training: the block projections' kernels are
                    fake-quantized (RTN grid of ``QTYPE``, groups of ``N`` inputs, adapted per
                    layer as PTQ does) in the forward, with a straight-through gradient;
                    initialised from the float model (``init="rtn"``) or from GPTQ's
                    dequantized weights (``init="gptq"``). Any qtype of ``jaxquant.core``.
                    With a last option ``:lsq`` (``qat:int4:g128:lsq``) the weight scales are
                    learned too (LSQ, Esser et al. 2020): each projection's scales (per output
                    column and group) are trained params, initialised to RTN's scales (with
                    ``init="gptq"``: GPTQ's scales and codes); symmetric int2..int8 only.
``qat:w8a8``        int8 weights and activations, with both backward products in int8 too
                    (:func:`jaxquant.core.fully_quantized`, AQT style).
``lora[:rN]``       float LoRA adapters of rank ``N`` on a frozen float base.
``qlora[:rN]``      LoRA on a frozen NF4 base with double quantization.
==================  ==========================================================================

At the end the model becomes serving params (QAT: ``jaxquant.nn.convert``, packed codes; LoRA:
the adapters merged into the base and re-quantized) saved with
:func:`~jaxquant.models.saved.save_quantized` next to the training checkpoints, so
``jaxquant eval --checkpoint DIR`` scores it by the same path as a PTQ checkpoint.

Layout of ``DIR``::

    DIR/train/<step>/    training checkpoints (params, optimizer state, step, loss history;
                         (Q)LoRA: the adapters and their optimizer state)
    DIR/train/run.json   what run this is (checked by --resume)
    DIR/adapters/        (Q)LoRA: the trained adapters alone (train.lora.load_adapters)
    DIR/params/          the serving params        } written as one unit by save_quantized;
    DIR/jaxquant.json    the serving config/sidecar} the rest of DIR is kept
"""

from __future__ import annotations

import abc
import dataclasses
import functools
import time
import warnings
from pathlib import Path
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxquant.checkpoint.primary import barrier, is_primary
from jaxquant.core import QArray
from jaxquant.core.dot_config import fully_quantized
from jaxquant.core.qtypes import QTYPES, canonical_qtype
from jaxquant.errors import JaxquantError
from jaxquant.eval import tasks
from jaxquant.eval.plots import plot_training_curve
from jaxquant.models.registry import LoadedModel
from jaxquant.models.saved import save_quantized
from jaxquant.nn.config import TransformerConfig
from jaxquant.nn.linear import init_learned_scales
from jaxquant.nn.modes import LEARNED_SCALE, convert
from jaxquant.nn.transformer import Transformer
from jaxquant.ptq.pipeline import serving_config
from jaxquant.ptq.recipe import Recipe, parse_recipe
from jaxquant.train.loop import LoopConfig, WindowBatches, has_checkpoint, train
from jaxquant.train.step import TrainState, make_optimizer, make_schedule, make_train_step

__all__ = ["METHODS", "FinetuneConfig", "FinetuneMethod", "FloatMethod", "LoRAMethod", "Prepared",
           "QATMethod", "QLoRAMethod", "check_out", "finetune", "make_finetune_step",
           "parse_method", "plot_training_curve", "write_plot"]

TRAIN_DIR = "train"
ADAPTERS_DIR = "adapters"
# --requant values that serve the merged (Q)LoRA model float: for QLoRA, exactly the function
# it trained (the NF4 base dequantized, plus the adapters), the QLoRA paper's evaluated model.
NO_REQUANT = ("none", "float")
INITS = ("rtn", "gptq")


def _form() -> str:
    return ("float | qat:QTYPE[:gSIZE][:lsq] (e.g. qat:int4:g128, qat:int2:g64, "
            "qat:int4:g128:lsq) | qat:w8a8 | lora[:rRANK] | qlora[:rRANK]")


# --- methods --------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Prepared:
    """What a method trains.

    Attributes:
      train_cfg: the config of the trained ``Transformer`` (QAT: with the quantization rules).
      params: the initial trained params: the float model's (float, QAT; placeholders of the
        right shapes when resuming) or the LoRA adapters.
      info: what the preparation did (init, its time, the LoRA base's bytes), for the JSON.
      extra: method-specific (LoRA: the frozen base).
    """

    train_cfg: TransformerConfig
    params: Any
    info: dict
    extra: Any = None


class FinetuneMethod(abc.ABC):
    """A fine-tuning method: how the model is set up, trained and turned into serving params."""

    kind: ClassVar[str]
    # The serving model of a float-served method (float, LoRA) is the trained float model, or
    # with ``--requant RECIPE`` its PTQ; ``default_requant`` applies without --requant.
    default_requant: ClassVar[str | None] = None

    @classmethod
    @abc.abstractmethod
    def parse(cls, options: list[str], text: str) -> FinetuneMethod:
        """From the ``:``-separated options after the method's name (``text`` for errors)."""

    @property
    @abc.abstractmethod
    def name(self) -> str:
        """The canonical method string (``parse_method(m.name) == m``)."""

    def check(self, config: FinetuneConfig) -> None:
        """Raises for settings this method does not take (e.g. ``init="gptq"`` on float)."""
        if config.init != "rtn":
            raise ValueError(f"--init {config.init} applies to weight-only qat methods, not "
                             f"{self.name}; drop --init.")
        recipe = self.requant_recipe(config)
        if recipe is not None and recipe.dot_config is None:
            raise ValueError(f"--requant {config.requant}: not a quantizing recipe; omit "
                             "--requant to serve the trained model float.")

    def requant_recipe(self, config: FinetuneConfig) -> Recipe | None:
        """The PTQ recipe of the trained float model for serving (None: serve it float)."""
        text = config.requant or self.default_requant
        if text is None or text in NO_REQUANT:
            return None
        return parse_recipe(self._grid_recipe(text))

    def _grid_recipe(self, text: str) -> str:
        """A bare ``rtn`` / ``gptq`` names the frozen base's grid, which only QLoRA has."""
        if text in ("rtn", "gptq"):
            raise ValueError(f"--requant {text} on {self.name} needs a grid: pass a recipe "
                             f"such as --requant {text}:int4:g128.")
        return text

    def _requantized(self, train_cfg: TransformerConfig, params, *, model: LoadedModel,
                     config: FinetuneConfig, dataset: str, progress: bool
                     ) -> tuple[TransformerConfig, Any, dict]:
        """The trained float ``params`` served float, or their PTQ by ``--requant``."""
        recipe = self.requant_recipe(config)
        if recipe is None:
            return train_cfg, params, {"requant": None}
        trained = LoadedModel(model.name, model.cfg, params, model.tokenizer)
        cfg, qparams, info = tasks.quantize(trained, recipe, dataset=dataset,
                                            calib_data=config.calib_data or dataset,
                                            calib_windows=config.calib_windows,
                                            calib_len=config.calib_len, seed=config.seed,
                                            progress=progress)
        return cfg, qparams, {"requant": recipe.name, **info}

    @abc.abstractmethod
    def prepare(self, model: LoadedModel, config: FinetuneConfig, *, resume: bool,
                dataset: str, progress: bool) -> Prepared:
        """The model to train and its initial params (cheap placeholders when ``resume``)."""

    def init_state(self, prepared: Prepared, optimizer: optax.GradientTransformation):
        """The initial training state (a :class:`~jaxquant.train.TrainState`)."""
        return TrainState(jnp.zeros((), jnp.int32), prepared.params,
                          optimizer.init(prepared.params))

    def make_step(self, prepared: Prepared, optimizer: optax.GradientTransformation,
                  config: FinetuneConfig):
        """The training step ``(state, tokens) -> (state, metrics)``: one compiled step per
        model config and optimizer settings in a process (a resumed or repeated run reuses
        it); ``optimizer`` is ``config.optimizer()``."""
        del optimizer  # rebuilt from its (hashable) settings inside the cache
        return _cached_step(prepared.train_cfg, config.optimizer_settings())

    def save_extra(self, out: Path, prepared: Prepared, state) -> dict:
        """Writes what the method keeps besides the serving model (LoRA: the adapters)."""
        return {}

    def to_serving(self, prepared: Prepared, state, *, model: LoadedModel,
                   config: FinetuneConfig, dataset: str, progress: bool
                   ) -> tuple[TransformerConfig, Any, dict]:
        """``(serve_cfg, serve_params, info)`` of the trained state (QAT: ``convert``)."""
        params = state.params
        if not prepared.train_cfg.quant_rules:
            return prepared.train_cfg, params, {}
        return prepared.train_cfg, convert(Transformer(prepared.train_cfg), params), {}


@dataclasses.dataclass(frozen=True, kw_only=True)
class FloatMethod(FinetuneMethod):
    """``float``: every param trained in float; served float, or with ``--requant RECIPE`` as
    its PTQ (``gptq:int4:g128``: the "fine-tune, then quantize" baseline QAT is measured
    against)."""

    kind: ClassVar[str] = "float"

    @classmethod
    def parse(cls, options, text):
        if options:
            raise ValueError(f"float takes no options; got {text!r}. Expected {_form()}.")
        return cls()

    @property
    def name(self) -> str:
        return "float"

    def prepare(self, model, config, *, resume, dataset, progress):
        return Prepared(model.cfg, model.params, {"init": "float"})

    def to_serving(self, prepared, state, *, model, config, dataset, progress):
        return self._requantized(prepared.train_cfg, state.params, model=model, config=config,
                                 dataset=dataset, progress=progress)


@dataclasses.dataclass(frozen=True, kw_only=True)
class QATMethod(FinetuneMethod):
    """``qat:QTYPE[:gSIZE][:lsq]`` (weight-only fake quantization) or ``qat:w8a8`` (fwd + bwd
    int8).

    Attributes:
      qtype: weight format, any name of :data:`jaxquant.core.QTYPES` (int2..int8, nf4, ...).
      group_size: None (a scale per output column) or the group size along the inputs.
      w8a8: int8 weights and activations, backward products in int8 too (``qtype`` is int8,
        no groups).
      lsq: learn the weight scales (LSQ): every quantized projection's rule gets
        ``learned_scale=True`` (:class:`~jaxquant.nn.QuantRule`); symmetric int2..int8 only.
    """

    kind: ClassVar[str] = "qat"
    qtype: str = "int8"
    group_size: int | None = None
    w8a8: bool = False
    lsq: bool = False

    def __post_init__(self):
        try:
            object.__setattr__(self, "qtype", canonical_qtype(self.qtype))
        except ValueError as e:
            raise ValueError(f"qat: unknown qtype {self.qtype!r}; use one of "
                             f"{', '.join(sorted(QTYPES))} (or w8a8).") from e
        if self.group_size is not None and (isinstance(self.group_size, bool) or
                                            not isinstance(self.group_size, int) or
                                            self.group_size < 1):
            raise ValueError(f"qat: group size must be an int >= 1 (e.g. g128), got "
                             f"{self.group_size!r}.")
        if self.w8a8 and (self.qtype != "int8" or self.group_size is not None):
            raise ValueError("qat:w8a8 is per-channel int8 weights and per-token int8 "
                             "activations; it takes no qtype or group size.")
        if self.lsq and (self.w8a8 or not QTYPES[self.qtype].has_full_range):
            raise ValueError(f"qat:...:lsq learns the scales of a symmetric int grid "
                             f"(int2..int8), not {'w8a8' if self.w8a8 else self.qtype}; use e.g. "
                             "qat:int4:g128:lsq, or drop :lsq.")

    @classmethod
    def parse(cls, options, text):
        if not options:
            raise ValueError(f"{text!r} lacks a qtype; expected qat:QTYPE[:gSIZE] (e.g. "
                             "qat:int4:g128) or qat:w8a8.")
        if options[0] == "w8a8":
            if len(options) > 1:
                raise ValueError(f"qat:w8a8 takes no options; got {text!r}.")
            return cls(w8a8=True)
        group, lsq = None, False
        for i, p in enumerate(options[1:]):
            if p == "lsq" and i == len(options) - 2:  # last
                lsq = True
                continue
            if not (p.startswith("g") and p[1:].isdigit()) or group is not None:
                raise ValueError(f"bad option {p!r} in {text!r}: expected one group size gSIZE "
                                 "with SIZE >= 1, then optionally lsq (e.g. qat:int4:g128, "
                                 "qat:int4:g128:lsq).")
            group = int(p[1:])
        return cls(qtype=options[0], group_size=group, lsq=lsq)

    @property
    def name(self) -> str:
        if self.w8a8:
            return "qat:w8a8"
        return ":".join(["qat", self.qtype] + ([f"g{self.group_size}"] if self.group_size else [])
                        + (["lsq"] if self.lsq else []))

    @property
    def recipe(self) -> Recipe:
        """The PTQ recipe with the same weight grid (RTN of the float model = QAT at step 0)."""
        if self.w8a8:
            return Recipe(method="w8a8")
        return Recipe(method="rtn", qtype=self.qtype, group_size=self.group_size)

    def train_config(self, cfg: TransformerConfig) -> TransformerConfig:
        """The QAT model's config: block projections quantized, embeddings and head float."""
        if self.w8a8:
            return cfg.with_quantization(fully_quantized(fwd="int8", bwd="int8"))
        cfg = serving_config(cfg, self.recipe)
        if self.lsq:
            cfg = dataclasses.replace(cfg, quant_rules=tuple(
                dataclasses.replace(r, learned_scale=r.config is not None)
                for r in cfg.quant_rules))
        return cfg

    def check(self, config):
        if config.init == "gptq" and self.w8a8:
            raise ValueError("--init gptq applies to weight-only qat methods, not qat:w8a8; "
                             "drop --init.")
        if config.requant is not None:
            raise ValueError(f"--requant applies to float / lora / qlora, not {self.name} (QAT "
                             "serves its own trained grid); drop --requant.")

    def prepare(self, model, config, *, resume, dataset, progress):
        train_cfg = self.train_config(model.cfg)
        if config.init == "rtn" or resume:  # resuming: the checkpoint overrides the params
            return Prepared(train_cfg, self._with_scales(train_cfg, model.params),
                            {"init": config.init})
        recipe = Recipe(method="gptq", qtype=self.qtype, group_size=self.group_size)
        _, qparams, info = tasks.quantize(model, recipe, dataset=dataset,
                                          calib_data=config.calib_data or dataset,
                                          calib_windows=config.calib_windows,
                                          calib_len=config.calib_len, seed=config.seed,
                                          progress=progress)
        params = _dequantized(qparams, keep_scales=self.lsq)
        qt = QTYPES[canonical_qtype(self.qtype)]
        reach = grid_reach(qparams, config, max_code=max(abs(qt.qmin), qt.qmax) if self.lsq
                           else None)
        if not reach["codes_can_move"]:
            warnings.warn(
                f"--init gptq puts every weight at the centre of its {self.qtype} cell, "
                f"{reach['median_step'] / 2:.3g} (half the median step) from a rounding "
                f"boundary, but {config.steps} steps at lr {config.learning_rate:g} move a "
                f"weight{' or a scale' if self.lsq else ''} by at most about "
                f"{reach['reach']:.3g}: no code will change, only the float params (embedding, "
                "norms) train. Raise --steps or --lr, or use --init rtn.",
                stacklevel=2)
        return Prepared(train_cfg, self._with_scales(train_cfg, params),
                        {"init": "gptq", "init_recipe": recipe.name, "grid_reach": reach,
                         **info})

    def _with_scales(self, train_cfg, params):
        """LSQ: ``params`` plus the RTN scale of each projection that has no scale yet."""
        if not self.lsq:
            return params
        return init_learned_scales(Transformer(train_cfg), params)

    def to_serving(self, prepared, state, *, model, config, dataset, progress):
        cfg, params, info = super().to_serving(prepared, state, model=model, config=config,
                                               dataset=dataset, progress=progress)
        # The served model is an ordinary quantized one: its rules don't need learned_scale.
        rules = tuple(dataclasses.replace(r, learned_scale=False) for r in cfg.quant_rules)
        return dataclasses.replace(cfg, quant_rules=rules), params, info


def grid_reach(qparams, config: FinetuneConfig, *, max_code: int | None = None
               ) -> dict[str, Any]:
    """How far the run can move a weight against the grid's step (QAT from PTQ's weights).

    Adam moves a param by at most about the learning rate a step, so over the run by at most
    ``reach = sum(lr_t)`` of the schedule. A weight at the centre of its cell (GPTQ's
    dequantized weights) changes code only when the reach is at least half a step. A learned
    (LSQ) scale moves by the same reach, which shifts code ``c`` by ``c * reach / scale`` steps.

    Args:
      qparams: PTQ serving params (QArray kernels).
      config: the run's settings (steps, learning rate, warmup).
      max_code: with learned scales, the largest ``|code|`` of the format (int4: 8); None: the
        scales are not trained.

    Returns:
      ``{"reach", "median_step", "codes_can_move"}``: the reach, the median ``|scale|`` of the
      QArray kernels of ``qparams``, and whether the reach (times ``max_code``) is at least
      half of it.
    """
    schedule = make_schedule(config.learning_rate, config.warmup_steps, config.steps)
    reach = float(sum(float(schedule(i)) for i in range(config.steps)))
    scales = [np.abs(np.asarray(q.scale, np.float32)).ravel()
              for q in jax.tree.leaves(qparams, is_leaf=lambda v: isinstance(v, QArray))
              if isinstance(q, QArray)]
    step = float(np.median(np.concatenate(scales))) if scales else float("nan")
    lever = max(1, max_code or 1)
    return {"reach": reach, "median_step": step, "codes_can_move": not reach * lever < step / 2}


def _dequantized(qparams, *, keep_scales: bool):
    """PTQ's serving params with each QArray kernel dequantized to float32; ``keep_scales``:
    its scale also kept beside it as the LSQ ``kernel_scale`` (GPTQ's grid, exactly)."""
    if isinstance(qparams, QArray):
        return qparams.dequantize(np.float32)
    if not isinstance(qparams, dict):
        return qparams
    out = {k: _dequantized(v, keep_scales=keep_scales) for k, v in qparams.items()}
    if keep_scales and isinstance(qparams.get("kernel"), QArray):
        out[LEARNED_SCALE] = jnp.asarray(qparams["kernel"].scale, jnp.float32)
    return out


@dataclasses.dataclass(frozen=True, kw_only=True)
class LoRAMethod(FinetuneMethod):
    """``lora[:rRANK]``: LoRA adapters on the seven block projections of a frozen float base
    (:mod:`jaxquant.train.lora`); only the adapters are trained. The serving model is the
    merged float model, or, with ``--requant RECIPE``, its PTQ (e.g. ``gptq:int4:g128``).

    Attributes:
      rank: the adapters' rank ``r`` (alpha 16, no dropout: :class:`LoRAConfig`'s defaults).
    """

    kind: ClassVar[str] = "lora"
    base_qtype: ClassVar[str | None] = None
    rank: int = 16

    def __post_init__(self):
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"{self.kind}: rank must be an int >= 1 (e.g. {self.kind}:r16), "
                             f"got {self.rank!r}.")

    @classmethod
    def parse(cls, options, text):
        if len(options) > 1 or (options and not (options[0].startswith("r")
                                                 and options[0][1:].isdigit())):
            raise ValueError(f"bad options in {text!r}: expected {cls.kind}[:rRANK] with "
                             f"RANK >= 1 (e.g. {cls.kind}:r16).")
        return cls(rank=int(options[0][1:])) if options else cls()

    @property
    def name(self) -> str:
        return f"{self.kind}:r{self.rank}"

    @property
    def lora(self):
        from jaxquant.train.lora import LoRAConfig

        return LoRAConfig(rank=self.rank, base=self.base_qtype)

    def _grid_recipe(self, text):
        if text in ("rtn", "gptq") and self.base_qtype is not None:  # the frozen base's blocks
            # RTN: the base's own NF4 grid; GPTQ works on int grids: int4, same blocks.
            qtype = self.base_qtype if text == "rtn" else "int4"
            return f"{text}:{qtype}:g{self.lora.block_size}"
        return super()._grid_recipe(text)

    def prepare(self, model, config, *, resume, dataset, progress):
        from jaxquant.train.lora import base_memory, init_lora

        t0 = time.perf_counter()
        lora = self.lora
        # One compiled function instead of many small eager ops (much faster on CPU).
        base, adapters = jax.jit(lambda p, k: init_lora(p, lora, k))(
            model.params, jax.random.key(config.seed))
        info = {"lora": lora.to_dict(), "base_memory": base_memory(base),
                "adapter_params": int(sum(np.prod(x.shape) for x in jax.tree.leaves(adapters))),
                "prepare_seconds": time.perf_counter() - t0}
        return Prepared(model.cfg, adapters, info, extra=base)

    def init_state(self, prepared, optimizer):
        from jaxquant.train.lora import init_lora_state

        return init_lora_state(prepared.params, optimizer)

    def make_step(self, prepared, optimizer, config):
        from jaxquant.train.lora import make_lora_train_step

        return make_lora_train_step(prepared.train_cfg, prepared.extra, optimizer, self.lora,
                                    seed=config.seed)

    def save_extra(self, out, prepared, state):
        from jaxquant.train.lora import save_adapters

        path = save_adapters(out / ADAPTERS_DIR, state.adapters, self.lora, force=True)
        return {"adapters": str(path)}

    def to_serving(self, prepared, state, *, model, config, dataset, progress):
        from jaxquant.train.lora import merge_adapters

        lora = self.lora
        merged = jax.jit(lambda b, a: merge_adapters(b, a, lora))(prepared.extra, state.adapters)
        return self._requantized(prepared.train_cfg, merged, model=model, config=config,
                                 dataset=dataset, progress=progress)


@dataclasses.dataclass(frozen=True, kw_only=True)
class QLoRAMethod(LoRAMethod):
    """``qlora[:rRANK]``: LoRA on a frozen NF4 base (blocks of 64) with double quantization
    (8-bit block scales in blocks of 256); served as the merged model re-quantized by RTN to the
    base's grid (``rtn:nf4:g64``), or with ``--requant gptq`` by GPTQ at ``int4:g64`` (GPTQ
    needs an int grid: same bits and blocks), or by any recipe (``--requant gptq:int4:g128``)."""

    kind: ClassVar[str] = "qlora"
    base_qtype: ClassVar[str | None] = "nf4"
    default_requant: ClassVar[str | None] = "rtn"


# The method registry: the first field of the method string -> its class.
METHODS: dict[str, type[FinetuneMethod]] = {
    "float": FloatMethod,
    "qat": QATMethod,
    "lora": LoRAMethod,
    "qlora": QLoRAMethod,
}


def parse_method(text: str) -> FinetuneMethod:
    """``"qat:int4:g128"`` -> ``QATMethod(qtype="int4", group_size=128)`` and the like.

    Raises:
      ValueError: an unknown method or option, naming the accepted forms.

    Example:
      >>> parse_method("qat:int4:g128").name
      'qat:int4:g128'
    """
    parts = [p for p in str(text).strip().lower().split(":")]
    if not parts or not parts[0] or any(not p for p in parts):
        raise ValueError(f"bad method {text!r}; expected {_form()}.")
    cls = METHODS.get(parts[0])
    if cls is None:
        raise ValueError(f"unknown method {parts[0]!r} in {text!r}; expected {_form()}.")
    return cls.parse(parts[1:], str(text).strip().lower())


# --- the run --------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, kw_only=True)
class FinetuneConfig:
    """A fine-tuning run's settings (all of them but ``checkpoint_every`` are part of the run's
    identity: resuming with different ones is refused).

    Attributes:
      method: a :class:`FinetuneMethod` (:func:`parse_method`).
      steps: optimizer steps.
      batch_size: windows per step ``B``.
      seq_len: tokens per window ``S`` (capped at the model's ``max_seq_len``).
      learning_rate: AdamW's peak learning rate (warmup, then cosine decay to 10%).
      warmup_steps: linear warmup; None: ``min(100, steps // 10)``.
      weight_decay: AdamW's decoupled weight decay on matrices.
      checkpoint_every: save a training checkpoint every this many steps.
      seed: the batch sampler's (and calibration's) seed.
      init: ``"rtn"`` (start from the float weights) or ``"gptq"`` (QAT from GPTQ's weights).
      calib_windows: GPTQ calibration windows (``init="gptq"``).
      calib_len: their length.
      calib_data: GPTQ's calibration text (None: the training data set's train split).
      requant: float / (Q)LoRA: the PTQ recipe of the trained (merged) model for serving, such
        as ``gptq:int4:g128`` (QLoRA also takes ``rtn`` / ``gptq``: on the frozen base's grid);
        None: the method's default (qlora: ``rtn``, float and lora: served float).
    """

    method: FinetuneMethod
    steps: int
    batch_size: int = 8
    seq_len: int = 256
    learning_rate: float = 1e-4
    warmup_steps: int | None = None
    weight_decay: float = 0.0
    checkpoint_every: int = 100
    seed: int = 0
    init: str = "rtn"
    calib_windows: int = 32
    calib_len: int = 512
    calib_data: str | None = None
    requant: str | None = None

    def __post_init__(self):
        if not isinstance(self.method, FinetuneMethod):
            raise ValueError(f"method must be parsed with parse_method, got {self.method!r}.")
        for name in ("steps", "batch_size", "seq_len", "checkpoint_every", "calib_windows",
                     "calib_len"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be an int >= 1, got {v!r}.")
        if not (isinstance(self.learning_rate, (int, float)) and self.learning_rate > 0):
            raise ValueError(f"--lr must be > 0, got {self.learning_rate!r}.")
        if not self.weight_decay >= 0:
            raise ValueError(f"--weight-decay must be >= 0, got {self.weight_decay!r}.")
        warm = self.warmup_steps
        if warm is None:
            object.__setattr__(self, "warmup_steps", min(100, self.steps // 10))
        elif isinstance(warm, bool) or not isinstance(warm, int) or not 0 <= warm < self.steps:
            raise ValueError(f"--warmup must be an int in [0, steps={self.steps}), got {warm!r}.")
        if self.requant is not None and not isinstance(self.requant, str):
            raise ValueError(f"--requant must be a recipe string, got {self.requant!r}.")
        if self.init not in INITS:
            raise ValueError(f"--init must be one of {INITS}, got {self.init!r}.")
        self.method.check(self)

    def tag(self) -> dict:
        """What identifies the run (checked on resume)."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["method"] = self.method.name
        d.pop("checkpoint_every")
        d.pop("requant")  # applied after training
        return d

    def optimizer_settings(self) -> tuple[tuple[str, Any], ...]:
        """The keyword arguments of :func:`~jaxquant.train.make_optimizer` (hashable)."""
        return (("learning_rate", float(self.learning_rate)),
                ("warmup_steps", self.warmup_steps), ("total_steps", self.steps),
                ("weight_decay", float(self.weight_decay)))

    def optimizer(self) -> optax.GradientTransformation:
        """AdamW with warmup and cosine decay (:func:`~jaxquant.train.make_optimizer`)."""
        return make_optimizer(**dict(self.optimizer_settings()))


def make_finetune_step(model: Transformer, optimizer: optax.GradientTransformation):
    """The jitted step ``(TrainState, tokens [B, S]) -> (TrainState, metrics)`` of the float and
    QAT methods. A separate function so that sharding (``--mesh``) can wrap or replace it."""
    return make_train_step(model, optimizer)


@functools.lru_cache(maxsize=8)
def _cached_step(train_cfg: TransformerConfig, optimizer_settings: tuple):
    return make_finetune_step(Transformer(train_cfg), make_optimizer(**dict(optimizer_settings)))


def check_out(out: str | Path, *, resume: bool) -> Path:
    """Refuses an ``--out`` that would mix runs, before any work. Returns it absolute."""
    out = Path(out).absolute()
    if out.exists() and not out.is_dir():
        raise JaxquantError(f"--out {out} is a file; pass a directory for the run.")
    if resume:
        if not has_checkpoint(out / TRAIN_DIR):
            raise JaxquantError(f"--resume: {out} holds no training checkpoint to resume "
                                f"({out / TRAIN_DIR} is missing or empty); run without --resume "
                                "to start the run.")
    elif out.exists() and any(out.iterdir()):
        raise JaxquantError(f"--out {out} already exists and is not empty; pass --resume to "
                            "continue its run, or choose another --out (or delete it).")
    return out


def finetune(
    model: LoadedModel,
    config: FinetuneConfig,
    out: str | Path,
    *,
    dataset: str = "ptb",
    resume: bool = False,
    heldout: tuple[str, ...] = (),
    eval_seq_len: int = 2048,
    eval_max_tokens: int | None = None,
    progress: bool = True,
    evaluate_checkpoint: Any = None,
) -> dict[str, Any]:
    """Fine-tunes ``model`` on ``dataset``'s train split, saves and scores the serving model.

    Args:
      model: the float model (:func:`jaxquant.models.registry.load`).
      config: :class:`FinetuneConfig`.
      out: the run directory (see the module docstring for its layout).
      dataset: a data set name or text file (train split for training, test for scoring).
      resume: continue the run in ``out`` from its latest training checkpoint.
      heldout: data sets also scored on their test split (e.g. ``tasks.HELDOUT``).
      eval_seq_len: perplexity window (capped at the model's ``max_seq_len``).
      eval_max_tokens: score only the first this many test tokens (None: all).
      progress: progress bars.
      evaluate_checkpoint: scores the saved serving model, with the signature of
        :func:`jaxquant.eval.tasks.evaluate_checkpoint` (the default); ``--mesh`` passes
        :func:`jaxquant.eval.scale.evaluate_checkpoint` bound to its mesh.

    Returns:
      The result dict (``--json``): method, steps, tokens seen, final train loss, the loss
      curve, perplexities, size, times and :func:`~jaxquant.eval.tasks.environment`.
    """
    t0 = time.perf_counter()
    out = check_out(out, resume=resume)
    barrier("jaxquant finetune: --out checked")  # every process checked before one writes
    method = config.method
    seq_len = min(config.seq_len, model.cfg.max_seq_len)
    stream = tasks.tokens_for(model, dataset, "train")
    batches = WindowBatches(stream, config.batch_size, seq_len, config.seed)
    prepared = method.prepare(model, config, resume=resume, dataset=dataset, progress=progress)
    opt = config.optimizer()
    state = method.init_state(prepared, opt)
    if resume:  # the restore target: shapes and shardings only (each shard lands in place;
        # several processes can only save and step global arrays)
        state = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
                             if isinstance(x, jax.Array) else x, state)
    tag = {"model": model.name, "data": dataset, **config.tag(), "seq_len": seq_len}
    loop = LoopConfig(steps=config.steps, checkpoint_every=config.checkpoint_every,
                      progress=progress, desc=f"finetune {method.name}")
    run = train(method.make_step(prepared, opt, config), state, batches, loop,
                directory=out / TRAIN_DIR, resume=resume, tag=tag)
    saved_extra = method.save_extra(out, prepared, run.state)
    serve_cfg, serve_params, serve_info = method.to_serving(
        prepared, run.state, model=model, config=config, dataset=dataset, progress=progress)
    losses = [float(v) for v in run.losses]
    tail = max(1, config.steps // 10)
    recipe = method.name + (f" -> {serve_info['requant']}" if serve_info.get("requant") else "")
    info = {"recipe": recipe, "model": model.name, "method": method.name,
            "data": dataset, "steps": config.steps, "final_train_loss": losses[-1]}
    save_quantized(out, serve_cfg, serve_params, info, force=True, keep_others=True)
    score = (evaluate_checkpoint or tasks.evaluate_checkpoint)(
        model, out, dataset=dataset, split="test", heldout=heldout, seq_len=eval_seq_len,
        max_tokens=eval_max_tokens, progress=progress)
    return {
        "model": model.name, "dataset": dataset, "method": method.name, "out": str(out),
        "steps": config.steps, "batch_size": config.batch_size, "seq_len": seq_len,
        "tokens_seen": config.steps * config.batch_size * seq_len,
        "final_train_loss": losses[-1],
        "final_train_loss_mean": float(np.mean(losses[-tail:])),
        "final_train_loss_mean_steps": tail,
        "loss_curve": losses,
        "perplexity": score["perplexity"], "tokens_scored": score["tokens_scored"],
        "eval_split": f"{dataset}:test", "heldout": score["heldout"],
        "bits_per_weight": score["bits_per_weight"], "model_bytes": score["model_bytes"],
        "config": {**config.tag(), "seq_len": seq_len, "requant": config.requant,
                   "checkpoint_every": config.checkpoint_every},
        "prepare": prepared.info, "serving": serve_info, **saved_extra,
        "resumed_from": run.resumed_from,
        "train_seconds": run.seconds, "wall_seconds": time.perf_counter() - t0,
        "environment": tasks.environment(),
    }


def write_plot(result: dict, json_path: str | Path | None) -> Path:
    """Plots ``result``'s loss curve next to ``json_path`` (same name, ``.png``), or into the
    run's ``out`` when there is no JSON; records the path in ``result["plot"]``. In a
    multi-process run only process 0 writes the file."""
    png = (Path(json_path).with_suffix(".png") if json_path
           else Path(result["out"]) / "loss_curve.png")
    if is_primary():  # several processes: process 0 writes it (nothing reads it in the run)
        plot_training_curve(result["loss_curve"], png,
                            title=f"{result['model']} {result['method']} on {result['dataset']}")
    result["plot"] = str(png)
    return png
