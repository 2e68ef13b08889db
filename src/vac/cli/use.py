"""``vac chat``, ``vac card`` and ``vac lm-eval``: using and describing a compressed model."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from ..config import DEFAULT_EVAL
from ..errors import VacError
from .app import app, check_runtime, friendly

# resolved at print time, so that redirected/captured streams are honoured
out = Console(highlight=False)
err = Console(stderr=True, highlight=False)

CHAT_HELP = "/exit or Ctrl-D quits, /reset clears the conversation, Ctrl-C stops a reply"


def _load(model: str, runtime: str = "torch"):
    from ..models.zoo import load_model

    check_runtime(runtime)
    with err.status(f"loading {model}…"):
        if runtime == "onnx":
            from transformers import AutoTokenizer

            from ..deploy.onnx_runtime import OnnxCausalLM

            net = OnnxCausalLM(model)  # refuses a folder that is not an export, in one line
            tok = AutoTokenizer.from_pretrained(model)
        else:
            net, tok = load_model(model)
    if tok is None:
        raise VacError(f"{model} has no tokenizer")
    return net, tok


@app.command()
@friendly
def chat(
    model: str = typer.Argument("smollm2-135m", help="vac checkpoint folder, model folder, embedded name or hub id"),
    prompt: Optional[str] = typer.Option(None, "--prompt", "-p",
                                         help="one-shot: answer this ('-' reads stdin), print the answer, exit"),
    system: Optional[str] = typer.Option(None, help="system message"),
    temperature: float = typer.Option(0.7, help="sampling temperature (0 = greedy)"),
    top_p: float = typer.Option(0.9, help="nucleus sampling probability mass"),
    max_new_tokens: int = typer.Option(512, help="most tokens per reply (think block included)"),
    seed: Optional[int] = typer.Option(None, help="sampling seed, for reproducible replies"),
    hide_think: bool = typer.Option(False, "--hide-think", help="fold the <think> block to a one-line summary"),
    show_think: bool = typer.Option(False, "--show-think", help="one-shot: put the <think> block on stdout too"),
    runtime: str = typer.Option("torch", help="torch (transformers) | onnx (ONNX Runtime: MODEL is a "
                                "`vac export --onnx` folder)"),
):
    """Chat with MODEL through its chat template; the <think> block is shown apart from the answer."""
    from ..deploy.chat import generate_reply, trim_history

    if prompt == "-":
        prompt = sys.stdin.read()
    if prompt is not None and not prompt.strip():
        raise VacError("the prompt is empty")
    net, tok = _load(model, runtime)
    if runtime == "torch":
        from ..deploy.decode import fast_decode_

        fast_decode_(net)  # vac checkpoints: the batch-1 decode layout (no-op for dense models)
    messages = [{"role": "system", "content": system}] if system else []
    sampling = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed)

    if prompt is not None:
        messages.append({"role": "user", "content": prompt})
        live_think = not show_think and not hide_think
        think, answer = generate_reply(
            net, tok, messages, **sampling,
            on_think=(lambda s: err.print(s, style="dim", end="", markup=False, soft_wrap=True)) if live_think else None,
            on_think_end=(lambda: err.print()) if live_think else None,
        )
        if hide_think and think:
            err.print(f"[dim]▸ thought for {len(think.split())} words[/dim]")
        if show_think and think:
            sys.stdout.write(f"<think>\n{think}\n</think>\n\n")
        sys.stdout.write(answer + "\n")
        sys.stdout.flush()
        return

    out.print(f"[bold]vac chat[/bold] · {model} · [dim]{CHAT_HELP}[/dim]")
    seed_now = seed
    while True:
        try:
            text = out.input("[bold green]you ›[/bold green] ")
        except (EOFError, KeyboardInterrupt):
            out.print()
            break
        command = text.strip().lower()
        if command in ("/exit", "/quit", "/bye"):
            break
        if command == "/reset":
            messages = messages[:1] if system else []
            out.print("[dim](conversation cleared)[/dim]")
            continue
        if command in ("/help", "/?"):
            out.print(f"[dim]{CHAT_HELP}[/dim]")
            continue
        if not text.strip():
            continue
        messages.append({"role": "user", "content": text})
        messages = trim_history(net, tok, messages, reserve=min(max_new_tokens, 256))
        view = _ReplyView(hide_think)
        try:
            think, answer = generate_reply(
                net, tok, messages, **{**sampling, "seed": seed_now},
                on_think=view.think, on_answer=view.answer,
                on_think_start=view.think_start, on_think_end=view.think_end,
            )
        except KeyboardInterrupt:
            view.stop()
            out.print("\n[dim](reply stopped)[/dim]")
            messages.pop()
            continue
        finally:
            view.stop()
        if seed_now is not None:
            seed_now += 1  # a fixed seed makes the session reproducible, not every reply identical
        if not answer:
            out.print("[dim](no answer: the think block did not end within --max-new-tokens)[/dim]"
                      if think else "[dim](empty reply)[/dim]")
        else:
            out.print()
        messages.append({"role": "assistant", "content": answer})


class _ReplyView:
    """Terminal rendering of one streamed reply: think text dimmed (or folded), then the answer."""

    def __init__(self, hide_think: bool):
        self.hide = hide_think
        self.started = None
        self.thought: list[str] = []
        self.answering = False
        self.status = None

    def think_start(self):
        self.started = time.perf_counter()
        if self.hide:
            if out.is_terminal:
                self.status = out.status("[dim]thinking…[/dim]")
                self.status.start()
        else:
            out.print("[dim]thinking ›[/dim] ", end="")

    def think(self, piece: str):
        self.thought.append(piece)
        if not self.hide:
            out.print(piece, style="dim italic", end="", markup=False, soft_wrap=True)

    def think_end(self):
        self.stop()
        took = time.perf_counter() - (self.started or time.perf_counter())
        if self.hide:
            out.print(f"[dim]▸ thought for {took:.1f} s ({len(''.join(self.thought).split())} words)[/dim]")
        else:
            out.print()

    def answer(self, piece: str):
        if not self.answering:
            self.answering = True
            out.print("[bold cyan]assistant ›[/bold cyan] ", end="")
        out.print(piece, end="", markup=False, soft_wrap=True)

    def stop(self):
        if self.status is not None:
            self.status.stop()
            self.status = None


@app.command()
@friendly
def card(
    folder: Path = typer.Argument(..., help="vac checkpoint folder"),
    stdout: bool = typer.Option(False, "--stdout", help="print the card instead of writing README.md"),
    overwrite: bool = typer.Option(False, help="replace a README.md that is not a vac card"),
):
    """Write FOLDER/README.md: a model card from measured numbers only (report/bench/quantize/lm_eval JSON)."""
    from ..deploy.card import build_card, write_card

    if stdout:
        sys.stdout.write(build_card(folder))
        return
    path = write_card(folder, overwrite=overwrite)
    present = [n for n in ("report.json", "bench.json", "quantize.json", "lm_eval.json") if (folder / n).is_file()]
    out.print(f"wrote {path} (from {', '.join(present) or 'the files only'} and the sizes on disk)")


@app.command("lm-eval")
@friendly
def lm_eval_cmd(
    model: str = typer.Argument("smollm2-135m", help="vac checkpoint folder, model folder, embedded name or hub id"),
    tasks: str = typer.Option("local-ppl", help="comma-separated: local-ppl and/or lm-eval task names"),
    data: str = typer.Option(DEFAULT_EVAL, help="text source of local-ppl, e.g. austen:eval or a .txt/.jsonl"),
    limit: Optional[float] = typer.Option(None, help="first N examples per task (a fraction if < 1)"),
    chunk_chars: int = typer.Option(4000, help="local-ppl passage length in characters (0 = whole documents)"),
    batch_size: int = typer.Option(1, help="lm-eval batch size"),
    max_length: Optional[int] = typer.Option(None, help="context window of the rolling scoring [model's]"),
    num_fewshot: Optional[int] = typer.Option(None, help="few-shot examples for registry tasks"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object on stdout"),
    save: bool = typer.Option(False, "--save", help="also write MODEL/lm_eval.json (read by vac card)"),
):
    """lm-evaluation-harness on MODEL, offline; local-ppl scores a local text source."""
    from ..core.report import summary_table
    from ..deploy.lmeval import require_lm_eval, run_tasks, save_results

    require_lm_eval()
    if save and not Path(model).is_dir():
        raise VacError(f"--save needs a model folder, not {model}")
    if limit is not None and limit >= 1:
        if limit != int(limit):
            raise VacError(f"--limit must be a whole number or a fraction < 1, got {limit:g}")
        limit = int(limit)
    net, tok = _load(model)
    result = run_tasks(net, tok, tasks.split(","), limit, data=data, chunk_chars=chunk_chars,
                       batch_size=batch_size, max_length=max_length, num_fewshot=num_fewshot)
    result = {"model": model, **result, "command": " ".join(["vac"] + sys.argv[1:])}
    if save:
        path = save_results(model, result)
        err.print(f"wrote {path}")
    if as_json:
        print(json.dumps(result))
        return
    rows = [(f"{task} {metric}", f"{value:.4f}") for task, metrics in result["tasks"].items()
            for metric, value in metrics.items()]
    out.print(summary_table(f"lm-eval on {model}", rows))
    if result.get("protocol"):
        out.print(f"[dim]protocol: {result['protocol']}[/dim]")
