"""Weight-only agreement of exported GGUFs: each file's weights dequantized into transformers (float32
compute) against the merged model, on every held-out conversation of the run, whole (the positions
`chatlora export`'s check reads when they fit its budget). Set beside the check's figure (llama.cpp
running the same file), it splits the disagreement into the weights' rounding and llama.cpp's runtime
(its CPU matmuls round the activations to 8 bits for q8_0 weights).

    python bench/export_weight_only.py RUN MERGED_DIR FILE.gguf [FILE.gguf ...]

MERGED_DIR: the run merged (`chatlora export RUN DIR --format hf`). Figures: bench/LOG.md, 2026-12-08.
"""
import sys, torch
from pathlib import Path
from transformers import AutoModelForCausalLM, AutoTokenizer
from chatlora.data.render import Renderer
from chatlora.export.check import kl_and_top1
from chatlora.export.merged import parity_texts
from chatlora.model.load import stop_ids
run, merged_dir = sys.argv[1], Path(sys.argv[2])
tok = AutoTokenizer.from_pretrained(merged_dir)
ref_model = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32).eval()
renderer = Renderer(tok, set(stop_ids(ref_model.generation_config)))
convs, _ = parity_texts(run, None, 10**9, print)
samples = [renderer.tokenize(m) for m in convs]
for gguf in sys.argv[3:]:
    q = AutoModelForCausalLM.from_pretrained(str(Path(gguf).parent), gguf_file=Path(gguf).name, dtype=torch.float32).eval()
    agree, reply = [], []
    for t in samples:
        ids = torch.tensor([t.input_ids])
        with torch.no_grad():
            kl, top1 = kl_and_top1(ref_model(input_ids=ids).logits[0], q(input_ids=ids).logits[0])
        agree.append(top1)
        reply.append(torch.tensor([t.labels[i + 1] != -100 if i + 1 < len(t.labels) else False for i in range(len(t.input_ids))]))
    a, r = torch.cat(agree).float(), torch.cat(reply)
    print(Path(gguf).name, f"weight-only: reply top-1 {a[r].mean():.4f} of {int(r.sum())}, all {a.mean():.4f} of {a.numel()}", flush=True)
