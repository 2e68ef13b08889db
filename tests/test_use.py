"""vac chat / card / lm-eval on tiny models: think-block parsing, one-shot and interactive chat,
a card with measured numbers only, and the lm-evaluation-harness bridge."""

import importlib.util
import json
import math
import re
import string
import sys

import pytest
import torch
from conftest import VOCAB, tiny_llama
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast
from transformers.modeling_outputs import CausalLMOutputWithPast
from typer.testing import CliRunner

import vac.cli.use  # noqa: F401  (registers the commands on vac.cli.app)
from vac import checkpoint
from vac.cli import app
from vac.deploy.card import build_card, size_on_disk, write_card
from vac.deploy.chat import ThinkStream, generate_reply, prompt_opens_think, split_think
from vac.errors import VacError
from vac.models import zoo
from vac.models.layers import factorize_

SPECIALS = ["<pad>", "<eos>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]
CHARS = list(string.ascii_letters + string.digits + " .,!?'\n:-;")

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
# OLMo-3-Think style: the generation prompt itself opens the think block
THINK_OPENED = CHATML.replace("assistant\n{% endif %}", "assistant\n<think>{% endif %}")


def tiny_tokenizer(template=CHATML):
    """A character-level tokenizer (< VOCAB tokens) with ChatML roles and <think> tags marked special
    (so a decode with skip_special_tokens would lose them: the chat code must not)."""
    vocab = {t: i for i, t in enumerate(SPECIALS + CHARS + ["<unk>"])}
    assert len(vocab) <= VOCAB
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", eos_token="<eos>",
                                   additional_special_tokens=SPECIALS[2:])
    fast.chat_template = template
    return fast


class Scripted(LlamaForCausalLM):
    """A tiny Llama (config, generate, cache handling) whose every reply is a fixed token script
    followed by <|im_end|>; the decoder itself is skipped to keep tests fast."""

    script: list[int] = []

    def forward(self, input_ids=None, **kwargs):
        if input_ids.shape[1] > 1 or not hasattr(self, "step"):
            self.step = 0  # prefill of a new prompt
        token = self.script[self.step] if self.step < len(self.script) else 3  # <|im_end|>
        self.step += 1
        logits = torch.full((*input_ids.shape, self.config.vocab_size), -1e4)
        logits[..., token] = 1e4
        return CausalLMOutputWithPast(logits=logits)


def scripted(tok, text):
    model = Scripted(tiny_llama().config).eval()
    model.script = tok(text, add_special_tokens=False)["input_ids"]
    return model


THOUGHT, ANSWER = "Let me think: two and two.", "It is 4."
USER = [{"role": "user", "content": "What is 2+2?"}]


# ----------------------------------------------------------------------------------------- think parsing

@pytest.mark.parametrize("text, opened, expected", [
    ("<think>a b</think>\n\nanswer", False, ("a b", "answer")),
    ("plain answer", False, ("", "plain answer")),
    ("<think>cut off mid-thought", False, ("cut off mid-thought", "")),
    ("", False, ("", "")),
    ("still thinking</think> done", True, ("still thinking", "done")),
    ("never closed", True, ("never closed", "")),
    ("<think>repeated tag</think>ok", True, ("repeated tag", "ok")),
    ("thought without opening</think>answer", False, ("thought without opening", "answer")),
    ("Sure. <think>hmm</think> Yes.", False, ("hmm", "Sure.\nYes.")),
    ("  <think>\n\n</think>\n\nempty think", False, ("", "empty think")),
])
def test_split_think(text, opened, expected):
    assert split_think(text, opened) == expected


@pytest.mark.parametrize("text, opened", [
    ("<think>a b c</think>\n\nthe answer", False),
    ("  <think> x </thin", False),
    ("just an answer <b>", False),
    ("inside </think>  out", True),
])
@pytest.mark.parametrize("step", [1, 2, 5])
def test_think_stream_matches_split_think_for_any_piece_size(text, opened, step):
    think, answer = [], []
    stream = ThinkStream(opened, think.append, answer.append)
    for i in range(0, len(text), step):
        stream.feed(text[i:i + step])
    stream.close()
    assert ("".join(think).strip(), "".join(answer).strip()) == split_think(text, opened)


