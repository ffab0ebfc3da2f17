"""`chatlora export`'s flags and --help (flags.py holds the other commands'; this one is apart to keep
each file short)."""

from __future__ import annotations

QUANT_CHOICES = ["f16", "bf16", "q8_0", "q4_k_m"]  # export/gguf.py: QUANTS, checked equal by a test


def export_parser(sub, fmt, positive, fraction, device, use_epilog: str) -> None:
    p = sub.add_parser(
        "export", formatter_class=fmt, help="the run as a GGUF for llama.cpp / Ollama / LM Studio, checked in llama.cpp",
        description="""\
Merge the adapter (as `chatlora merge` does, with its parity check), convert the merged
model to GGUF with llama.cpp's own converter, quantize it with llama.cpp's quantizer, and
write OUT/: the .gguf (chat template, end-of-turn token as EOS, pad token in its
metadata), an Ollama Modelfile, a README.md with the ollama and llama-server commands,
and export.json. Then llama.cpp loads the file and is compared with the merged model on
held-out conversations: next-token top-1 agreement, mean KL, and greedy replies through
the GGUF's own chat template must stop wherever transformers' stop. Outside the
thresholds nothing is written. --format hf writes the merged model only (chatlora merge).
Needs the export extra: pip install "chatlora[export]", then once
`chatlora export --get-converter` (llama.cpp's converter, from llama-cpp-python's sdist).""",
        epilog=use_epilog + """
least top-1 agreement by --quant: f16 99%, bf16 98%, q8_0 98%, q4_k_m 90% (docs/export.md)

examples:
  chatlora export --get-converter
  chatlora export runs/demo-20261127-101500 exported/pirate --quant q4_k_m
  ollama create pirate -f exported/pirate/Modelfile && ollama run pirate
""")
    p.add_argument("run", metavar="RUN", nargs="?", help="run folder (or adapter folder)")
    p.add_argument("out", metavar="OUT", nargs="?", help="output folder (must not exist, or be empty)")
    p.add_argument("--format", dest="fmt", default="gguf", choices=["gguf", "hf"],
                   help="gguf (default) or hf (the merged transformers model, as chatlora merge)")
    p.add_argument("--quant", default="q8_0", choices=QUANT_CHOICES, help="GGUF type (default q8_0)")
    p.add_argument("--model", metavar="BASE", help="load the base model from here instead (a local copy, a .gguf file, a hub id)")
    p.add_argument("--device", type=device, help="where the merge runs: cpu, cuda, ... (the check runs on CPU)")
    p.add_argument("--data", metavar="FILE", help="conversations for the checks (default: the run's held-out rows)")
    p.add_argument("--prompts", type=positive, default=8, help="conversations replied to greedily in the checks, and in "
                   "the merge's logit check (default 8); the GGUF's token agreement reads whole conversations, "
                   "as many as fit in 2048 tokens")
    p.add_argument("--max-new-tokens", type=positive, default=64, help="greedy reply length in the check (default 64)")
    p.add_argument("--min-top1", type=fraction, help="least top-1 agreement allowed, 0-1 (default by --quant, see below)")
    p.add_argument("--llama-cpp", metavar="DIR", dest="llama_cpp_dir",
                   help="a llama.cpp source folder whose convert_hf_to_gguf.py to use (default: $CHATLORA_LLAMA_CPP, "
                        "else the one --get-converter unpacked for the installed llama-cpp-python)")
    p.add_argument("--get-converter", metavar="SDIST", nargs="?", const="",
                   help="unpack llama.cpp's converter for the installed llama-cpp-python into chatlora's cache "
                        "(from SDIST, a llama_cpp_python-VERSION.tar.gz, or downloaded by pip), then stop")
