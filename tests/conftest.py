"""Shared fixtures and helpers for tests/unit (in-process), tests/e2e (subprocesses, a pseudo-terminal,
the browser, several processes) and tests/gpu: a byte-level ChatML tokenizer and a 2-layer Llama built
from a config, saved to a folder so tests load them through chatlora's real local-folder code path (no
weights downloaded), and runs of it trained once per session. Test files import the helpers with
`from conftest import ...` (pyproject.toml puts tests/ on sys.path)."""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

import pytest

# Under pytest-xdist every worker shares the cores with the others: torch's default of one thread per
# core in each worker (and in each process a test starts) oversubscribes them, and threads spinning for
# a busy core made the suite's slowest tests 2-4x slower on CI's 2 cores. One thread each, set before
# torch is imported here or in any child process (which inherit the environment).
if os.environ.get("PYTEST_XDIST_WORKER"):
    for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(_var, "1")

from families import FAMILIES, save_family  # noqa: E402

FIXTURES = Path(__file__).parent / "fixtures"
REPO = Path(__file__).resolve().parents[1]
# The tutorial's data and the real Qwen tokenizer live beside the project, never inside it.
SHARED_DATA = Path(os.environ.get("CHATLORA_SHARED_DATA", REPO.parent / "shared" / "data"))

CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# LoRA r=4 on every linear layer of the tiny Llama (hidden 32, kv 16, mlp 64), per layer:
# q 4*(32+32) + k 4*(32+16) + v 4*(32+16) + o 4*(32+32) + gate, up, down 3 * 4*(32+64) = 2048.
TINY_TRAINABLE = 2 * 2048


def build_byte_tokenizer(pad: str | None = "<|endoftext|>", template: str = CHATML):
    """Every byte is one token (ids 0-255), then <|im_end|> (eos, 256), <|endoftext|> (pad, 257), <|im_start|> (258)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}  # sorted: a stable order
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>", pad_token=pad,
                                  additional_special_tokens=SPECIALS)
    tok.chat_template = template
    return tok


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    """Tokenized-data cache in a temporary folder, never the user's ~/.cache."""
    old = os.environ.get("CHATLORA_CACHE")
    cache = tmp_path_factory.mktemp("cache")
    os.environ["CHATLORA_CACHE"] = str(cache)
    if os.environ.get("PYTEST_XDIST_WORKER"):
        # The embedded GGUF, unpacked (model/gguf_cache.py), is shared by the workers of this run: each
        # unpacking it again costs a minute on 2 cores. Its folders are renamed into place whole, so
        # two workers writing at once is safe.
        shared = tmp_path_factory.getbasetemp().parent / "gguf-cache"
        shared.mkdir(exist_ok=True)
        (cache / "gguf").symlink_to(shared, target_is_directory=True)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no test may reach a hub; fail fast instead of retrying
    yield
    if old is None:
        os.environ.pop("CHATLORA_CACHE", None)
    else:
        os.environ["CHATLORA_CACHE"] = old


@pytest.fixture(scope="session")
def byte_tokenizer():
    return build_byte_tokenizer()


def save_tiny_model(folder: Path, hidden: int = 32) -> Path:
    """A 2-layer Llama (hidden 32 unless told) with the byte tokenizer and a generation config that stops on <|im_end|>."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    tok = build_byte_tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, bos_token_id=None)
    LlamaForCausalLM(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    GenerationConfig(eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def wide_model_dir(tmp_path_factory) -> Path:
    """The tiny Llama at hidden 64 (intermediate 128): bitsandbytes' 4-bit kernels need input widths
    of at least its block size, 64."""
    return save_tiny_model(tmp_path_factory.mktemp("tiny-llama-64"), hidden=64)


def tiny_config(model_dir: Path, tmp_path: Path, *overrides: str, data: str | None = None):
    """A Config for the tiny model on the 10-row fixture, written to tmp_path/run."""
    from chatlora.config.load import apply_overrides, build
    from chatlora.config.schema import Config

    raw = {
        "name": "tiny",
        # On a GPU the defaults would record CUDA graphs and patch transformers with Liger for the
        # rest of the process: tests that want them say so.
        "model": {"name": str(model_dir), "cuda_graphs": False, "kernels": "none"},
        "data": {"train": data or str(FIXTURES / "alpaca.json"), "max_length": 128},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
        "training": {"per_device_train_batch_size": 2, "max_steps": 4, "learning_rate": 1e-2, "logging_steps": 1},
        "output_dir": str(tmp_path / "run"),
    }
    return build(Config, apply_overrides(raw, list(overrides)), "")


def run_cli(*args: str, cwd: Path | None = None, env: dict | None = None):
    """`python -m chatlora ...` in a subprocess, as a user runs it."""
    import subprocess

    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "chatlora", *args], cwd=cwd, env=full_env,
                          capture_output=True, text=True, timeout=600)


def quiet_train(cfg, callbacks=None):
    """chatlora's train recipe with its report lines dropped; returns the run folder (RunDir)."""
    from chatlora.recipes.train import train

    return train(cfg, echo=lambda _line: None, callbacks=callbacks)


