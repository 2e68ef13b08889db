"""Tiny random decoders built from configs: fast, deterministic stand-ins for real models."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Olmo3Config, Olmo3ForCausalLM

VOCAB = 128


def tiny_llama(seed=0, tie=True, layers=2, **kw):
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=160, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        tie_word_embeddings=tie, **kw,
    )
    return LlamaForCausalLM(config).eval()


def tiny_olmo3(seed=0, layers=4):
    torch.manual_seed(seed)
    config = Olmo3Config(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=160, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        sliding_window=8, rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
        layer_types=["sliding_attention", "sliding_attention", "sliding_attention", "full_attention"][:layers],
        pad_token_id=0, eos_token_id=1, bos_token_id=None,
    )
    return Olmo3ForCausalLM(config).eval()


def pytest_collection_modifyitems(items):
    """Slow tests first, the longest (``slow(minutes=N)``) before all: under ``-n auto`` (scripts/test.sh)
    the workers share out the long tests at the start and end together (longest-first scheduling)."""
    def minutes(item) -> float:
        marks = list(item.iter_markers("slow"))
        return max((m.kwargs.get("minutes", 0.5) for m in marks), default=0.0)

    items.sort(key=lambda item: -minutes(item))


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    """Tiny matrices: one intra-op thread is many times faster than two, above all on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tokens(n=4, length=24, seed=1):
    return torch.randint(0, VOCAB, (n, length), generator=torch.Generator().manual_seed(seed))


@pytest.fixture
def llama():
    return tiny_llama()


@pytest.fixture
def olmo3():
    return tiny_olmo3()


WORDS = [f"w{i}" for i in range(VOCAB - 2)]


def tiny_tokenizer():
    """A word-level tokenizer over ``WORDS`` (ids 2..VOCAB-1), <unk>=0, <eos>=1."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<eos>": 1} | {w: i + 2 for i, w in enumerate(WORDS)}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", eos_token="<eos>")


def word_text(n_words, seed=0):
    """Deterministic text over ``WORDS`` with some local structure (a random walk)."""
    g = torch.Generator().manual_seed(seed)
    steps = torch.randint(-3, 4, (n_words,), generator=g)
    idx = (steps.cumsum(0) % len(WORDS)).tolist()
    return " ".join(WORDS[i] for i in idx)


@pytest.fixture
def tiny_folder(tmp_path):
    """A dense tiny Llama saved with its tokenizer, plus calibration and evaluation text files."""
    folder = tmp_path / "tiny"
    tiny_llama(layers=2).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    (tmp_path / "calib.txt").write_text(word_text(3000, seed=1))
    (tmp_path / "eval.txt").write_text(word_text(1500, seed=2))
    return folder


def folder_weights(folder):
    """Every tensor of a checkpoint folder, whatever its sharding (one file or one shard per layer)."""
    from pathlib import Path

    from safetensors.torch import load_file

    out = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        out.update(load_file(f))
    return out
