"""The GGUF types chatlora exports, llama.cpp's quantizer, and the metadata a GGUF must carry to
chat as the run was trained (chat template, end-of-turn token as EOS, pad token), read back by
llama.cpp itself."""

from __future__ import annotations

from pathlib import Path

from chatlora.errors import ChatloraError, ConfigError

INSTALL = 'pip install "chatlora[export]"'

# --quant -> (the converter's --outtype, llama.cpp's llama_ftype name to quantize to, or None: the
# converter writes it). Quantized types start from f16, llama.cpp's documented path
# (convert_hf_to_gguf.py --outtype f16, then llama-quantize).
QUANTS = {
    "f16": ("f16", None),
    "bf16": ("bf16", None),
    "q8_0": ("f16", "LLAMA_FTYPE_MOSTLY_Q8_0"),
    "q4_k_m": ("f16", "LLAMA_FTYPE_MOSTLY_Q4_K_M"),
}


def check_quant(quant: str) -> None:
    if quant not in QUANTS:
        raise ConfigError(f"--quant {quant}: not a GGUF type chatlora exports; choose one of {', '.join(QUANTS)}")


def llama_cpp():
    """The llama_cpp module (llama-cpp-python); ChatloraError with the install command when absent."""
    try:
        import llama_cpp
    except ImportError as e:
        raise ChatloraError(f"export to GGUF needs llama-cpp-python (llama.cpp's quantizer and loader): {INSTALL}, "
                            f"then chatlora export --get-converter ({type(e).__name__}: {e})") from None
    return llama_cpp


def quantize(source: Path, target: Path, quant: str, threads: int = 0) -> None:
    """llama.cpp's quantizer (`llama_model_quantize`, what the llama-quantize tool calls) from a 16-bit GGUF.
    Tensors whose rows the type cannot hold (K-quants need multiples of 256) get llama.cpp's own fallback."""
    lib = llama_cpp()
    params = lib.llama_model_quantize_default_params()
    params.ftype = getattr(lib, QUANTS[quant][1])
    params.nthread = threads
    from llama_cpp._utils import suppress_stdout_stderr

    with suppress_stdout_stderr(disable=False):  # a line per tensor from C, on the terminal otherwise
        code = lib.llama_model_quantize(str(source).encode(), str(target).encode(), params)
    if code != 0 or not target.is_file():
        raise ChatloraError(f"llama.cpp's quantizer failed ({code}) on {source} -> {quant}")


def metadata(llm) -> dict:
    """What llama.cpp read from the GGUF's header (a llama_cpp.Llama), with the special tokens' texts."""
    meta = dict(llm.metadata)
    found = {"chat_template": meta.get("tokenizer.chat_template"), "file_type": meta.get("general.file_type"),
             "architecture": meta.get("general.architecture"), "add_bos": meta.get("tokenizer.ggml.add_bos_token")}
    for name, key in (("eos", "tokenizer.ggml.eos_token_id"), ("pad", "tokenizer.ggml.padding_token_id"),
                      ("eot", "tokenizer.ggml.eot_token_id"), ("bos", "tokenizer.ggml.bos_token_id")):
        if key in meta:
            token = int(meta[key])
            found[name] = {"id": token, "text": llm.detokenize([token], special=True).decode("utf-8", "replace")}
    return found


def check_metadata(found: dict, end_of_turn: str | None, pad: str | None, template: str) -> None:
    """ChatloraError when the GGUF lacks the chat template, or its EOS is not the end-of-turn token, or
    its pad token is not the tokenizer's."""
    problems = []
    if found.get("chat_template") != template:
        problems.append("its tokenizer.chat_template is not the model's chat template")
    if end_of_turn and found.get("eos", {}).get("text") != end_of_turn:
        problems.append(f"its EOS is {found.get('eos', {}).get('text')!r}, not the end-of-turn token {end_of_turn!r}")
    if pad and found.get("pad", {}).get("text") != pad:
        problems.append(f"its pad token is {found.get('pad', {}).get('text')!r}, not {pad!r}")
    if problems:
        raise ChatloraError("the written GGUF's metadata is wrong: " + "; ".join(problems))
