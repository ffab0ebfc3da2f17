"""`--decode compile` (the default on CUDA): the decode step compiled once (sizes symbolic), its steps
replayed from CUDA graphs, gives the model's own logits; the kernels go to chatlora's cache folder,
a second start in a new process compiles nothing (every graph read from that cache), and no start
traces the step twice (a restart was most of a warm start's time: model/layers.py)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

# One process per start, as a user's second `chatlora chat` is. It prints the decoder's largest logit
# difference from the model's own forward, the lines it printed, and inductor's cache misses and hits.
START = textwrap.dedent("""
    import sys, time, torch
    from torch._dynamo.utils import counters, get_compilation_metrics
    from transformers import AutoModelForCausalLM
    from chatlora.generate.decode import fast_decoder, parity, reference
    model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32).cuda().eval()
    expected = reference(model)
    lines = []
    started = time.perf_counter()
    decoder = fast_decoder(model, "auto", columns=256, echo=lines.append)
    print("seconds", time.perf_counter() - started)
    assert decoder is not None and decoder.mode == "compile", lines
    print("parity", parity(decoder, expected))
    print("lines", lines)
    print("misses", counters["inductor"]["fxgraph_cache_miss"], "hits", counters["inductor"]["fxgraph_cache_hit"])
    print("restarts", sum(len(m.restart_reasons or ()) for m in get_compilation_metrics()))
""")


def start(model_dir, cache) -> dict:
    env = {**os.environ, "CHATLORA_CACHE": str(cache)}
    env.pop("TORCHINDUCTOR_CACHE_DIR", None)
    r = subprocess.run([sys.executable, "-c", START, str(model_dir)], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    out = r.stdout
    return {"parity": float(out.split("parity ")[1].split()[0]), "misses": int(out.split("misses ")[1].split()[0]),
            "hits": int(out.split("hits ")[1].split()[0]), "restarts": int(out.split("restarts ")[1].split()[0]), "text": out}


def test_compiled_decode_matches_the_model_and_a_second_start_compiles_nothing(tiny_model_dir, tmp_path):
    first = start(tiny_model_dir, tmp_path / "cache")
    assert first["parity"] < 1e-3 and first["misses"] >= 1, first["text"]
    assert str(tmp_path / "cache" / "inductor") in first["text"], first["text"]
    second = start(tiny_model_dir, tmp_path / "cache")
    assert second["parity"] < 1e-3, second["text"]
    assert second["misses"] == 0 and second["hits"] >= 1, second["text"]
    assert first["restarts"] == second["restarts"] == 0, (first["text"], second["text"])