def test_prompt_opens_think_from_the_template():
    plain = tiny_tokenizer(CHATML).apply_chat_template(USER, add_generation_prompt=True, tokenize=False)
    opened = tiny_tokenizer(THINK_OPENED).apply_chat_template(USER, add_generation_prompt=True, tokenize=False)
    assert not prompt_opens_think(plain) and prompt_opens_think(opened)


# ----------------------------------------------------------------------------------------- generate_reply

def test_generate_reply_separates_and_streams_the_think_block():
    tok = tiny_tokenizer()
    model = scripted(tok, f"<think>{THOUGHT}</think>\n\n{ANSWER}")
    think, answer, events = [], [], []
    result = generate_reply(model, tok, USER, temperature=0, max_new_tokens=64,
                            on_think=think.append, on_answer=answer.append,
                            on_think_start=lambda: events.append("start"), on_think_end=lambda: events.append("end"))
    assert result == (THOUGHT, ANSWER)
    assert "".join(think) == THOUGHT and "".join(answer) == ANSWER
    assert events == ["start", "end"]


def test_generate_reply_when_the_template_opens_the_think_block():
    tok = tiny_tokenizer(THINK_OPENED)
    model = scripted(tok, f"{THOUGHT}</think>{ANSWER}")  # the model never writes <think> itself
    assert generate_reply(model, tok, USER, temperature=0.8, seed=1) == (THOUGHT, ANSWER)


def test_generate_reply_unterminated_think_and_plain_answers():
    tok = tiny_tokenizer()
    assert generate_reply(scripted(tok, f"<think>{THOUGHT}"), tok, USER, temperature=0) == (THOUGHT, "")
    assert generate_reply(scripted(tok, ANSWER), tok, USER, temperature=0) == ("", ANSWER)
    # out of tokens inside the think block
    think, answer = generate_reply(scripted(tok, f"<think>{THOUGHT}</think>{ANSWER}"), tok, USER,
                                   temperature=0, max_new_tokens=10)
    assert answer == "" and THOUGHT.startswith(think)


def test_generate_reply_random_model_sampling_is_seeded():
    tok = tiny_tokenizer()
    model = tiny_llama()
    a = generate_reply(model, tok, USER, max_new_tokens=8, seed=3)
    b = generate_reply(model, tok, USER, max_new_tokens=8, seed=3)
    assert a == b and all(isinstance(x, str) for x in a)
    assert generate_reply(model, tok, USER, max_new_tokens=8, temperature=0) == \
        generate_reply(model, tok, USER, max_new_tokens=8, temperature=0)


def test_generate_reply_errors_are_vac_errors():
    tok = tiny_tokenizer()
    tok.chat_template = None
    with pytest.raises(VacError, match="chat template"):
        generate_reply(tiny_llama(), tok, USER)
    with pytest.raises(VacError, match="top-p"):
        generate_reply(tiny_llama(), tiny_tokenizer(), USER, top_p=0)


# ----------------------------------------------------------------------------------------- vac chat

runner = CliRunner()


def one_line(stderr: str) -> str:
    """A `friendly` error: one message (rich may wrap it at the runner's 80 columns)."""
    assert stderr.count("error:") == 1, stderr
    return " ".join(stderr.split())


@pytest.fixture
def scripted_chat(monkeypatch):
    tok = tiny_tokenizer()
    model = scripted(tok, f"<think>{THOUGHT}</think>\n{ANSWER}")
    monkeypatch.setattr(zoo, "load_model", lambda spec, **kw: (model, tok))
    return model


