"""`chatlora export RUN OUT --format gguf --quant TYPE`: the run as one GGUF file that llama.cpp,
Ollama and LM Studio load, with an Ollama Modelfile and a README, checked in llama.cpp itself
(`--format hf`: the merged transformers model, `chatlora merge`).

Read top to bottom: refuse what cannot work before any work (a bad type, OUT in the way, no
llama-cpp-python, no converter, an architecture the converter lacks) → merge and check the merge
(export/merged.py, `chatlora merge`'s own code) into a temporary folder → set the end-of-turn token
as EOS for the converter → llama.cpp's converter → llama.cpp's quantizer → read the GGUF's metadata
back through llama.cpp → compare it with the merged model (export/check.py) → Modelfile, README,
export.json → rename into place; outside the thresholds nothing is left at OUT.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

from chatlora.errors import ChatloraError, ConfigError
from chatlora.export import converter, modelfile
from chatlora.export.gguf import QUANTS, check_metadata, check_quant, llama_cpp, metadata, quantize
from chatlora.export.merged import merge_to, parity_texts
from chatlora.run import check_new_folder, staged, target_config


def export(target: str | None, out: str | None, *, fmt: str = "gguf", quant: str = "q8_0", model: str | None = None,
           data: str | None = None, prompts: int = 8, max_new_tokens: int = 64, min_top1: float | None = None,
           llama_cpp_dir: str | None = None, get_converter: str | None = None, device: str | None = None,
           echo: Callable[[str], None] = print) -> dict:
    """Export a run (see the module docstring); returns the figures written to OUT/export.json.

    `get_converter` ("" or an sdist path): only unpack llama.cpp's converter (export/converter.py).
    Raises ConfigError/ChatloraError before any work for bad arguments, and ChatloraError, leaving
    nothing at OUT, when a step or the check fails.
    """
    if get_converter is not None:
        return {"converter": str(converter.get_converter(get_converter or None, echo))}
    if not target or not out:
        raise ConfigError("chatlora export needs RUN and OUT (or --get-converter)")
    final = Path(out)
    check_new_folder(final, ConfigError)
    if fmt == "hf":
        return merge_to(target, out, model=model, data=data, prompts=prompts, device=device, echo=echo)
    if fmt != "gguf":
        raise ConfigError(f"--format {fmt}: choose gguf or hf")
    check_quant(quant)
    llama_cpp()
    tool = converter.converter_dir(llama_cpp_dir)
    converter.check_architecture(architecture(target, model), tool)

    with staged(final) as tmp:
        merged_dir = tmp / "merged"
        merged = merge_to(target, str(merged_dir), model=model, data=data, prompts=prompts, device=device, echo=echo)
        end_of_turn, pad, template = eos_for_converter(merged_dir, merged["end_of_turn"])
        name = final.name
        gguf_name = f"{name}-{quant}.gguf"
        outtype, ftype = QUANTS[quant]
        converted = tmp / (f"{name}-{outtype}.gguf" if ftype else gguf_name)
        echo(f"converting with llama.cpp's converter ({tool}) to {outtype} ...")
        converter.convert(merged_dir, converted, outtype, tool)
        if ftype:
            echo(f"quantizing to {quant} with llama.cpp's quantizer ...")
            quantize(converted, tmp / gguf_name, quant)
            converted.unlink()
        gguf_file = tmp / gguf_name
        found = metadata(llama_cpp().Llama(model_path=str(gguf_file), n_ctx=32, verbose=False, vocab_only=True))
        check_metadata(found, end_of_turn, pad, template)

        # Every conversation there is: the check reads whole ones up to its position budget.
        conversations, kind = parity_texts(target, data, 10**9, echo)
        from chatlora.export.check import check_gguf

        check = check_gguf(gguf_file, merged_dir, conversations, quant, prompts=prompts, max_new_tokens=max_new_tokens,
                           min_top1=min_top1, echo=echo)
        check["conversations"] = kind
        echo(f"check ({quant}): top-1 agreement {check['top1_agreement']:.2%} (required {check['min_top1_allowed']:.0%}), "
             f"mean KL {check['mean_kl']:.4g} on {check['positions']} positions; {check['tokenizer_agreement']}; "
             f"llama.cpp stopped {check['replies_stopped']} of {check['replies']} replies "
             f"(transformers {check['replies_transformers_stopped']})")
        result = {"source": str(target), "format": "gguf", "quant": quant, "file": gguf_name,
                  "bytes": gguf_file.stat().st_size, "llama_cpp_python": converter.llama_cpp_version(),
                  "converter": str(tool), "metadata": {k: v for k, v in found.items() if k != "chat_template"},
                  "merge": {k: merged[k] for k in ("dtype", "max_abs_diff", "top1_agreement", "positions")},
                  "check": check}
        if not check["passed"]:
            raise ChatloraError(f"the GGUF does not match the merged model: {'; '.join(check['failures'])}; nothing "
                                f"was written to {final}. Figures: top-1 {check['top1_agreement']:.2%}, mean KL "
                                f"{check['mean_kl']:.4g}. {LESS_LOSSY.get(quant, FAILED_UNQUANTIZED)}")
        system = system_prompt(target)
        stops = merged["stop_tokens"]
        write_ollama(tmp, gguf_name, merged_dir, stops, system, echo)
        shutil.rmtree(merged_dir)
        (tmp / "README.md").write_text(modelfile.readme(name, gguf_name, str(target), quant, stops, system, result),
                                       encoding="utf-8")
        (tmp / "export.json").write_text(json.dumps(result, indent=2, ensure_ascii=False), encoding="utf-8")
    echo(f"exported: {final / gguf_name} ({result['bytes'] / 2**20:.1f} MiB), Modelfile, README.md, export.json")
    echo(f"  ollama create {name} -f {final / 'Modelfile'} && ollama run {name}")
    return result


# What to try when the check fails, by type: a less lossy type, or (for f16/bf16, which only round the
# weights once more) what a failure there means.
LESS_LOSSY = {"q4_k_m": "A less lossy --quant (q8_0, f16) keeps closer, or --min-top1 accepts these figures.",
              "q8_0": "--quant f16 keeps closer, or --min-top1 accepts these figures."}
FAILED_UNQUANTIZED = ("An unquantized file should match closely: the conversion itself went wrong (an architecture or "
                      "tokenizer llama.cpp reads differently). Please report it with these figures.")


def architecture(target: str, model: str | None) -> str:
    """The base model's architecture (config.json `architectures`, or the class transformers loads a
    GGUF's header as), read without loading weights."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    from chatlora.config.schema import ModelConfig
    from chatlora.model.load import model_config
    from chatlora.model.source import resolve

    cfg = target_config(target)
    model_cfg = cfg.model if cfg and not model else ModelConfig(name=model or base_of_adapter(target))
    config = model_config(resolve(model_cfg), model_cfg)
    names = getattr(config, "architectures", None) or [MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(config.model_type, config.model_type)]
    return names[0]


