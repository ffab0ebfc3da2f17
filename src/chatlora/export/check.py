"""The check after writing a GGUF: llama.cpp (llama-cpp-python) loads the file as Ollama, LM Studio
and llama-server would, and it is compared with the merged model in transformers on held-out
conversations.

- Teacher-forced next-token agreement: both read the same token ids; on the positions whose next
  token is a reply token (the tokens a user of the GGUF sees generated), does the most likely next
  token agree (top-1), and how far apart are the two distributions (the mean KL(transformers ||
  llama.cpp), in nats)? The same over every position (system and user text too, where a chat model
  is unsure and near-ties flip) is reported beside it (`*_all`).
- Tokenizer: llama.cpp's tokenization of the rendered conversations (BOS added where the GGUF asks
  for it, as servers do) equals transformers'.
- Greedy replies through the GGUF's own embedded chat template (llama-cpp-python's
  `chat_template.default` handler renders `tokenizer.chat_template` from the file): wherever
  transformers' greedy reply ends on a stop token, llama.cpp's must end too ("stop", not "length").

Thresholds by type (docs/export.md): below them, the export fails with the figures.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import torch

# Least teacher-forced top-1 agreement, by GGUF type. f16/bf16 only round the weights once more;
# q8_0 keeps 8 bits per weight with a scale per 32; q4_k_m (4-5 bits) moves logits enough to flip
# near-ties, which a persona model's long replies are full of. Measured figures: docs/export.md.
MIN_TOP1 = {"f16": 0.99, "bf16": 0.98, "q8_0": 0.98, "q4_k_m": 0.90}
# llama.cpp's reply may run this much longer than transformers' before it must have stopped:
# quantized weights shift a greedy reply by a few tokens without it losing its end.
REPLY_SLACK = 1.5


def kl_and_top1(reference: torch.Tensor, got: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per position: KL(softmax(reference) || softmax(got)) and whether the argmax agrees. Both
    [positions, vocab]; a longer vocabulary (padding rows the converter added) is cut to the shorter."""
    n = min(reference.shape[-1], got.shape[-1])
    ref, new = reference[:, :n].float().log_softmax(-1), got[:, :n].float().log_softmax(-1)
    kl = (ref.exp() * (ref - new)).sum(-1)
    return kl, reference[:, :n].argmax(-1) == got[:, :n].argmax(-1)