def test_chat_one_shot_prints_the_answer_on_stdout(scripted_chat):
    result = runner.invoke(app, ["chat", "tiny", "-p", "What is 2+2?", "--temperature", "0"])
    assert result.exit_code == 0, result.output
    assert result.stdout == ANSWER + "\n"
    assert THOUGHT in result.stderr

    shown = runner.invoke(app, ["chat", "tiny", "-p", "What is 2+2?", "--show-think"])
    assert shown.stdout == f"<think>\n{THOUGHT}\n</think>\n\n{ANSWER}\n"

    hidden = runner.invoke(app, ["chat", "tiny", "-p", "-", "--hide-think"], input="What is 2+2?")
    assert hidden.stdout == ANSWER + "\n"
    assert THOUGHT not in hidden.stderr and "thought for" in hidden.stderr


def test_chat_interactive_exits_cleanly(scripted_chat):
    result = runner.invoke(app, ["chat", "tiny", "--seed", "0"], input="hello\n/reset\nagain\n/exit\nnever read\n")
    assert result.exit_code == 0, result.output
    assert result.stdout.count(ANSWER) == 2 and "conversation cleared" in result.stdout
    assert runner.invoke(app, ["chat", "tiny", "--hide-think"], input="hello\n").exit_code == 0  # EOF
    assert runner.invoke(app, ["chat", "tiny"], input="").exit_code == 0


def test_chat_one_shot_on_a_saved_checkpoint(tmp_path):
    model = factorize_(tiny_llama(), {"model.layers.0.mlp.down_proj": 8, "model.layers.1.self_attn.q_proj": 8})
    checkpoint.save(model, tiny_tokenizer(), tmp_path / "ckpt")
    result = runner.invoke(app, ["chat", str(tmp_path / "ckpt"), "-p", "hi", "--max-new-tokens", "6", "--seed", "0"])
    assert result.exit_code == 0, result.output
    assert result.stdout.endswith("\n")
    missing = runner.invoke(app, ["chat", str(tmp_path / "nope"), "-p", "hi"])
    assert missing.exit_code == 2 and "no such model folder" in one_line(missing.stderr)


# ----------------------------------------------------------------------------------------- vac card

REPORT = {
    "model": "smollm2-135m",
    "config": {"ratio": 1.8, "method": "vac", "allocation": "global", "sequential": True, "order": "middle-out",
               "fisher_exponent": 0.3333333333333333, "attn_ratio": None, "mlp_ratio": None, "rank_step": 8,
               "rank_floor": 8, "calib": "web-bible:calib+shakespeare:calib", "calib_windows": 64,
               "fisher_windows": 16, "seq_len": 512, "seed": 0},
    "decoder_linear_params": {"before": 106168320, "after": 58981376},
    "ratio_reached": 1.8000366, "component_ratio": {"attn": 2.3871, "mlp": 1.6912},
    "model_params_after": 87328128,
    "ppl_before": {"ppl": 36.9521, "nll": 3.6097, "tokens": 20440, "seq_len": 512, "windows": 40,
                   "data": "austen:eval"},
    "ppl_after": {"ppl": 61.7302, "nll": 4.1227, "tokens": 20440, "seq_len": 512, "windows": 40,
                  "data": "austen:eval"},
    "protocol": "40 non-overlapping windows of 512 tokens of austen:eval, all shifted tokens scored, use_cache=False",
    "seconds": {"calibrate": 301.7, "allocate": 12.25, "factorize": 88.1, "total": 455.93},
    "peak_rss_mb": 2389.6,
    "ranks": {"model.layers.0.mlp.down_proj": 8, "model.layers.1.self_attn.q_proj": 8},
    "command": "vac compress smollm2-135m --ratio 1.8 --out ckpt",
}
BENCH = {"decode_speedup": 1.1207, "prefill_speedup": 1.4612, "flops_ratio": 1.5409, "threads": 2,
         "prefill_tokens": 512, "dense": {"decode_tok_s": 14.02, "prefill_ms": 812.4},
         "command": "vac bench ckpt --json --threads 2"}
QUANT = {"size_before_bytes": 354123456, "size_after_bytes": 101234567, "ppl_before": 61.7302, "ppl_after": 62.0411}

