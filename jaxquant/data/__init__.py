"""Text data and tokenizers: Penn Treebank and text files, tokenized once and cached.

Reads no model file: a GGUF's tokenizer metadata reaches :func:`tokenizer_from_gguf` through
:mod:`jaxquant.models`. Imports only the standard library, numpy and `tokenizers`.
"""

from jaxquant.data.cache import cache_dir as cache_dir
from jaxquant.data.text import DATASETS as DATASETS
from jaxquant.data.text import DEFAULT_CALIBRATION as DEFAULT_CALIBRATION
from jaxquant.data.text import EVAL_SETS as EVAL_SETS
from jaxquant.data.text import calibration_sources as calibration_sources
from jaxquant.data.text import calibration_windows as calibration_windows
from jaxquant.data.text import default_calibration as default_calibration
from jaxquant.data.text import load_text as load_text
from jaxquant.data.text import tokenize_cached as tokenize_cached
from jaxquant.data.tokenizer import TextTokenizer as TextTokenizer
from jaxquant.data.tokenizer import byte_tokenizer as byte_tokenizer
from jaxquant.data.tokenizer import tokenizer_from_file as tokenizer_from_file
from jaxquant.data.tokenizer import tokenizer_from_gguf as tokenizer_from_gguf
