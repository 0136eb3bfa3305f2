"""Tokenizers rebuilt from GGUF metadata and from tokenizer.json."""

import json

import gguf
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers

from jaxquant.data.tokenizer import (
    pre_tokenizer_for,
    tokenizer_from_file,
)
from jaxquant.data.tokenizer import tokenizer_from_gguf as _from_fields
from jaxquant.models.fetch import resolve_model
from jaxquant.models.gguf_loader import gguf_metadata
from jaxquant.models.weights import load_tokenizer


def tokenizer_from_gguf(path):
    return _from_fields(gguf_metadata(path, "tokenizer."), str(path))


SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = ["H e", "l l", "He ll", "Hell o", "Ġ w", "o r", "Ġw or", "l d", "Ġwor ld", "1 2"]


def _vocab():
    """Specials, the 256-symbol byte-level alphabet, then one token per merge."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    return SPECIALS + alphabet + [m.replace(" ", "") for m in MERGES]


def write_tokenizer_gguf(path, pre="smollm", model="gpt2"):
    tokens = _vocab()
    writer = gguf.GGUFWriter(str(path), arch="llama")
    writer.add_tokenizer_model(model)
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_merges(MERGES)
    writer.add_token_types([3] * len(SPECIALS) + [1] * (len(tokens) - len(SPECIALS)))
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_gguf_bpe_round_trip(tmp_path):
    tok = load_tokenizer(write_tokenizer_gguf(tmp_path / "t.gguf"))
    vocab = _vocab()
    ids = tok.encode("Hello world")
    assert [vocab[i] for i in ids] == ["Hello", "Ġworld"]
    assert tok.decode(ids) == "Hello world"
    assert (tok.bos_id, tok.eos_id, tok.vocab_size) == (1, 2, len(vocab))
    assert tok.encode("Hello", add_bos=True)[0] == 1
    text = "x = 'é ü' 3\n\tend"  # Any UTF-8 text survives through the byte alphabet.
    assert tok.decode(tok.encode(text)) == text


def test_control_tokens_are_matched_whole(tmp_path):
    tok = load_tokenizer(write_tokenizer_gguf(tmp_path / "t.gguf"))
    ids = tok.encode("<|im_start|>Hello<|im_end|>")
    assert ids == [1, _vocab().index("Hello"), 2]


@pytest.mark.parametrize(("pre", "pieces"), [("smollm", ["1", "2"]), ("gpt2", ["12"])])
def test_digit_splitting_follows_pre_name(tmp_path, pre, pieces):
    hf = tokenizer_from_gguf(write_tokenizer_gguf(tmp_path / "t.gguf", pre=pre))
    assert hf.encode("12").tokens == pieces


def test_pre_tokenizers_match_llama_cpp_regexes():
    smollm = pre_tokenizer_for("smollm").pre_tokenize_str("abc 2024's  x")
    assert [p for p, _ in smollm] == ["abc", "Ġ", "2", "0", "2", "4", "'s", "Ġ", "Ġx"]
    llama3 = pre_tokenizer_for("llama-bpe").pre_tokenize_str("year 12345")
    assert [p for p, _ in llama3] == ["year", "Ġ", "123", "45"]
    with pytest.raises(ValueError, match="tokenizer.json"):
        pre_tokenizer_for("no-such-pre")


def test_sentencepiece_gguf_is_rejected(tmp_path):
    path = write_tokenizer_gguf(tmp_path / "spm.gguf", model="llama")
    with pytest.raises(ValueError, match="tokenizer_from_file"):
        tokenizer_from_gguf(path)


def test_tokenizer_json_folder(tmp_path):
    vocab = {t: i for i, t in enumerate(_vocab())}
    merges = [tuple(m.split(" ")) for m in MERGES]
    hf = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "config.json").write_text(json.dumps({"bos_token_id": 0, "eos_token_id": [2, 1]}))
    assert tokenizer_from_file(tmp_path).encode("Hello").ids == [vocab["Hello"]]
    tok = load_tokenizer(tmp_path)
    assert (tok.bos_id, tok.eos_id) == (0, 2)
    with pytest.raises(ValueError, match="tokenizer.json"):
        tokenizer_from_file(tmp_path / "missing")


@pytest.mark.slow
def test_real_smollm2_tokenizer():
    tok = load_tokenizer(resolve_model("smollm2-135m"))
    assert tok.vocab_size == 49152 and (tok.bos_id, tok.eos_id) == (1, 2)
    assert tok.encode("Hello world") == [19556, 905]
    assert tok.decode(tok.encode("Hello world")) == "Hello world"
    # SmolLM2 splits numbers into single digits.
    assert tok.encode(" 2024") == [216, 34, 32, 34, 36]
    assert tok.encode("<|im_start|>user") == [1, 4093]
