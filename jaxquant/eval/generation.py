"""Text generation with the KV cache, from a prompt string, as a chat tool would do it.

* **Stops** at the model's end-of-sequence / end-of-turn tokens (:func:`stop_ids`).
* **Chat**: ``chat=True`` renders the prompt as a user message through the GGUF's
  ``tokenizer.chat_template`` (jinja2), with the generation prompt appended.
* **Streams**: ``on_text`` receives each new piece of text as soon as its tokens are decoded;
  special tokens are never part of the text, and a piece that ends inside a multi-byte character
  is held back until the character is complete.
* **Timing without compilation**: the prefill and the decode step are compiled and run once
  first (a warm-up on a throwaway cache of the same shapes); then time to first token (prefill
  plus the first sample) and decode tokens/s (the tokens after the first, over their time) are
  measured.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import jax
import jax.numpy as jnp

from jaxquant.eval import tasks
from jaxquant.models.registry import LoadedModel
from jaxquant.nn.decode import stream
from jaxquant.nn.modes import QuantMode
from jaxquant.nn.transformer import Transformer
from jaxquant.ptq.recipe import Recipe

# Token strings that end a turn in common chat formats (ChatML, Llama 3, Gemma, GPT-2).
END_OF_TURN = ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|end_of_text|>", "<end_of_turn>",
               "</s>")


def _gguf_fields(model: LoadedModel) -> dict:
    """The GGUF's ``tokenizer.*`` fields when ``model`` came from a GGUF, else {}."""
    try:
        from jaxquant.models.fetch import resolve_model
        from jaxquant.models.gguf_loader import gguf_metadata

        path = resolve_model(model.name)
    except Exception:  # not a GGUF-backed model (tiny, a Hugging Face folder, ...)
        return {}
    if not str(path).endswith(".gguf"):
        return {}
    return gguf_metadata(path, "tokenizer.")


def stop_ids(model: LoadedModel, fields: dict | None = None) -> list[int]:
    """The ids that end generation: the tokenizer's EOS, the GGUF's EOT / EOM, and the
    end-of-turn tokens of :data:`END_OF_TURN` that the vocabulary has."""
    fields = _gguf_fields(model) if fields is None else fields
    tok = model.tokenizer
    ids = {tok.eos_id} | {fields.get(f"tokenizer.ggml.{k}_token_id") for k in ("eot", "eom")}
    hf = getattr(tok, "hf", None)
    if hf is not None:
        ids |= {hf.token_to_id(t) for t in END_OF_TURN}
    return sorted(int(i) for i in ids if i is not None)


def chat_prompt(template: str, user: str, *, bos: str = "", eos: str = "") -> str:
    """``template`` (a Hugging Face / GGUF jinja2 chat template) applied to one user message,
    with the assistant's generation prompt appended."""
    try:
        import jinja2
    except ImportError as e:
        raise ValueError("--chat renders the GGUF's jinja2 chat template: pip install jinja2 "
                         "(or jaxquant[llama], which brings it).") from e

    env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True)
    env.globals["raise_exception"] = _raise
    return env.from_string(template).render(
        messages=[{"role": "user", "content": user}], add_generation_prompt=True,
        bos_token=bos, eos_token=eos)


def _raise(message):
    raise ValueError(f"chat template: {message}")


class _TextStream:
    """Incremental detokenization: the text of the tokens so far minus what was already given
    out; special tokens skipped; a trailing incomplete character held back."""

    def __init__(self, tokenizer, on_text: Callable[[str], None] | None):
        self.hf = getattr(tokenizer, "hf", None)
        self.tokenizer = tokenizer
        self.on_text = on_text
        self.ids: list[int] = []
        self.sent = ""

    def text(self) -> str:
        if self.hf is not None:
            return self.hf.decode(self.ids, skip_special_tokens=True)
        return self.tokenizer.decode(self.ids)

    def push(self, token: int) -> None:
        self.ids.append(token)
        text = self.text()
        if text.endswith("\ufffd"):  # inside a multi-byte character: wait for the rest
            return
        if text.startswith(self.sent) and len(text) > len(self.sent) and self.on_text:
            self.on_text(text[len(self.sent):])
        self.sent = text


def generate_text(model: LoadedModel, prompt: str, *, recipe: Recipe | None = None,
                  max_new_tokens: int = 40, temperature: float = 0.0,
                  kv_cache_qtype: str = "float", seed: int = 0, chat: bool = False,
                  on_text: Callable[[str], None] | None = None) -> dict:
    """Greedy (``temperature=0``) or sampled continuation of ``prompt``, streamed to ``on_text``.

    Calibration-free recipes (fp32, rtn, w8a8) are applied on the fly.

    Returns:
      A JSON-ready dict: the completion (special tokens removed), its token ids, why it stopped
      (``"stop_token"`` or ``"max_new_tokens"``), ``compile_seconds``, ``time_to_first_token_s``
      and ``decode_tokens_per_s`` (both without compilation).
    """
    recipe = recipe or Recipe(method="fp32")
    cfg, params, info = tasks.quantize(model, recipe, calib_windows=8, calib_len=256)
    mode = QuantMode.SERVE if cfg.quant_rules else QuantMode.TRAIN
    fields = _gguf_fields(model)
    text = prompt
    if chat:
        template = fields.get("tokenizer.chat_template")
        if not template:
            raise ValueError(f"{model.name} has no chat template (tokenizer.chat_template in its "
                             "GGUF); drop --chat or use a GGUF chat model such as smollm2-135m.")
        text = chat_prompt(template, prompt)
    ids = model.tokenizer.encode(text)
    if not ids:
        raise ValueError("The prompt is empty after tokenization; give some text.")
    stops = stop_ids(model, fields)
    net = Transformer(cfg, mode=mode)
    kv = None if kv_cache_qtype == "float" else kv_cache_qtype
    prompt_ids = jnp.asarray([ids], jnp.int32)

    def run(n):
        return stream(net, params, prompt_ids, n, temperature=temperature,
                      key=jax.random.key(seed) if temperature > 0 else None,
                      max_len=len(ids) + max_new_tokens, kv_cache_qtype=kv, stop_ids=stops)

    t0 = time.perf_counter()
    for tok, _ in run(2):  # compiles the prefill and the step (same shapes as below)
        jax.block_until_ready(tok)
    compile_s = time.perf_counter() - t0
    out = _TextStream(model.tokenizer, on_text)
    new, stopped = [], False
    t0 = time.perf_counter()
    ttft = t_first = None
    for tok, _ in run(max_new_tokens):
        t = int(tok[0])  # waits for the step
        if ttft is None:
            t_first = time.perf_counter()
            ttft = t_first - t0
        new.append(t)
        if t in stops:
            stopped = True
            break
        out.push(t)
    t_end = time.perf_counter()
    n_decoded = len(new) - 1
    return {"model": model.name, "recipe": recipe.name, "prompt": prompt, "chat": chat,
            "prompt_tokens": len(ids), "completion": out.text(), "tokens": new,
            "stop": "stop_token" if stopped else "max_new_tokens", "stop_ids": stops,
            "kv_cache": kv_cache_qtype, "compile_seconds": compile_s,
            "time_to_first_token_s": ttft,
            "decode_tokens_per_s": n_decoded / (t_end - t_first) if n_decoded > 0 else None,
            "seconds": t_end - t0}
