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


def tokens(n=4, length=24, seed=1):
    return torch.randint(0, VOCAB, (n, length), generator=torch.Generator().manual_seed(seed))


@pytest.fixture
def llama():
    return tiny_llama()


@pytest.fixture
def olmo3():
    return tiny_olmo3()
