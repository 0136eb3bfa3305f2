"""A snapshot of the public surface: an accidental API change fails here.

``SNAPSHOT`` lists the public names (``__all__``, or where a package has none, its explicit
``from ... import X as X`` re-exports) of each public package. Adding, removing or renaming a
public name fails :func:`test_public_names_match_the_snapshot` until the snapshot is updated in
the same commit, so the change is deliberate and shows up in review. To print the current
surface in this file's format, or rewrite ``SNAPSHOT`` with it::

    python tests/test_public_api.py [--write]

``CONTRACT`` holds the names users and outside checks rely on (``shared/API.md``): each must be
in the snapshot and reachable as written there (``jq.checkpoint.save``).
"""

from __future__ import annotations

import ast
import importlib
import importlib.metadata
import re
import textwrap
from pathlib import Path

import pytest

API_MD = Path(__file__).resolve().parents[2] / "shared" / "API.md"

# fmt: off
SNAPSHOT: dict[str, tuple[str, ...]] = {
    "jaxquant": (
        "AWQConfig", "BackwardSpec", "BlockStack", "DotGeneralConfig", "DoubleQuantArray", "Layout",
        "QArray", "QKind", "QType", "QuantRule", "QuantSpec", "SmoothQuantConfig", "calibrate",
        "calibrate_and_convert", "compute_scale", "dequantize", "dot_general",
        "dot_general_reference", "double_quantize", "einsum", "fake_quant", "fp8",
        "fully_quantized", "get_qtype", "lsq_fake_quant", "lsq_init_scale", "make_dot_general",
        "pack", "quantize", "quantize_blocks", "quantize_model", "to_serving", "unpack", "w4a8",
        "w8a8", "weight_only",
    ),
    "jaxquant.core": (
        "BackwardSpec", "DotGeneralConfig", "DoubleQuantArray", "EinsumSpec", "Layout", "QArray",
        "QKind", "QTYPES", "QType", "QuantSpec", "ShardingError", "calibrate", "check_finite",
        "compute_scale", "dequantize", "dequantize_codes", "dot_general", "dot_general_reference",
        "double_quantize", "einsum", "fake_quant", "fp8", "fully_quantized", "gather_rows",
        "get_qtype", "local_qarray", "lsq_fake_quant", "lsq_init_scale", "make_dot_general",
        "operand_spec", "pack", "parse_einsum", "qarray_partition_specs", "quantize",
        "quantize_codes", "quantize_operand", "resolve_layout", "unpack", "w4a8", "w8a8",
        "weight_only",
    ),
    "jaxquant.nn": (
        "ActStats", "Attention", "Block", "BlockStack", "KVCache", "LayerKVCache", "MLP", "QDense",
        "QDenseGeneral", "QEinsum", "QEmbed", "QuantMode", "QuantReport", "QuantRule", "RMSNorm",
        "Site", "SiteTable", "StaticActivation", "Transformer", "TransformerConfig",
        "TransformerStack", "act_stats_init", "act_stats_update", "adjacent_to_half", "apply_rope",
        "attend", "block_sites", "calibrate_model", "convert", "decode_step", "generate",
        "half_to_adjacent", "infer_contracting_axes", "init_kv_cache", "init_learned_scales",
        "kv_cache_bytes", "make_mesh", "match_rule", "param_bytes", "param_shardings", "prefill",
        "quantize_params", "quantized_interceptor", "read_rules", "restore_serving", "sample",
        "save_serving", "serving_param_bytes", "serving_params_shape", "shard_params",
        "static_scale", "to_serving",
    ),
    "jaxquant.ptq": (
        "ALGORITHMS", "AWQ", "AWQConfig", "GPTQ", "GPTQConfig", "InputStats", "PTQAlgorithm",
        "PTQOptions", "RTN", "Recipe", "SiteInputs", "SmoothQuant", "SmoothQuantConfig", "Stat",
        "calibrate_and_convert", "clip_quantize", "compose", "effective_group", "fold_into_linear",
        "fold_into_norm", "fold_scales", "gptq_quantize", "hessian", "layer_group_sizes",
        "parse_recipe", "quantize_blocks", "quantize_model", "search_alpha", "search_scale",
        "serving_config", "smooth_scales", "stats_init", "stats_update",
    ),
    "jaxquant.train": (
        "LoRAConfig", "LoRAState", "LoopConfig", "LoopResult", "TrainState", "WindowBatches",
        "has_checkpoint", "init_lora", "init_lora_state", "init_train_state", "load_adapters",
        "make_eval_step", "make_lora_train_step", "make_optimizer", "make_schedule",
        "make_train_step", "merge_adapters", "next_token_loss", "save_adapters", "shard_train_step",
    ),
    "jaxquant.checkpoint": (
        "CheckpointManager", "FORMAT", "FORMAT_VERSION", "metadata", "restore", "save",
    ),
    "jaxquant.models": (
        "LoadedModel", "export_gguf", "load", "load_model", "load_quantized", "load_tokenizer",
        "resolve_model", "save_quantized",
    ),
    "jaxquant.data": (
        "DATASETS", "DEFAULT_CALIBRATION", "EVAL_SETS", "TextTokenizer", "byte_tokenizer",
        "cache_dir", "calibration_sources", "calibration_windows", "default_calibration",
        "load_text", "tokenize_cached", "tokenizer_from_file", "tokenizer_from_gguf",
    ),
}
# fmt: on