def base_of_adapter(target: str) -> str:
    folder = Path(target)
    for candidate in (folder / "adapter", folder):
        if (candidate / "adapter_config.json").is_file():
            return json.loads((candidate / "adapter_config.json").read_text())["base_model_name_or_path"]
    raise ChatloraError(f"{target} is neither a chatlora run folder nor a peft adapter folder")


def system_prompt(target: str) -> str | None:
    cfg = target_config(target)
    return cfg.data.system_prompt if cfg else None


def eos_for_converter(merged_dir: Path, end_of_turn: str | None) -> tuple[str | None, str | None, str]:
    """Make the saved tokenizer's EOS the template's end-of-turn token: the converter writes the
    tokenizer's EOS as the GGUF's, which llama.cpp's chat (and llama-server's) stops on. Returns
    (end-of-turn, pad, chat template)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(merged_dir)
    if end_of_turn and tokenizer.eos_token != end_of_turn:
        tokenizer.eos_token = end_of_turn
        tokenizer.save_pretrained(merged_dir)
    template = tokenizer.chat_template
    return end_of_turn, tokenizer.pad_token, template


def write_ollama(folder: Path, gguf_name: str, merged_dir: Path, stops: list[str], system: str | None,
                 echo: Callable[[str], None]) -> None:
    """The Modelfile: the template's parts as a Go template, or no TEMPLATE (Ollama then reads the
    GGUF's) with a warning when they cannot be found. Sampling defaults: the merged generation
    config's when it samples, else greedy (temperature 0), as `chatlora chat` and the check ran."""
    from transformers import AutoTokenizer, GenerationConfig

    from chatlora.data.render import Renderer

    renderer = Renderer(AutoTokenizer.from_pretrained(merged_dir), set())
    gen = GenerationConfig.from_pretrained(merged_dir)
    sampling = {"temperature": 0}
    if gen.do_sample:
        sampling = {k: v for k, v in (("temperature", gen.temperature), ("top_p", gen.top_p), ("top_k", gen.top_k),
                                      ("repeat_penalty", gen.repetition_penalty)) if v is not None}
    try:
        pieces = modelfile.chat_pieces(renderer.text)
        text = modelfile.modelfile(gguf_name, pieces, stops, system, sampling)
    except ChatloraError as e:
        echo(f"warning: {e}; the Modelfile has no TEMPLATE (Ollama reads the GGUF's chat template)")
        text = f"FROM ./{gguf_name}\n\n" + "".join(f"PARAMETER stop {json.dumps(s)}\n" for s in stops)
        text += "".join(f"PARAMETER {k} {v}\n" for k, v in sampling.items())
    (folder / "Modelfile").write_text(text, encoding="utf-8")