def check_gguf(gguf_file: Path, merged_dir: Path, conversations: list[list[dict]], quant: str, *,
               prompts: int = 8, max_new_tokens: int = 64, positions: int = 2048, min_top1: float | None = None,
               echo: Callable[[str], None] = print) -> dict:
    """The figures of the check (see the module's docstring), with `passed` and, when it did not pass,
    `failures` (sentences). Teacher-forced on whole conversations, in order, up to `positions` tokens
    in all (one that does not fit is left out; the first is cut when it alone is longer); greedy
    replies to the first `prompts`.
    `min_top1`: the least top-1 agreement, instead of MIN_TOP1's. Runs on CPU, as the GGUF's users do.

    Whole conversations, not each one cut to an equal share of the budget: the figure must not depend
    on where the cut falls. Cut short, only the easy first tokens of each reply are left (the demo's
    q8_0 read 99.18% with 24 conversations cut to 42 tokens, 96.75% with 8 nearly whole, 97.06% with
    all 24 whole: bench/LOG.md, 2026-12-08)."""
    least = MIN_TOP1[quant] if min_top1 is None else min_top1
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from chatlora.data.render import Renderer
    from chatlora.export.gguf import llama_cpp
    from chatlora.model.load import stop_ids

    lib = llama_cpp()
    tokenizer = AutoTokenizer.from_pretrained(merged_dir)
    model = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32).eval()
    stops = set(stop_ids(model.generation_config))
    renderer = Renderer(tokenizer, stops)
    texts, samples, ids, used, left_out = [], [], [], 0, 0
    for messages in conversations:
        if used >= positions or left_out >= 64:  # full, or what is left is longer than the room
            break
        text = renderer.text(messages)
        sample = renderer.tokenize(messages) if messages[-1]["role"] == "assistant" else None
        row = sample.input_ids if sample else renderer.encode(text)
        if used + len(row) > positions:
            if ids:  # a long one left out does not end the sample: shorter ones after it may fit
                left_out += 1
                continue
            row = row[:positions]
        texts.append(text)
        samples.append(sample)
        ids.append(row)
        used += len(row)
    # Positions whose next token is a trained reply token: what a GGUF's user sees generated.
    replying = [torch.tensor([t is not None and t.labels[i + 1] != -100 if i + 1 < len(t.labels) else False
                              for i in range(len(row))]) if t else torch.zeros(len(row), dtype=torch.bool)
                for t, row in zip(samples, ids)]
    asked = [m[:-1] if m[-1]["role"] == "assistant" else m for m in conversations[:prompts]]
    asked_ids = [renderer.prompt_ids(p) for p in asked]
    # Room for the longest teacher-forced row, and for the longest asked prompt with its reply.
    n_ctx = max(max(len(i) for i in ids), max(map(len, asked_ids)) + math.ceil(max_new_tokens * REPLY_SLACK)) + 64

    echo(f"check: llama.cpp reads {gguf_file.name}; teacher-forced on {sum(map(len, ids))} positions of "
         f"{len(ids)} conversations ...")
    llm = lib.Llama(model_path=str(gguf_file), n_ctx=n_ctx, logits_all=True, verbose=False, n_gpu_layers=0,
                    chat_format="chat_template.default")
    kls, agree, same_tokens = [], [], 0
    for text, row in zip(texts, ids):
        llm.reset()
        llm.eval(row)
        got = torch.from_numpy(llm.scores[:len(row)].copy())
        with torch.no_grad():
            ref = model(input_ids=torch.tensor([row])).logits[0]
        kl, top1 = kl_and_top1(ref, got)
        kls.append(kl)
        agree.append(top1)
        # add_bos=True adds BOS where the GGUF says to (tokenizer.ggml.add_bos_token), as servers do:
        # a BOS the template already writes would show here as a second one.
        same_tokens += llm.tokenize(text.encode("utf-8"), add_bos=True, special=True) == renderer.encode(text)
    kl, top1, reply = torch.cat(kls), torch.cat(agree).float(), torch.cat(replying)
    if not reply.any():  # no conversation ends with a reply (--data of prompts): every position counts
        reply = torch.ones_like(reply)
    result = {"quant": quant, "positions": int(reply.sum()), "top1_agreement": float(top1[reply].mean()),
              "mean_kl": float(kl[reply].mean()), "max_kl": float(kl[reply].max()), "min_top1_allowed": least,
              "all_positions": int(top1.numel()), "top1_agreement_all": float(top1.mean()), "mean_kl_all": float(kl.mean()),
              "tokenizer_agreement": f"{same_tokens} of {len(texts)} conversations tokenized identically"}

    echo(f"check: greedy replies to {len(asked)} held-out prompts, transformers and llama.cpp ...")
    replies = []
    for prompt, prompt_ids in zip(asked, asked_ids):
        with torch.no_grad():
            out = model.generate(torch.tensor([prompt_ids]), max_new_tokens=max_new_tokens, do_sample=False,
                                 eos_token_id=sorted(stops), pad_token_id=tokenizer.pad_token_id)[0, len(prompt_ids):]
        hf_stopped = bool(len(out)) and int(out[-1]) in stops
        llm.reset()
        answer = llm.create_chat_completion(messages=prompt, temperature=0.0, top_k=1, repeat_penalty=1.0,
                                            max_tokens=math.ceil(max_new_tokens * REPLY_SLACK), seed=0)
        choice = answer["choices"][0]
        replies.append({"prompt": prompt[-1]["content"], "transformers": tokenizer.decode(out, skip_special_tokens=True),
                        "transformers_stopped": hf_stopped, "llama_cpp": choice["message"]["content"],
                        "llama_cpp_stopped": choice["finish_reason"] == "stop",
                        "llama_cpp_tokens": answer["usage"]["completion_tokens"]})
    del llm
    must_stop = [r for r in replies if r["transformers_stopped"]]
    result.update(replies=len(replies), replies_transformers_stopped=len(must_stop),
                  replies_stopped=sum(r["llama_cpp_stopped"] for r in replies), reply_texts=replies)
    failures = []
    if result["top1_agreement"] < least:
        failures.append(f"top-1 agreement {result['top1_agreement']:.2%} < {least:.0%} required for {quant}")
    missed = [r["prompt"] for r in must_stop if not r["llama_cpp_stopped"]]
    if missed:
        failures.append(f"llama.cpp did not stop on {len(missed)} prompt(s) where transformers stopped: "
                        + "; ".join(repr(p[:60]) for p in missed[:3]))
    result.update(passed=not failures, failures=failures)
    return result
