"""Model import (GGUF, safetensors), tokenizers and text data sets.

Import the submodules directly, e.g. ``from jaxquant.io.weights import load_model``.
"""
