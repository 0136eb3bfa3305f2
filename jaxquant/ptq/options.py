"""`PTQOptions`: the knobs of the calibration-based PTQ algorithms (one frozen config)."""

from __future__ import annotations

import dataclasses

from jaxquant.ptq.gptq import GPTQConfig


@dataclasses.dataclass(frozen=True, kw_only=True)
class PTQOptions:
    """Knobs of the calibration-based methods.

    Attributes:
      gptq: :class:`~jaxquant.ptq.GPTQConfig`.
      awq_grid: AWQ's number of ``alpha`` values.
      awq_tokens: calibration tokens kept per input site when an algorithm asks for a sample of
        the inputs (AWQ's searches, SmoothQuant's alpha search).
      batch_windows: calibration windows per jitted block call.
      smooth_sites: the input sites SmoothQuant smooths (names of the model's site table,
        :func:`jaxquant.nn.transformer.block_sites`; ``down_in`` folds into ``up_proj``).
      true_sequential: GPTQ quantizes a block's linears site by site in execution order (q/k/v,
        o, gate/up, down), each on inputs recomputed with the linears before it quantized.
      smooth_search: pick SmoothQuant's ``alpha`` per site from
        :data:`~jaxquant.ptq.smoothquant.ALPHA_GRID` by the W8A8 output error (False: the
        recipe's ``alpha`` everywhere).
    """

    gptq: GPTQConfig = GPTQConfig()
    awq_grid: int = 20
    awq_tokens: int = 4096
    batch_windows: int = 8
    smooth_sites: tuple[str, ...] = ("attn_in", "mlp_in", "down_in")
    smooth_search: bool = True
    true_sequential: bool = True

    def __post_init__(self):
        if not isinstance(self.smooth_sites, tuple) or not all(
                isinstance(s, str) and s for s in self.smooth_sites):
            raise ValueError(f"smooth_sites must be a tuple of site names such as "
                             f"('attn_in', 'mlp_in', 'down_in'); got {self.smooth_sites!r}.")
        if self.awq_grid < 1 or self.awq_tokens < 1 or self.batch_windows < 1:
            raise ValueError("awq_grid, awq_tokens and batch_windows must be positive.")