NUMBER = re.compile(r"(?<![\w.])\d[\d,]*(?:\.\d+)?(?:e[+-]?\d+)?(?!\w|\.\d)")


def numbers_in(obj) -> list[float]:
    """Every number a fixture holds: values, and numerals inside its strings (e.g. its command)."""
    if isinstance(obj, bool) or obj is None:
        return []
    if isinstance(obj, (int, float)):
        return [float(obj)]
    if isinstance(obj, str):
        return [float(m.rstrip(",").replace(",", "")) for m in NUMBER.findall(obj)]
    if isinstance(obj, dict):
        return [x for k, v in obj.items() for x in numbers_in(k) + numbers_in(v)]
    return [x for v in obj for x in numbers_in(v)]


def shown_matches(shown: str, allowed: list[float]) -> bool:
    """Whether a number printed on the card is one of ``allowed`` rounded as printed."""
    shown = shown.rstrip(",").replace(",", "")
    mantissa, _, exp = shown.partition("e")
    decimals = len(mantissa.partition(".")[2])
    tol = 0.5 * 10 ** -decimals * (10 ** int(exp) if exp else 1) * (1 + 1e-9)
    return any(abs(float(shown) - v) <= tol for v in allowed)


def card_numbers(card: str) -> list[str]:
    """Numbers on the card, outside ```python usage samples (code, not figures)."""
    prose = re.sub(r"```python.*?```", "", card, flags=re.S)
    return NUMBER.findall(prose)


@pytest.fixture
def ckpt(tmp_path):
    model = factorize_(tiny_llama(), {"model.layers.0.mlp.down_proj": 8, "model.layers.1.self_attn.q_proj": 8})
    return checkpoint.save(model, tiny_tokenizer(), tmp_path / "ckpt", extra={"report.json": REPORT})


def test_card_holds_only_measured_numbers(ckpt):
    (ckpt / "bench.json").write_text(json.dumps(BENCH))
    (ckpt / "quantize.json").write_text(json.dumps(QUANT))
    card = build_card(ckpt)
    size = size_on_disk(ckpt)
    dec = REPORT["decoder_linear_params"]
    dense = REPORT["model_params_after"] + dec["before"] - dec["after"]  # stated as derived on the card
    allowed = numbers_in([REPORT, BENCH, QUANT]) + [
        size["weights_bytes"], size["weights_bytes"] / 1e6, size["total_bytes"], size["total_bytes"] / 1e6,
        dense, dense / REPORT["model_params_after"], len(REPORT["ranks"])]
    shown = card_numbers(card)
    assert len(shown) > 30
    assert [s for s in shown if not shown_matches(s, allowed)] == []
    # the headline figures are there, each section beside its command
    for figure in ("36.95", "61.73", "1.800×", "106,168,320", "58,981,376", "1.121×", f"{size['weights_bytes']:,}"):
        assert figure in card
    assert f"`{REPORT['command']}`" in card and f"`{BENCH['command']}`" in card
    assert "`vac quantize ckpt` (canonical form" in card  # quantize.json records no command
    assert REPORT["protocol"] in card
    assert "base_model: HuggingFaceTB/SmolLM2-135M-Instruct" in card


def test_card_leaves_out_sections_without_their_file(ckpt):
    card = build_card(ckpt)
    assert "## Compression" in card and "## Perplexity" in card and "## Size on disk" in card
    for absent in ("## Speed", "## INT8", "## lm-evaluation-harness", "speed-up", "bench.json"):
        assert absent not in card
    (ckpt / "report.json").unlink()
    bare = build_card(ckpt)
    assert "## Compression" not in bare and "## Perplexity" not in bare and "base_model" not in bare
    assert "## Size on disk" in bare and "## Usage" in bare
    shown = card_numbers(bare)
    size = size_on_disk(ckpt)
    assert all(shown_matches(s, [size["weights_bytes"], size["weights_bytes"] / 1e6, size["total_bytes"],
                                 size["total_bytes"] / 1e6]) for s in shown)


