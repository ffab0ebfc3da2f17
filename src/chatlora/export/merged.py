"""A run merged into a standalone model (safetensors, tokenizer, chat template, generation config
that stops on the end-of-turn token), checked against the adapter it came from: `chatlora merge`
itself, and the first step of `chatlora export` (recipes/merge.py, recipes/export.py).

Read top to bottom: refuse a non-finite adapter → load base + adapter → reference logits on held-out
conversations → merge → save to a temporary folder → reload from disk as any other program would →
compare logits (max difference, top-1 agreement) → rename into place, or fail and leave nothing.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import torch

from chatlora.data.collate import PadCollator
from chatlora.data.formats import Conversation
from chatlora.data.pipeline import held_out
from chatlora.errors import ChatloraError, DataError
from chatlora.evaluate.loss import held_out_batches, held_out_loss, held_out_samples
from chatlora.model import quant
from chatlora.model.from_run import Loaded, default_device, load_target
from chatlora.model.load import add_stop_tokens, resolve_dtype, stop_ids
from chatlora.run import check_new_folder, staged, target_config

# What "equal" means for merged vs adapter-on logits, by the dtype the merged weights are saved in.
# float32: W + BA and Wx + B(Ax) differ only by rounding order (SmolLM2-135M: 1.4e-4; deeper, wider
# models add up more rounding, hence 1e-2). A merge gone wrong (a layer left out, a wrong scale)
# moves logits by tenths or more. 16-bit: the merged weight is rounded to 8 (bf16) or 11 (fp16)
# mantissa bits once more, which itself moves logits by a few tenths.
TOLERANCE = {torch.float32: (1e-2, 0.99), torch.float16: (0.5, 0.95), torch.bfloat16: (1.0, 0.95)}
# Logits kept for the comparison, at most: positions x vocabulary x 4 bytes is held in memory.
MAX_POSITIONS = 1024
# Prompts for the parity check when the run's data cannot be read (moved or deleted since training).
FALLBACK_PROMPTS = ["Hello! Who are you?", "Explain in two sentences why the sky is blue.",
                    "Write a short poem about the sea.", "What is 17 times 23?"]


def adapter_file(target: str | Path) -> Path:
    folder = Path(target)
    for candidate in (folder / "adapter", folder):
        if (candidate / "adapter_model.safetensors").is_file():
            return candidate / "adapter_model.safetensors"
    raise ChatloraError(f"{target} has no adapter_model.safetensors (in it or in its adapter/ folder); did training finish?")


def check_finite(path: Path) -> None:
    """Raise ChatloraError naming every adapter tensor that holds NaN or inf (a diverged run): merged,
    they would silently poison the base weights. A damaged adapter file (or config) is a ModelError
    naming it, before anything is read from it."""
    from safetensors import safe_open

    from chatlora.model.from_run import check_adapter

    check_adapter(path.parent)
    bad = []
    with safe_open(str(path), framework="pt") as f:
        for key in f.keys():
            tensor = f.get_tensor(key)
            if tensor.is_floating_point():
                nan, inf = int(torch.isnan(tensor).sum()), int(torch.isinf(tensor).sum())
                if nan or inf:
                    bad.append(f"  {key}: {nan} NaN, {inf} inf of {tensor.numel()} values")
    if bad:
        shown = bad[:10] + ([f"  ... and {len(bad) - 10} more tensors"] if len(bad) > 10 else [])
        raise ChatloraError(f"{path}: the adapter has non-finite weights (training diverged?); refusing to merge:\n"
                            + "\n".join(shown) + "\nRetrain with a lower learning rate, or merge an earlier checkpoint.")


def parity_texts(target: str, data: str | None, prompts: int, echo: Callable[[str], None]) -> tuple[list[list[dict]], str]:
    """Conversations to compare logits on, and what they are: `data`, else the run's held-out rows,
    else its training rows."""
    kind = f"conversations of {data}" if data else "held-out conversations"
    try:
        conversations: list[Conversation] = held_out(target, data)[0]
    except DataError:
        if data:
            raise
        conversations = []
    except ChatloraError:
        if data:
            raise
        cfg = target_config(target)
        try:
            from chatlora.data.prepare import load_conversations

            conversations = load_conversations(cfg.data)[0][-prompts:] if cfg else []
            kind = "training conversations (the run has no held-out data)"
        except DataError:
            conversations = []
    if not conversations:
        echo("note: the run's data cannot be read; checking parity on a few generic prompts")
        return [[{"role": "user", "content": p}] for p in FALLBACK_PROMPTS[:prompts]], "generic prompts"
    return [c.messages for c in conversations[:prompts]], kind


@torch.no_grad()
def logits_of(model, batches: list[list[int]]) -> list[torch.Tensor]:
    device = next(model.parameters()).device
    return [model(input_ids=torch.tensor([ids], device=device), use_cache=False).logits[0].float().cpu() for ids in batches]


def compare(reference: list[torch.Tensor], merged: list[torch.Tensor]) -> dict:
    """Max absolute logit difference and the share of positions whose most likely token agrees."""
    ref, got = torch.cat(reference), torch.cat(merged)
    return {"positions": ref.shape[0], "max_abs_diff": float((ref - got).abs().max()),
            "top1_agreement": float((ref.argmax(-1) == got.argmax(-1)).float().mean())}


def merge_to(target: str, out: str, *, model: str | None = None, dtype: str = "auto", data: str | None = None,
          prompts: int = 8, max_diff: float | None = None, min_top1: float | None = None, device: str | None = None,
          echo: Callable[[str], None] = print) -> dict:
    """Merge the adapter into the base weights and save a standalone model to `out`; returns the parity result.

    Raises ChatloraError when `out` exists and is not empty, when the adapter holds NaN/inf, or when
    the reloaded merged model's logits fall outside the tolerance (nothing is left at `out`).
    """
    from transformers import AutoModelForCausalLM

    final = Path(out)
    check_new_folder(final)
    check_finite(adapter_file(target))
    conversations, kind = parity_texts(target, data, prompts, echo)
    loaded: Loaded = load_target(target, model, device)
    renderer, tokenizer = loaded.renderer, loaded.tokenizer
    budget = max(1, MAX_POSITIONS // len(conversations))
    texts = [(renderer.tokenize(m).input_ids if m[-1]["role"] == "assistant" else renderer.prompt_ids(m))[:budget]
             for m in conversations]

    echo(f"reference: base + adapter logits on {len(texts)} {kind}")
    reference = logits_of(loaded.model, texts)
    # The held-out loss (evaluate/loss.py) of the rows that end with a reply, before and after: the
    # number `chatlora eval` and training report, for the merged model too.
    max_length, overlong = (loaded.config.data.max_length, loaded.config.data.overlong) if loaded.config else (2048, "drop")
    samples = held_out_samples([m for m in conversations if m[-1]["role"] == "assistant"], renderer, max_length, overlong)
    batches = held_out_batches(samples, PadCollator(tokenizer.pad_token_id), 8)
    loss_before = held_out_loss(loaded.model, batches) if samples else None
    four_bit = quant.is_4bit(loaded.model.get_base_model())
    if four_bit:
        merged = merge_dequantized(loaded.model, adapter_file(target).parent, echo)
    else:
        merged = loaded.model.merge_and_unload(progressbar=True)
    save_dtype = resolve_dtype(dtype) if dtype != "auto" else next(merged.parameters()).dtype
    merged = merged.to(save_dtype)
    end_of_turn = renderer.end_of_turn()
    if end_of_turn is not None and end_of_turn not in stop_ids(merged.generation_config):
        # Servers stop on generation_config.json's eos ids: without the end-of-turn token a merged
        # model talks on past its reply.
        add_stop_tokens(merged.generation_config, tokenizer, [tokenizer.convert_ids_to_tokens(end_of_turn)])
    stops = [tokenizer.convert_ids_to_tokens(i) for i in stop_ids(merged.generation_config)]

    with staged(final) as tmp:
        echo(f"saving the merged model ({str(save_dtype).removeprefix('torch.')}) ...")
        merged.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        readable(tmp)
        del merged, loaded.model  # the reloaded copy below must not share memory with these
        echo("reloading it from disk to check parity ...")
        reloaded = AutoModelForCausalLM.from_pretrained(tmp, dtype=save_dtype, device_map=device or default_device())
        reloaded.eval()
        result = compare(reference, logits_of(reloaded, texts))
        if loss_before is not None:
            result["held_out_loss"] = {"rows": len(samples), "trained_tokens": loss_before.tokens,
                                       "adapter": loss_before.loss, "merged": held_out_loss(reloaded, batches).loss}
        saved_stops = stop_ids(reloaded.generation_config)
        del reloaded
        atol, top1 = TOLERANCE.get(save_dtype, TOLERANCE[torch.float32])
        atol = atol if max_diff is None else max_diff
        top1 = top1 if min_top1 is None else min_top1
        result.update(dtype=str(save_dtype).removeprefix("torch."), max_diff_allowed=atol, min_top1_allowed=top1,
                      stop_tokens=stops, source=str(target),
                      end_of_turn=None if end_of_turn is None else tokenizer.convert_ids_to_tokens(end_of_turn))
        echo(f"parity on {result['positions']} positions: max |logit difference| {result['max_abs_diff']:.3g} "
             f"(allowed {atol:g}), top-1 agreement {result['top1_agreement']:.2%} (required {top1:.0%})")
        if "held_out_loss" in result:
            held = result["held_out_loss"]
            echo(f"held-out loss on {held['rows']} of those rows: {held['adapter']:.4f} base + adapter, "
                 f"{held['merged']:.4f} merged")
        if end_of_turn is not None and end_of_turn not in saved_stops:
            raise ChatloraError("the saved generation config does not stop on the end-of-turn token")
        if not result["max_abs_diff"] <= atol or result["top1_agreement"] < top1:
            raise ChatloraError(
                f"the merged model does not match base + adapter within the tolerance (max |logit difference| "
                f"{result['max_abs_diff']:.3g} > {atol:g} or top-1 agreement {result['top1_agreement']:.2%} < {top1:.0%}); "
                f"nothing was written to {final}. A 16-bit --dtype loosens the tolerance; --max-diff sets it.")
        if four_bit:
            result["dequantized_from"] = "nf4"
            echo(f"warning: this adapter was trained on a 4-bit (NF4) base. The merged model is that base de-quantized "
                 f"to {result['dtype']} with the adapter merged in: against the 4-bit base + adapter it was trained as, "
                 f"max |logit difference| {result['max_abs_diff']:.3g}, top-1 agreement {result['top1_agreement']:.2%}. "
                 "Its weights carry the 4-bit rounding: it is not the original 16-bit base + adapter.")
        (tmp / "chatlora_merge.json").write_text(json.dumps(result, indent=2), encoding="utf-8")
    echo(f"merged model: {final}  (stops on {', '.join(stops)})")
    return result


def merge_dequantized(model, adapter_dir: Path, echo: Callable[[str], None]):
    """Merge into a de-quantized copy of a 4-bit base. peft's own merge into 4-bit layers
    re-quantizes the sum, losing most of the adapter's small update to 4-bit rounding; instead the
    base's weights are de-quantized exactly as the 4-bit matmuls saw them, and the adapter merged
    into those in 16 bits."""
    from peft import PeftModel

    echo("the base is 4-bit (NF4): de-quantizing it to bfloat16, then merging the adapter into it")
    base = quant.dequantize(model.unload(), torch.bfloat16)
    return PeftModel.from_pretrained(base, adapter_dir).merge_and_unload(progressbar=True)


def readable(folder: Path) -> None:
    """Give every saved file the permissions the user's umask asks for: safetensors writes its file
    through a private temporary (mode 0600), which a server running as another user cannot read."""
    mask = os.umask(0)
    os.umask(mask)
    for file in folder.iterdir():
        os.chmod(file, 0o666 & ~mask)
