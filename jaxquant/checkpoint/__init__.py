"""Orbax checkpoints of pytrees with :class:`~jaxquant.core.QArray` leaves.

Sits right above :mod:`jaxquant.core`: it needs only the core and Orbax, so the ``nn`` modules,
PTQ and training may use it.

* :func:`save` / :func:`restore` / :func:`metadata`: one checkpoint directory
  (:mod:`~jaxquant.checkpoint.store`).
* :class:`CheckpointManager`: numbered steps of a training run (:mod:`~jaxquant.checkpoint.manager`).
* :mod:`~jaxquant.checkpoint.tree_codec`: the tree <-> (arrays, JSON description) format both use.
"""

from jaxquant.checkpoint.manager import CheckpointManager as CheckpointManager
from jaxquant.checkpoint.store import metadata as metadata
from jaxquant.checkpoint.store import restore as restore
from jaxquant.checkpoint.store import save as save
from jaxquant.checkpoint.tree_codec import FORMAT as FORMAT
from jaxquant.checkpoint.tree_codec import FORMAT_VERSION as FORMAT_VERSION

__all__ = ["FORMAT", "FORMAT_VERSION", "CheckpointManager", "metadata", "restore", "save"]