def losses(run) -> list[float]:
    """The training losses logged in a run folder (a RunDir or its path), step by step."""
    from chatlora.trainer.plot import read_metrics

    return [r["loss"] for r in read_metrics(Path(getattr(run, "path", run)) / "metrics.jsonl") if "loss" in r]


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (for a server or a rendezvous another process opens)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def tiny_run(tiny_model_dir, tmp_path_factory):
    """A run folder trained for a few steps on the tiny model, with a held-out split: what chat, eval
    and merge take. Session-scoped and read-only: tests that change it work on a copy."""
    from chatlora.recipes.train import train

    tmp = tmp_path_factory.mktemp("tiny-run")
    return train(tiny_config(tiny_model_dir, tmp, "data.validation=0.3", "training.max_steps=6"), echo=lambda _line: None).path


@pytest.fixture(scope="session")
def served_runs(tiny_model_dir, tmp_path_factory) -> list[Path]:
    """Two runs of the tiny model, "alice" and "bob" (2 training steps each), for serve and web tests."""
    from chatlora.recipes.train import train

    root = tmp_path_factory.mktemp("served")
    runs = []
    for name, lr in (("alice", "1e-2"), ("bob", "5e-2")):
        cfg = tiny_config(tiny_model_dir, root, "training.max_steps=2", f"training.learning_rate={lr}",
                          f"output_dir={root / name}")
        runs.append(train(cfg, echo=lambda _line: None).path)
    return runs


@pytest.fixture(scope="session")
def checkpointed_run(tiny_model_dir, tmp_path_factory) -> Path:
    """A finished run with complete checkpoints at steps 1 and 2 (damage.SETTINGS). Read-only: tests
    damage copies."""
    from damage import SETTINGS

    return quiet_train(tiny_config(tiny_model_dir, tmp_path_factory.mktemp("trained"), *SETTINGS)).path


@pytest.fixture(scope="session")
def uninterrupted_run(tiny_model_dir, tmp_path_factory) -> dict:
    """The run of exact_resume.SETTINGS that every interrupted one must equal: its losses and adapter
    tensors (e2e/test_resume.py, e2e/test_resume_cli.py)."""
    from exact_resume import SETTINGS, adapter

    run = quiet_train(tiny_config(tiny_model_dir, tmp_path_factory.mktemp("uninterrupted"), *SETTINGS))
    return {"losses": losses(run.path), "adapter": adapter(run.path)}


def problems_of(excinfo) -> list[tuple[str, str, str]]:
    """A DataError's problems as (where, field, reason), for comparing in one assert."""
    return [(p.where, p.field, p.reason) for p in excinfo.value.problems]


@pytest.fixture(scope="module")
def one_thread():
    """Models this small gain nothing from a second thread, and on a shared machine threads that wait
    for a busy core make the family tests several times slower (unit/model/test_families_arch.py:
    95 s against over 6 minutes). A module asks for it with pytestmark's usefixtures."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request, tmp_path_factory):
    """(family, the folder of its tiny model), one per family of tests/families.py."""
    return request.param, save_family(tmp_path_factory.mktemp(request.param), request.param)
