"""Chat-tool behaviour of generation: stop tokens, chat template, streamed text without special
tokens or broken characters (the tiny random model; no download)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxquant.eval import generation
from jaxquant.nn import Transformer, TransformerConfig
from jaxquant.nn.decode import generate, stream

CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + "
          "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


@pytest.fixture(scope="module")
def tiny():
    cfg = TransformerConfig.tiny()
    model = Transformer(cfg)
    params = model.init(jax.random.key(0), *model.example_inputs())["params"]
    prompt = jnp.asarray([[1, 5, 9, 3]], jnp.int32)
    return model, params, prompt


def test_stream_stops_at_a_stop_token_and_matches_generate(tiny):
    model, params, prompt = tiny
    full = np.asarray(generate(model, params, prompt, 6))[0, prompt.shape[1]:]
    stop = int(full[2])
    first = int(np.argmax(full == stop))  # the stop token's first appearance
    got = [int(t[0]) for t, _ in stream(model, params, prompt, 6, stop_ids=[stop])]
    assert got == [int(t) for t in full[: first + 1]]  # up to and including the stop token
    assert [int(t[0]) for t, _ in stream(model, params, prompt, 6)] == [int(t) for t in full]


def test_chat_prompt_renders_the_template():
    text = generation.chat_prompt(CHATML, "Hi there")
    assert text == "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n"


class _FakeHF:
    """Token 0 is special; tokens 1 and 2 are the two halves of the UTF-8 bytes of 'é'."""

    pieces = {0: "<|im_end|>", 1: b"\xc3", 2: b"\xa9", 3: "ab"}

    def decode(self, ids, skip_special_tokens=False):
        out = b""
        for i in ids:
            p = self.pieces[i]
            if i == 0 and skip_special_tokens:
                continue
            out += p.encode() if isinstance(p, str) else p
        return out.decode("utf-8", errors="replace")


class _FakeTokenizer:
    hf = _FakeHF()


def test_text_stream_skips_special_tokens_and_holds_back_partial_characters():
    shown = []
    s = generation._TextStream(_FakeTokenizer(), shown.append)
    for t in (3, 0, 1):
        s.push(t)
    assert shown == ["ab"]  # the special token printed nothing; half a character waits
    s.push(2)
    assert shown == ["ab", "é"] and "".join(shown) == s.text() == "abé"


def test_stop_ids_include_end_of_turn_tokens():
    class Tok:
        eos_id = 2

        class hf:  # noqa: N801 - a stand-in for tokenizers.Tokenizer
            @staticmethod
            def token_to_id(t):
                return {"<|im_end|>": 7, "<|endoftext|>": 0}.get(t)

    class Model:
        tokenizer = Tok()

    assert generation.stop_ids(Model(), {"tokenizer.ggml.eot_token_id": 9}) == [0, 2, 7, 9]
