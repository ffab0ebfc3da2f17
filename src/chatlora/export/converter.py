"""llama.cpp's own Hugging Face -> GGUF converter (`convert_hf_to_gguf.py`, its `conversion/` package
and the `gguf-py` it is written against): where chatlora finds it, how it gets there, and running it.

Why a folder of its own, and where it comes from: the llama-cpp-python wheel carries the compiled
library (the quantizer and the loader chatlora uses) but not the converter, and the `gguf` package
on PyPI lags the converter it must match (a converter reads tensor names from its own gguf-py). The
one copy that matches the installed library is in llama-cpp-python's own sdist, which vendors the
llama.cpp commit the library was built from. `chatlora export --get-converter` downloads that sdist
(pip, the exact installed version; or a local sdist file) and unpacks those three parts into
`$CHATLORA_CACHE/llama.cpp/<version>/` (default ~/.cache/chatlora): a version-matched folder, so
upgrading llama-cpp-python asks for a new one instead of mixing versions. A llama.cpp checkout of
one's own is used instead with `--llama-cpp DIR` or `$CHATLORA_LLAMA_CPP`.

The converter runs in a child process of the same Python (it edits sys.path to put its gguf-py
first, which must not leak into chatlora's own `gguf` import, and it logs through the root logger).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
import tempfile
from functools import lru_cache
from pathlib import Path

from chatlora.errors import ChatloraError, ConfigError
from chatlora.export.gguf import llama_cpp

SCRIPT = "convert_hf_to_gguf.py"
PARTS = (SCRIPT, "conversion/", "gguf-py/")


def llama_cpp_version() -> str:
    """The installed llama-cpp-python's version; ChatloraError with the install command when absent."""
    return llama_cpp().__version__


def cache_root() -> Path:
    from chatlora.config.load import cache_root as chatlora_cache

    return chatlora_cache() / "llama.cpp"


def converter_dir(llama_cpp: str | None = None) -> Path:
    """The folder holding convert_hf_to_gguf.py: `llama_cpp` (--llama-cpp), else $CHATLORA_LLAMA_CPP,
    else the cache folder of the installed llama-cpp-python version. ChatloraError saying how to get
    it when it is not there."""
    given = llama_cpp or os.environ.get("CHATLORA_LLAMA_CPP")
    if given:
        folder = Path(given).expanduser()
        for candidate in (folder, folder / "vendor" / "llama.cpp"):  # a checkout, or an unpacked sdist
            if (candidate / SCRIPT).is_file():
                return candidate.resolve()
        key = "--llama-cpp" if llama_cpp else "CHATLORA_LLAMA_CPP"
        raise ConfigError(f"{key}={given}: no {SCRIPT} in it; give a llama.cpp source folder")
    version = llama_cpp_version()
    folder = cache_root() / version
    if not (folder / SCRIPT).is_file():
        raise ChatloraError(f"llama.cpp's converter for llama-cpp-python {version} is not in {folder}: run "
                            f"`chatlora export --get-converter` once (it unpacks it from llama-cpp-python's sdist), "
                            "or point --llama-cpp at a llama.cpp source folder")
    return folder


def get_converter(sdist: str | None = None, echo=print) -> Path:
    """Unpack the converter of the installed llama-cpp-python from its sdist (`sdist`, a local .tar.gz,
    or downloaded by pip) into the cache folder; returns the folder. Written to a temporary folder,
    then renamed: an interrupted unpack leaves nothing half there."""
    version = llama_cpp_version()
    final = cache_root() / version
    if (final / SCRIPT).is_file():
        echo(f"llama.cpp's converter for llama-cpp-python {version}: already in {final}")
        return final
    with tempfile.TemporaryDirectory() as work:
        if sdist is None:
            echo(f"downloading llama-cpp-python {version}'s source (its sdist) with pip ...")
            done = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                                   "-d", work, f"llama-cpp-python=={version}"],
                                  capture_output=True, text=True)
            found = sorted(Path(work).glob("llama_cpp_python-*.tar.gz"))
            if done.returncode or not found:
                raise ChatloraError(f"pip could not download llama-cpp-python=={version}'s sdist:\n{done.stderr[-2000:]}"
                                    "\nDownload it yourself and pass it: chatlora export --get-converter FILE.tar.gz")
            sdist = str(found[0])
        expected = f"llama_cpp_python-{version}"
        if not Path(sdist).name.startswith(expected):
            raise ConfigError(f"{sdist}: not the sdist of the installed llama-cpp-python ({expected}.tar.gz)")
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{version}.", dir=final.parent))
        try:
            with tarfile.open(sdist) as tar:
                root = f"{expected}/vendor/llama.cpp/"
                members = [m for m in tar.getmembers() if m.name.startswith(root)
                           and any(m.name[len(root):].startswith(p) for p in PARTS)]
                if not any(m.name == root + SCRIPT for m in members):
                    raise ConfigError(f"{sdist}: no vendor/llama.cpp/{SCRIPT} in it")
                for m in members:
                    m.name = m.name[len(root):]
                tar.extractall(tmp, members=members, filter="data")
            tmp.rename(final)
        finally:
            if tmp.exists():
                import shutil

                shutil.rmtree(tmp, ignore_errors=True)
    echo(f"llama.cpp's converter for llama-cpp-python {version}: {final}")
    return final


@lru_cache(maxsize=4)
def supported_architectures(folder: Path) -> tuple[str, ...]:
    """The text architectures (config.json `architectures`) this converter knows, from its own registry."""
    done = subprocess.run([sys.executable, str(folder / SCRIPT), "--print-supported-models"],
                          capture_output=True, text=True, cwd=folder, env=_env())
    text = done.stdout + done.stderr
    names, section = [], None
    for line in text.splitlines():
        line = line.strip()
        if line.endswith("models:"):
            section = line.split()[0]
        elif line.startswith("- ") and section == "TEXT":
            names.append(line[2:])
    if not names:
        raise ChatloraError(f"{folder / SCRIPT} --print-supported-models listed nothing:\n{text[-2000:]}")
    return tuple(names)


def check_architecture(architecture: str, folder: Path) -> None:
    """ConfigError naming the causal language models the converter supports when it lacks `architecture`."""
    known = supported_architectures(folder)
    if architecture not in known:
        causal = ", ".join(sorted(n.removesuffix("ForCausalLM") for n in known if n.endswith("ForCausalLM")))
        raise ConfigError(f"llama.cpp's converter ({folder}) cannot convert {architecture} models; it converts "
                          f"these ...ForCausalLM architectures: {causal}")


def convert(model_dir: Path, out_file: Path, outtype: str, folder: Path) -> None:
    """Run the converter on a saved transformers model folder; ChatloraError with its last output lines
    when it fails."""
    done = subprocess.run([sys.executable, str(folder / SCRIPT), str(model_dir), "--outfile", str(out_file),
                           "--outtype", outtype], capture_output=True, text=True, cwd=folder, env=_env())
    if done.returncode or not out_file.is_file():
        tail = "\n".join((done.stdout + done.stderr).splitlines()[-25:])
        raise ChatloraError(f"llama.cpp's converter failed on {model_dir}:\n{tail}")


def _env() -> dict:
    return {k: v for k, v in os.environ.items() if k != "NO_LOCAL_GGUF"}  # its own gguf-py, never PyPI's
