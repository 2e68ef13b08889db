"""Chat with a (compressed) model through its tokenizer's chat template.

The core is terminal-free: :func:`split_think` separates a ``<think>…</think>`` block from the answer,
:class:`ThinkStream` does the same on streamed text, and :func:`generate_reply` runs one assistant
turn, streaming the think text and the answer text to two callbacks. ``vac chat`` (in ``cli_use``)
is a thin terminal layer on top.

Templates of reasoning models (e.g. OLMo-3-Think) may open the think block in the prompt itself: the
generation prompt then ends with ``<think>`` and the model's text starts inside the block. That is
detected from the rendered prompt (:func:`prompt_opens_think`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..errors import VacError

THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"

# end-of-turn markers of common chat formats, used as extra stop tokens when the vocabulary has them
END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<|end_of_text|>", "<|endoftext|>", "<end_of_turn>", "</s>")


def split_think(text: str, opened: bool = False) -> tuple[str, str]:
    """``(think, answer)`` of a model's reply, both stripped.

    * ``<think>T</think>A`` → ``(T, A)``; text before ``<think>`` stays part of the answer.
    * ``opened`` (the prompt ended with ``<think>``), or a ``</think>`` with no ``<think>`` before it:
      everything up to ``</think>`` is thought.
    * an unterminated block (``<think>T`` with no close, e.g. out of tokens) → ``(T, "")``.
    * no think tags at all → ``("", text)``.
    """
    start = text.find(THINK_OPEN)
    close = text.find(THINK_CLOSE)
    if opened or (close >= 0 and (start < 0 or close < start)):
        before = ""
        body = text
        if body.lstrip().startswith(THINK_OPEN):  # a template that opened <think> and a model that repeats it
            body = body.lstrip()[len(THINK_OPEN):]
    elif start >= 0:
        before, body = text[:start], text[start + len(THINK_OPEN):]
    else:
        return "", text.strip()
    think, sep, after = body.partition(THINK_CLOSE)
    if not sep:
        return think.strip(), before.strip()
    answer = (before.rstrip() + "\n" + after.lstrip()) if before.strip() else after
    return think.strip(), answer.strip()


def prompt_opens_think(prompt: str) -> bool:
    """Whether a rendered generation prompt leaves a think block open (ends inside ``<think>``)."""
    return prompt.rfind(THINK_OPEN) > prompt.rfind(THINK_CLOSE) and prompt.rstrip().endswith(THINK_OPEN)


class ThinkStream:
    """Route streamed text pieces to ``on_think`` / ``on_answer`` as the think block opens and closes.

    Tags split across pieces are held back until they are complete; whitespace right after a tag
    and at the start of the answer is dropped. The final ``(think, answer)`` should still be taken
    from :func:`split_think` on the whole text, which also handles a ``</think>`` whose opening tag
    was never seen.
    """

    def __init__(self, opened: bool = False, on_think: Callable[[str], None] | None = None,
                 on_answer: Callable[[str], None] | None = None,
                 on_think_start: Callable[[], None] | None = None,
                 on_think_end: Callable[[], None] | None = None):
        self.state = "think" if opened else "start"
        self.buffer = ""
        self.on_think = on_think or (lambda s: None)
        self.on_answer = on_answer or (lambda s: None)
        self.on_think_start = on_think_start or (lambda: None)
        self.on_think_end = on_think_end or (lambda: None)
        self._answer_started = False
        self._think_started = False
        if opened:
            self._open_think()

    def _open_think(self):
        self.state = "think"
        self._think_started = False
        self.on_think_start()

    def _emit_think(self, text: str):
        if not self._think_started:
            text = text.lstrip()
            self._think_started = bool(text)
        if text:
            self.on_think(text)

    def _emit_answer(self, text: str):
        if not self._answer_started:
            text = text.lstrip()
            self._answer_started = bool(text)
        if text:
            self.on_answer(text)

    def feed(self, piece: str) -> None:
        self.buffer += piece
        while True:
            if self.state == "start":
                head = self.buffer.lstrip()
                if head.startswith(THINK_OPEN):
                    self.buffer = head[len(THINK_OPEN):]
                    self._open_think()
                    continue
                if not head or THINK_OPEN.startswith(head):
                    return  # maybe the beginning of <think>: wait for more
                self.state = "answer"
                continue
            if self.state == "think":
                at = self.buffer.find(THINK_CLOSE)
                if at >= 0:
                    self._emit_think(self.buffer[:at].rstrip())
                    self.buffer = self.buffer[at + len(THINK_CLOSE):]
                    self.state = "answer"
                    self.on_think_end()
                    continue
                # hold back a possible start of </think> and trailing whitespace (it may precede it)
                keep = _partial_suffix(self.buffer, THINK_CLOSE)
                head = self.buffer[: len(self.buffer) - keep]
                keep += len(head) - len(head.rstrip())
                self._emit_think(self.buffer[: len(self.buffer) - keep])
                self.buffer = self.buffer[len(self.buffer) - keep:]
                return
            self._emit_answer(self.buffer)
            self.buffer = ""
            return

    def close(self) -> None:
        """Flush what is held back (an unterminated think block ends here)."""
        if self.state == "think":
            self._emit_think(self.buffer.rstrip())
            self.on_think_end()
        elif self.buffer:
            self._emit_answer(self.buffer)
        self.buffer = ""
        self.state = "answer"


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of ``tag``."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if tag.startswith(text[-n:]):
            return n
    return 0


class _TextStreamer:
    """A ``generate`` streamer: decodes new tokens incrementally and passes text deltas on.

    Special tokens are dropped from the text except the think tags (some tokenizers mark ``<think>``
    special, so ``skip_special_tokens`` would lose it). Decoding the whole reply each step keeps
    multi-byte characters and merges right; text ending in an incomplete character is held back.
    """

    def __init__(self, tokenizer, on_text: Callable[[str], None]):
        self.tokenizer = tokenizer
        self.on_text = on_text
        self.ids: list[int] = []
        self.sent = 0
        self._prompt_seen = False
        self.drop = [t for t in _special_tokens(tokenizer) if t not in (THINK_OPEN, THINK_CLOSE)]

    def text(self) -> str:
        text = self.tokenizer.decode(self.ids, skip_special_tokens=False)
        for token in self.drop:
            text = text.replace(token, "")
        return text

    def put(self, value):
        if not self._prompt_seen:  # generate pushes the prompt first
            self._prompt_seen = True
            return
        self.ids += value.reshape(-1).tolist()
        text = self.text()
        if text.endswith("\ufffd"):
            return
        if len(text) > self.sent:
            self.on_text(text[self.sent:])
            self.sent = len(text)

    def end(self):
        text = self.text()
        if len(text) > self.sent:
            self.on_text(text[self.sent:])
            self.sent = len(text)


def _special_tokens(tokenizer) -> list[str]:
    tokens = set(getattr(tokenizer, "all_special_tokens", []) or [])
    for added in getattr(tokenizer, "added_tokens_decoder", {}).values():
        if getattr(added, "special", False):
            tokens.add(str(added))
    return sorted((t for t in tokens if t), key=len, reverse=True)


def render_prompt(tokenizer, messages: list[dict]) -> str:
    """The chat-template text of ``messages`` with the assistant generation prompt appended."""
    if tokenizer is None:
        raise VacError("this model has no tokenizer, so it cannot chat")
    if not getattr(tokenizer, "chat_template", None):
        raise VacError("the tokenizer has no chat template: chat needs an instruct/chat model")
    try:
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    except Exception as exc:  # jinja errors: a template that rejects a role, ...
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise VacError(f"the chat template failed: {first}") from exc


def stop_token_ids(model, tokenizer) -> list[int]:
    """EOS ids of the generation config and tokenizer, plus end-of-turn markers in the vocabulary."""
    ids: list[int] = []
    for source in (getattr(getattr(model, "generation_config", None), "eos_token_id", None),
                   tokenizer.eos_token_id):
        ids += source if isinstance(source, list) else [] if source is None else [source]
    vocab = tokenizer.get_vocab()
    ids += [vocab[t] for t in END_OF_TURN if t in vocab]
    return sorted(set(int(i) for i in ids))


def max_context(model) -> int | None:
    return getattr(model.config, "max_position_embeddings", None)


def generate_reply(
    model,
    tokenizer,
    messages: list[dict],
    *,
    max_new_tokens: int = 512,
    temperature: float = 0.7,
    top_p: float = 0.9,
    seed: int | None = None,
    on_think: Callable[[str], None] | None = None,
    on_answer: Callable[[str], None] | None = None,
    on_think_start: Callable[[], None] | None = None,
    on_think_end: Callable[[], None] | None = None,
) -> tuple[str, str]:
    """One assistant turn for ``messages``: ``(think, answer)``, streamed to the callbacks as it comes.

    ``temperature`` 0 decodes greedily; otherwise nucleus sampling with ``top_p``. ``seed`` makes a
    sampled reply reproducible. A KeyboardInterrupt stops generation and propagates.
    """
    if max_new_tokens < 1:
        raise VacError(f"--max-new-tokens must be at least 1, got {max_new_tokens}")
    if temperature < 0:
        raise VacError(f"--temperature must be >= 0, got {temperature:g}")
    if not 0 < top_p <= 1:
        raise VacError(f"--top-p must be in (0, 1], got {top_p:g}")
    prompt = render_prompt(tokenizer, messages)
    opened = prompt_opens_think(prompt)
    enc = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")
    device = model.device  # transformers models and vac.deploy.onnx_runtime.OnnxCausalLM alike
    input_ids = enc["input_ids"].to(device)
    limit = max_context(model)
    if limit is not None and input_ids.shape[1] >= limit:
        raise VacError(f"the conversation is {input_ids.shape[1]} tokens, the model's context is {limit}")
    if limit is not None:
        max_new_tokens = min(max_new_tokens, limit - input_ids.shape[1])
    router = ThinkStream(opened, on_think, on_answer, on_think_start, on_think_end)
    streamer = _TextStreamer(tokenizer, router.feed)
    stops = stop_token_ids(model, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (stops[0] if stops else 0)
    sampling = {"do_sample": False} if temperature == 0 else {
        "do_sample": True, "temperature": temperature, "top_p": top_p, "top_k": 0}
    if seed is not None:
        torch.manual_seed(seed)
    with torch.inference_mode():
        model.generate(
            input_ids=input_ids,
            attention_mask=enc["attention_mask"].to(device),
            max_new_tokens=max_new_tokens,
            eos_token_id=stops or None,
            pad_token_id=pad,
            streamer=streamer,
            **sampling,
        )
    router.close()
    return split_think(streamer.text(), opened)


def trim_history(model, tokenizer, messages: list[dict], reserve: int) -> list[dict]:
    """Drop the oldest user/assistant turns (never a leading system message, never the last user
    turn) until the prompt leaves ``reserve`` tokens of context for the reply."""
    limit = max_context(model)
    if limit is None:
        return messages
    messages = list(messages)
    first = 1 if messages and messages[0]["role"] == "system" else 0
    while len(messages) - first > 1:
        n = len(tokenizer(render_prompt(tokenizer, messages), add_special_tokens=False)["input_ids"])
        if n + reserve <= limit:
            break
        del messages[first: first + 2]
    return messages
