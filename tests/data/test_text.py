"""Text loading, cached tokenization and calibration windows."""

import numpy as np
import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from jaxquant.data.text import calibration_windows, load_text, tokenize_cached
from jaxquant.data.tokenizer import TextTokenizer

# Words per split in Mikolov's PTB LM files (ANCHORS: train 887k, valid 70k, test 79k).
PTB_WORDS = {"train": 887_521, "valid": 70_390, "test": 78_669}
PTB_SENTENCES = {"train": 42_068, "valid": 3_370, "test": 3_761}


@pytest.mark.parametrize("split", ["train", "valid", "test"])
def test_ptb_splits(split):
    text = load_text("ptb", split)
    sentences = text.split("\n")
    assert len(text.split()) == PTB_WORDS[split]
    assert len(sentences) == PTB_SENTENCES[split]
    assert all(s and s == s.strip() for s in sentences)
    assert "<unk>" in text and " N " in text


def test_ptb_test_counts_match_anchors():
    text = load_text("PTB")  # Default split is test; the name is case-insensitive.
    words = len(text.split())
    assert 78_000 < words < 80_000
    assert 81_500 < words + text.count("\n") + 1 < 83_000  # With end-of-sentence markers.
    assert load_text("ptb", "validation") == load_text("ptb", "valid")


def test_text_file_and_bad_names(tmp_path):
    file = tmp_path / "t.txt"
    file.write_text("héllo\nworld\n", encoding="utf-8")
    assert load_text(file) == "héllo\nworld\n"
    with pytest.raises(ValueError, match="ptb"):
        load_text("wikitext2")
    with pytest.raises(ValueError, match="split"):
        load_text("ptb", "dev")


def _byte_tokenizer(extra=()):
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet()) + list(extra)
    hf = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(alphabet)}, merges=[]))
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    return TextTokenizer(hf)


def test_tokenize_cached_reuses_and_keys_on_tokenizer(tmp_path):
    tok = _byte_tokenizer()
    ids = tokenize_cached("my text", "hello world", tok, tmp_path)
    assert ids.dtype == np.int32 and ids.tolist() == tok.encode("hello world")
    assert len(list(tmp_path.glob("*.npy"))) == 1
    again = tokenize_cached("my text", "hello world", tok.hf, tmp_path)  # Raw tokenizer works too.
    np.testing.assert_array_equal(again, ids)
    assert len(list(tmp_path.glob("*.npy"))) == 1
    tokenize_cached("my text", "hello there", tok, tmp_path)  # New text: new file.
    tokenize_cached("my text", "hello world", _byte_tokenizer(["zz"]), tmp_path)  # New vocab.
    assert len(list(tmp_path.glob("*.npy"))) == 3
    with pytest.raises(ValueError, match="TextTokenizer"):
        tokenize_cached("x", "y", object(), tmp_path)


def test_tokenize_cached_default_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("JAXQUANT_CACHE", str(tmp_path / "cache"))
    tokenize_cached("t", "abc", _byte_tokenizer())
    assert len(list((tmp_path / "cache").glob("tokens-t-*.npy"))) == 1


def test_calibration_windows():
    tokens = np.arange(1000, dtype=np.int32)
    windows = calibration_windows(tokens, n=16, length=32, seed=3)
    assert windows.shape == (16, 32) and windows.dtype == np.int32
    np.testing.assert_array_equal(np.diff(windows, axis=1), 1)  # Consecutive tokens.
    assert windows.min() >= 0 and windows.max() <= 999
    np.testing.assert_array_equal(windows, calibration_windows(tokens, 16, 32, seed=3))
    assert not np.array_equal(windows, calibration_windows(tokens, 16, 32, seed=4))
    full = calibration_windows(tokens, n=2, length=1000, seed=0)
    np.testing.assert_array_equal(full, np.stack([tokens, tokens]))


@pytest.mark.parametrize(
    ("n", "length", "match"), [(0, 8, "positive"), (4, 0, "positive"), (4, 2000, "fewer")]
)
def test_calibration_windows_errors(n, length, match):
    with pytest.raises(ValueError, match=match):
        calibration_windows(np.arange(1000), n=n, length=length, seed=0)
