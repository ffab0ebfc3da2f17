"""`chatlora eval`: is the adapter any good? Base model and adapter side by side on held-out data.

Read top to bottom: held-out conversations (checked before any weight loads) → model → loss and
perplexity on the trained tokens → greedy replies with stop rate, length, repetition and ROUGE-L
against the reference reply → a JSON report and a Markdown summary.
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

from chatlora.data.collate import PadCollator
from chatlora.data.formats import Conversation
from chatlora.data.pipeline import held_out
from chatlora.errors import ChatloraError
from chatlora.evaluate.loss import held_out_batches, held_out_loss, held_out_samples
from chatlora.evaluate.metrics import ReplyStats, reply_stats
from chatlora.model.from_run import Loaded, load_target
from chatlora.generate.replies import Reply, generate_replies
from chatlora.generate.sampling import Sampling
from chatlora.run import run_folder, write_atomic

SIDES = ("base", "adapter")


def _counted(batches, progress):
    for batch in batches:
        yield batch
        if progress is not None:
            progress.update(len(batch["input_ids"]))


def side_by_side(loaded: Loaded, conversations: list[Conversation], max_new_tokens: int, samples: list[dict],
                 batch_size: int = 8) -> tuple[dict[str, dict], dict[str, list[Reply]]]:
    """Held-out loss and perplexity on `samples` (evaluate/loss.py), and reply statistics on the
    conversations, of the base model and the adapter; and their replies."""
    from tqdm.auto import tqdm

    prompts = [c.messages[:-1] for c in conversations]
    references = [c.messages[-1]["content"] for c in conversations]
    results: dict[str, dict] = {}
    replies: dict[str, list[Reply]] = {}
    batches = held_out_batches(samples, PadCollator(loaded.renderer.tokenizer.pad_token_id), batch_size)
    for side in SIDES:
        # The base model is the same peft model with its adapter switched off: no second copy in memory.
        with loaded.model.disable_adapter() if side == "base" else contextlib.nullcontext():
            with tqdm(total=len(samples), desc=f"held-out loss ({side})", unit="row", leave=False) as bar:
                loss = held_out_loss(loaded.model, _counted(batches, bar))
            with tqdm(total=len(prompts), desc=f"greedy replies ({side})", unit="prompt", leave=False) as bar:
                replies[side] = generate_replies(loaded.model, loaded.renderer, prompts, Sampling(max_new_tokens=max_new_tokens),
                                                  batch_size, progress=bar)
        got = replies[side]
        stats: ReplyStats = reply_stats([r.ids for r in got], [r.stopped for r in got], [r.text for r in got], references)
        results[side] = {"loss": loss.loss, "perplexity": loss.perplexity, "trained_tokens": loss.tokens, **asdict(stats)}
    return results, replies


ROWS = [  # (key, label, format, better)
    ("loss", "held-out loss", "{:.4f}", "lower"),
    ("perplexity", "perplexity", "{:.2f}", "lower"),
    ("rouge_l", "ROUGE-L (chars) vs reference", "{:.3f}", "higher"),
    ("stop_rate", "stop rate", "{:.0%}", "higher"),
    ("mean_tokens", "mean reply length (tokens)", "{:.1f}", ""),
    ("repetition", "repetition (seq-rep-4)", "{:.3f}", "lower"),
]


def summary_table(results: dict[str, dict]) -> list[str]:
    lines = ["| metric | base | adapter |", "| --- | ---: | ---: |"]
    for key, label, fmt, better in ROWS:
        note = f" ({better} is better)" if better else ""
        lines.append(f"| {label}{note} | {fmt.format(results['base'][key])} | {fmt.format(results['adapter'][key])} |")
    return lines


def markdown(report: dict, examples: int = 3) -> str:
    """A short human summary of the report."""
    lines = [f"# chatlora eval: {report['target']}", "",
             f"{report['rows']} held-out conversations from {report['data']}; greedy replies, at most "
             f"{report['max_new_tokens']} new tokens.", ""]
    lines += summary_table(report["results"]) + [""]
    for row in report["replies"][:examples]:
        lines += [f"**{row['prompt']}**", "", f"- base: {row['base']['text']}" + ("" if row["base"]["stopped"] else " *[hit the token limit]*"),
                  f"- adapter: {row['adapter']['text']}" + ("" if row["adapter"]["stopped"] else " *[hit the token limit]*"),
                  f"- reference: {row['reference']}", ""]
    return "\n".join(lines)


def report_folder(target: str, out: str | None) -> Path:
    """Where the report goes: `out`, else the run folder's eval/ (a bare adapter folder's, if no run).
    Refused before any model loads when it is a file."""
    run = run_folder(target)
    folder = Path(out) if out else (run or Path(target)) / "eval"
    if folder.exists() and not folder.is_dir():
        raise ChatloraError(f"--out {folder} is a file; give a folder for the report")
    return folder


def _may_replace(path: Path, report: Path) -> None:
    """A report file may replace only an earlier report: never the user's data or notes that happen to
    share its name (`--out` next to the data file, `--data my/validation.json`)."""
    if not path.exists():
        return
    try:
        earlier = json.loads(report.read_text(encoding="utf-8"))
        ours = isinstance(earlier, dict) and {"target", "results", "replies"} <= earlier.keys()
    except (OSError, ValueError):
        ours = False
    if not ours:
        raise ChatloraError(f"{path} exists and is not an earlier chatlora eval report; it is left as it is. "
                            "Write the report elsewhere with --out DIR")


def evaluate(target: str, data: str | None = None, *, model: str | None = None, max_new_tokens: int = 128,
             limit: int | None = None, batch_size: int = 8, out: str | None = None, device: str | None = None,
             echo: Callable[[str], None] = print) -> dict:
    """`chatlora eval`: compare the base model and the adapter on held-out data; returns the report,
    also written as `<out>/<data name>.json` and `.md` (out defaults to `<run>/eval/`).

    Raises DataError (bad rows, before any model loads) or ChatloraError (nothing to evaluate on).
    """
    conversations, name = held_out(target, data)
    folder = report_folder(target, out)
    for path in (folder / f"{name}.json", folder / f"{name}.md"):
        _may_replace(path, folder / f"{name}.json")
    if limit:
        conversations = conversations[:limit]
    # The loss is over every held-out conversation, as training's is; replies are compared for those
    # that end with one.
    replied = [c for c in conversations if c.messages[-1]["role"] == "assistant"]
    if not replied:
        raise ChatloraError(f"no held-out conversation ends with an assistant reply to compare against ({name})")
    echo(f"evaluating on {len(conversations)} held-out conversations ({data or 'the run validation data'})")
    loaded = load_target(target, model, device)
    max_length, overlong = (loaded.config.data.max_length, loaded.config.data.overlong) if loaded.config else (2048, "drop")
    samples = held_out_samples([c.messages for c in conversations], loaded.renderer, max_length, overlong)
    results, replies = side_by_side(loaded, replied, max_new_tokens, samples, batch_size)
    report = {
        "target": str(target), "data": data or "validation (from the run config)", "rows": len(replied),
        "loss_rows": len(samples), "max_new_tokens": max_new_tokens, "results": results,
        "replies": [{"prompt": c.messages[-2]["content"], "reference": c.messages[-1]["content"],
                     **{side: {"text": replies[side][i].text, "stopped": replies[side][i].stopped,
                               "tokens": len(replies[side][i].ids)} for side in SIDES}}
                    for i, c in enumerate(replied)],
    }
    folder.mkdir(parents=True, exist_ok=True)
    write_atomic(folder / f"{name}.json", _json(report))
    write_atomic(folder / f"{name}.md", markdown(report))
    for line in summary_table(results):
        echo(line)
    if results["adapter"]["trained_tokens"] == 0:
        echo(f"warning: no conversation fits data.max_length={max_length} with its reply, so there is no held-out loss "
             "(shown as nan); the replies are still compared")
    elif len(samples) < len(conversations):
        echo(f"note: {len(conversations) - len(samples)} of {len(conversations)} conversations are left out of the held-out "
             f"loss: a reply alone is longer than data.max_length={max_length}")
    for side in SIDES:
        if results[side]["stop_rate"] == 0:
            echo(f"warning: no {side} reply ended on the end-of-turn token within {max_new_tokens} tokens")
    echo(f"report: {folder / (name + '.json')}  summary: {folder / (name + '.md')}")
    return report


def _json(data) -> str:

    # NaN/inf are not JSON; a report must load in any JSON reader.
    clean = lambda v: None if isinstance(v, float) and not math.isfinite(v) else v  # noqa: E731
    walk = lambda x: {k: walk(v) for k, v in x.items()} if isinstance(x, dict) else [walk(v) for v in x] if isinstance(x, list) else clean(x)  # noqa: E731
    return json.dumps(walk(data), ensure_ascii=False, indent=2)