def test_card_command_writes_readme_atomically_and_usage_runs(ckpt, monkeypatch):
    result = runner.invoke(app, ["card", str(ckpt)])
    assert result.exit_code == 0, result.output
    card = (ckpt / "README.md").read_text()
    assert card == build_card(ckpt)  # the card does not count itself in the sizes
    assert not [p for p in ckpt.iterdir() if p.name.startswith(".")]
    write_card(ckpt)
    # the usage samples run as printed (in-process for speed; loading without vac importable is
    # covered by test_checkpoint)
    usage, int8 = re.findall(r"```python\n(.*?)```", card, flags=re.S)
    monkeypatch.chdir(ckpt.parent)
    scope = {}
    exec(usage, scope)
    assert scope["out"].shape[1] > scope["inputs"]["input_ids"].shape[1]
    if importlib.util.find_spec("torchao") is not None:
        exec(int8, scope)
        assert "Int8" in type(scope["model"].model.layers[1].self_attn.q_proj.down.weight).__name__
    bad = runner.invoke(app, ["card", str(ckpt / "missing")])
    assert bad.exit_code == 2 and "no such checkpoint folder" in bad.stderr


# ----------------------------------------------------------------------------------------- lm-eval

def test_lm_eval_missing_gives_one_line_error(monkeypatch, ckpt):
    monkeypatch.setitem(sys.modules, "lm_eval", None)
    result = runner.invoke(app, ["lm-eval", str(ckpt), "--limit", "2"])
    assert result.exit_code == 2
    assert "lm-eval is not installed" in one_line(result.stderr)


def _text_file(tmp_path):
    paragraphs = [f"Paragraph {i}: the quick brown fox jumps over the lazy dog, again and again." for i in range(12)]
    path = tmp_path / "held_out.txt"
    path.write_text("\n\n".join(paragraphs))
    return path


def test_lm_eval_local_ppl_on_tiny_model(tmp_path, monkeypatch, ckpt):
    pytest.importorskip("lm_eval", reason="lm-eval not installed (pip install 'vac[eval]')")
    from vac.deploy.lmeval import run_tasks

    monkeypatch.setenv("VAC_HOME", str(tmp_path / "home"))
    text = _text_file(tmp_path)
    result = run_tasks(tiny_llama(), tiny_tokenizer(), ["local-ppl"], limit=2, data=str(text), chunk_chars=200)
    metrics = result["tasks"]["local-ppl"]
    assert result["samples"]["local-ppl"]["effective"] == 2
    assert result["samples"]["local-ppl"]["original"] == 6
    for name in ("word_perplexity", "byte_perplexity", "bits_per_byte"):
        assert math.isfinite(metrics[name]) and metrics[name] > 0
    # a random model over ~80 tokens: per byte, no better than uniform-ish guessing
    assert metrics["byte_perplexity"] > 2
    assert math.isclose(metrics["bits_per_byte"], math.log2(metrics["byte_perplexity"]), rel_tol=1e-6)

    cli = runner.invoke(app, ["lm-eval", str(ckpt), "--data", str(text), "--limit", "1", "--chunk-chars", "200",
                              "--json", "--save"])
    assert cli.exit_code == 0, cli.output
    data = json.loads(cli.stdout.strip().splitlines()[-1])
    assert data["samples"]["local-ppl"]["effective"] == 1
    assert json.loads((ckpt / "lm_eval.json").read_text())["tasks"] == data["tasks"]
    card = build_card(ckpt)
    assert "## lm-evaluation-harness" in card and "word_perplexity" in card

    # (an unknown task name is reported as "lm-eval failed: ...", but indexing lm-eval's registry takes
    # half a minute, too slow here)
    empty = runner.invoke(app, ["lm-eval", str(ckpt), "--tasks", ","])
    assert empty.exit_code == 2 and "no tasks given" in one_line(empty.stderr)
