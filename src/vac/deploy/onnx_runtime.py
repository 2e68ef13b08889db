"""Generation with a ``vac export --onnx`` folder in ONNX Runtime (``vac chat/bench --runtime onnx``).

onnxruntime-genai was considered: it needs its own ``genai_config.json`` and graph conventions
(``past_key_values.N.key`` inputs, an attention mask), which transformers' exporter does not write, so
the loop is a small one over ``onnxruntime.InferenceSession`` with IO binding: each step's cache
outputs stay ORT values that are bound as the next step's inputs, never copied through numpy.

:class:`OnnxCausalLM` looks enough like a transformers model for vac's chat code: ``generate``
takes ``input_ids``, ``max_new_tokens``, ``min_new_tokens``, ``do_sample``/``temperature``/``top_p``/
``top_k``, ``eos_token_id`` and a ``streamer``, and returns the prompt followed by the new tokens.
Sampling uses transformers' own logits warpers. Batch 1 (the graph is traced without padding).
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from ..errors import VacError
from .onnx_export import GRAPH, MANIFEST


def is_onnx_folder(path) -> bool:
    return (Path(path) / MANIFEST).is_file()


class OnnxCausalLM:
    """An exported folder in an ONNX Runtime session on the CPU (``threads`` intra-op threads)."""

    def __init__(self, folder, *, threads: int | None = None):
        try:
            import onnxruntime as ort
        except ImportError:
            raise VacError("the ONNX runtime needs onnxruntime (pip install 'vac[onnx]')") from None

        folder = Path(folder)
        if not is_onnx_folder(folder):
            raise VacError(f"{folder} is not a vac ONNX export (no {MANIFEST}; write one with vac export --onnx)")
        self.folder = folder
        self.manifest = json.loads((folder / MANIFEST).read_text())
        options = ort.SessionOptions()
        if threads is not None:  # ORT sizes its pool from every core of the machine otherwise
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(str(folder / GRAPH), options, providers=["CPUExecutionProvider"])
        self.cache_inputs = self.manifest["cache"]["inputs"]
        self.cache_shapes = self.manifest["cache"]["shapes"]
        self.output_names = [o.name for o in self.session.get_outputs()]
        config = json.loads((folder / "config.json").read_text())
        self.config = SimpleNamespace(**config)
        gen_file = folder / "generation_config.json"
        self.generation_config = SimpleNamespace(**(json.loads(gen_file.read_text()) if gen_file.is_file() else {}))
        self.device = torch.device("cpu")
        self._ort = ort

    # ------------------------------------------------------------------------------------ one step

    def empty_cache(self) -> list:
        """Zero-length cache tensors of every layer (a fresh prompt)."""
        caches = []
        for name in self.cache_inputs:
            shape = list(self.cache_shapes[name])
            shape[0], shape[self.manifest["cache"]["time_axis"]] = 1, 0
            if None in shape:
                raise VacError(f"{self.folder}: the cache input {name} has an unknown size {shape}")
            caches.append(self._ort.OrtValue.ortvalue_from_numpy(np.zeros(shape, np.float32)))
        return caches

    def step(self, ids: np.ndarray, start: int, cache: list) -> tuple[np.ndarray, list]:
        """Logits [vocab] of the last of ``ids`` ([1, n] int64) at positions ``start..start+n-1``,
        after ``cache`` (the previous step's); returns them and the extended cache."""
        binding = self.session.io_binding()
        positions = np.arange(start, start + ids.shape[1], dtype=np.int64)[None]
        binding.bind_cpu_input("input_ids", np.ascontiguousarray(ids, dtype=np.int64))
        binding.bind_cpu_input("position_ids", positions)
        for name, value in zip(self.cache_inputs, cache):
            binding.bind_ortvalue_input(name, value)
        for name in self.output_names:
            binding.bind_output(name, "cpu")
        self.session.run_with_iobinding(binding)
        outputs = binding.get_outputs()
        logits = outputs[0].numpy()[0, -1]
        return logits, list(outputs[1:])

    def logits(self, ids) -> torch.Tensor:
        """Last-position logits after each token of ``ids`` ([1, n]), one cached step per token after
        the first ``ids[:, :1]``: what a decode loop sees (for tests against transformers)."""
        ids = torch.as_tensor(ids).numpy()
        cache, rows = self.empty_cache(), []
        for t in range(ids.shape[1]):
            row, cache = self.step(ids[:, t:t + 1], t, cache)
            rows.append(torch.from_numpy(row.copy()))
        return torch.stack(rows)

    # ---------------------------------------------------------------------------------- generation

    def generate(self, input_ids, *, max_new_tokens: int = 20, min_new_tokens: int = 0, do_sample: bool = False,
                 temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0, eos_token_id=None,
                 streamer=None, attention_mask=None, pad_token_id=None, **_ignored) -> torch.Tensor:
        """Greedy or sampled continuation of ``input_ids`` ([1, n]); returns [1, n + new] like
        ``transformers`` ``generate``. ``attention_mask`` must be all ones (batch 1, no padding)."""
        from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

        ids = torch.as_tensor(input_ids)
        if ids.dim() != 2 or ids.shape[0] != 1:
            raise VacError(f"the ONNX runtime decodes one sequence at a time, got input_ids of shape {tuple(ids.shape)}")
        if attention_mask is not None and not bool(torch.as_tensor(attention_mask).all()):
            raise VacError("the ONNX runtime takes no padding (attention_mask must be all ones)")
        stops = set([] if eos_token_id is None else [eos_token_id] if isinstance(eos_token_id, int) else eos_token_id)
        warpers = LogitsProcessorList()
        if do_sample:
            if temperature and temperature != 1.0:
                warpers.append(TemperatureLogitsWarper(temperature))
            if top_k:
                warpers.append(TopKLogitsWarper(top_k))
            if top_p < 1.0:
                warpers.append(TopPLogitsWarper(top_p))
        if streamer is not None:
            streamer.put(ids)
        tokens = ids[0].tolist()
        cache, fed = self.empty_cache(), ids.numpy()
        for new in range(max_new_tokens):
            logits, cache = self.step(fed, len(tokens) - fed.shape[1], cache)
            scores = torch.from_numpy(logits)[None]
            if new < min_new_tokens and stops:
                scores[0, list(stops)] = -float("inf")
            if do_sample:
                probs = torch.softmax(warpers(torch.tensor([tokens]), scores), dim=-1)
                token = int(torch.multinomial(probs[0], 1))
            else:
                token = int(scores[0].argmax())
            tokens.append(token)
            if streamer is not None:
                streamer.put(torch.tensor([token]))
            if token in stops:
                break
            fed = np.array([[token]], dtype=np.int64)
        if streamer is not None:
            streamer.end()
        return torch.tensor([tokens])