# Names of shared/API.md, as a user writes them (`jq.NAME`, `jq.checkpoint.NAME`).
CONTRACT = (
    "QuantSpec",
    "QArray",
    "quantize",
    "dequantize",
    "fake_quant",
    "dot_general",
    "einsum",
    "DotGeneralConfig",
    "w8a8",
    "weight_only",
    "fully_quantized",
    "fp8",
    "checkpoint.save",
    "checkpoint.restore",
    "QuantRule",
    "quantize_model",
)
# API.md names that another open issue delivers. The test is strict: it fails once they land,
# so they move into the snapshot then.
NOT_YET: dict[str, str] = {}


def _reexports(module) -> list[str]:
    """The ``from m import X as X`` / ``import m as m`` names of a package's ``__init__``."""
    tree = ast.parse(Path(module.__file__).read_text())
    names = []
    for node in tree.body:
        if isinstance(node, (ast.ImportFrom, ast.Import)):
            names += [
                a.asname for a in node.names if a.asname and a.asname == a.name.split(".")[-1]
            ]
    return names


def public_names(package: str) -> tuple[str, ...]:
    module = importlib.import_module(package)
    names = getattr(module, "__all__", None)
    if names is None:
        # explicit re-exports, plus the names resolved lazily (``_LAZY``: they need Flax)
        names = _reexports(module) + list(getattr(module, "_LAZY", ()))
    return tuple(sorted(set(names)))


def format_snapshot() -> str:
    """``SNAPSHOT`` as it reads in this file, from the installed surface."""
    lines = ["SNAPSHOT: dict[str, tuple[str, ...]] = {"]
    for package in SNAPSHOT:
        body = textwrap.fill(
            " ".join(f'"{n}",' for n in public_names(package)),
            width=100,
            initial_indent=" " * 8,
            subsequent_indent=" " * 8,
            break_on_hyphens=False,
        )
        lines += [f'    "{package}": (', body, "    ),"]
    return "\n".join(lines + ["}"])


@pytest.mark.parametrize("package", list(SNAPSHOT))
def test_public_names_match_the_snapshot(package):
    got, want = set(public_names(package)), set(SNAPSHOT[package])
    added, removed = sorted(got - want), sorted(want - got)
    assert not added and not removed, (
        f"the public names of {package} changed: added {added}, removed {removed}. If that is "
        "intended, update SNAPSHOT in tests/test_public_api.py (python tests/test_public_api.py "
        "prints it) and keep every name of shared/API.md working (an alias is fine)"
    )


@pytest.mark.parametrize("package", list(SNAPSHOT))
def test_every_public_name_resolves(package):
    """``__all__`` names real attributes: ``from package import *`` works."""
    module = importlib.import_module(package)
    missing = [n for n in public_names(package) if not hasattr(module, n)]
    assert not missing, f"{package} lists names it does not define: {missing}"
    namespace: dict = {}
    exec(f"from {package} import *", namespace)  # noqa: S102
    lazy = set(getattr(module, "_LAZY", ()))  # resolved on first access, not by `import *`
    assert set(public_names(package)) - lazy <= set(namespace)


def test_the_snapshot_covers_every_public_package():
    root = Path(importlib.import_module("jaxquant").__file__).parent
    packages = {"jaxquant"} | {
        f"jaxquant.{p.parent.name}" for p in root.glob("*/__init__.py") if p.parent.name != "eval"
    }
    assert packages == set(SNAPSHOT), sorted(packages ^ set(SNAPSHOT))


@pytest.mark.parametrize(
    "name",
    [
        pytest.param(n, marks=pytest.mark.xfail(strict=True, reason=NOT_YET[n]))
        if n in NOT_YET
        else n
        for n in CONTRACT
    ],
)
def test_api_contract_name_is_public(name):
    *sub, leaf = name.split(".")
    package = ".".join(["jaxquant", *sub])
    assert leaf in SNAPSHOT[package], f"{name} (shared/API.md) is not public in {package}"
    obj = importlib.import_module("jaxquant")
    for part in name.split("."):
        obj = getattr(obj, part)  # `jq.checkpoint.save` as a user writes it
    assert callable(obj)


@pytest.mark.skipif(not API_MD.exists(), reason="shared/API.md is not beside the repository")
def test_contract_lists_every_name_of_api_md():
    text = API_MD.read_text()
    written = set(re.findall(r"\bjq\.((?:checkpoint\.)?[A-Za-z_]\w*)", text))
    assert written <= set(CONTRACT), sorted(written - set(CONTRACT))


def test_version_is_the_installed_distribution():
    import jaxquant

    assert jaxquant.__version__ == importlib.metadata.version("jaxquant")


if __name__ == "__main__":
    # `python tests/test_public_api.py --write` rewrites SNAPSHOT in place; without it, prints it.
    import sys

    if "--write" in sys.argv:
        path = Path(__file__)
        text = path.read_text()
        head, rest = text.split("# fmt: off\n", 1)
        _, tail = rest.split("# fmt: on\n", 1)
        path.write_text(f"{head}# fmt: off\n{format_snapshot()}\n# fmt: on\n{tail}")
    else:
        print(format_snapshot())
