"""Where chatlora finds llama.cpp's converter, and --get-converter's unpacking of it from
llama-cpp-python's sdist (a small sdist of the same layout, written here)."""

from __future__ import annotations

import io
import tarfile

import pytest

from chatlora.errors import ChatloraError, ConfigError
from chatlora.export.converter import SCRIPT, converter_dir, get_converter
from chatlora.export.gguf import QUANTS, check_quant
from chatlora.flags_export import QUANT_CHOICES


def test_flag_choices_are_the_exported_types():
    assert QUANT_CHOICES == list(QUANTS)
    with pytest.raises(ConfigError, match="q4_k_m"):
        check_quant("q3_k_xl")


def test_a_folder_without_the_converter_is_refused(tmp_path, monkeypatch):
    monkeypatch.delenv("CHATLORA_LLAMA_CPP", raising=False)
    with pytest.raises(ConfigError, match=f"--llama-cpp={tmp_path}: no {SCRIPT}"):
        converter_dir(str(tmp_path))
    monkeypatch.setenv("CHATLORA_LLAMA_CPP", str(tmp_path))
    with pytest.raises(ConfigError, match="CHATLORA_LLAMA_CPP"):
        converter_dir()
    (tmp_path / "vendor" / "llama.cpp").mkdir(parents=True)
    (tmp_path / "vendor" / "llama.cpp" / SCRIPT).write_text("")
    assert converter_dir() == (tmp_path / "vendor" / "llama.cpp").resolve()  # an unpacked sdist


def sdist(path, version: str):
    root = f"llama_cpp_python-{version}/"
    with tarfile.open(path, "w:gz") as tar:
        for name in ("vendor/llama.cpp/" + SCRIPT, "vendor/llama.cpp/conversion/__init__.py",
                     "vendor/llama.cpp/gguf-py/gguf/__init__.py", "vendor/llama.cpp/src/llama.cpp", "llama_cpp/llama.py"):
            data = f"# {name}\n".encode()
            info = tarfile.TarInfo(root + name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_get_converter_unpacks_the_three_parts_into_the_versioned_cache(tmp_path, monkeypatch):
    llama_cpp = pytest.importorskip("llama_cpp")
    monkeypatch.setenv("CHATLORA_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("CHATLORA_LLAMA_CPP", raising=False)
    with pytest.raises(ChatloraError, match="chatlora export --get-converter"):
        converter_dir()
    with pytest.raises(ConfigError, match="not the sdist of the installed"):
        get_converter(str(sdist(tmp_path / "llama_cpp_python-0.0.1.tar.gz", "0.0.1")), echo=lambda _: None)
    version = llama_cpp.__version__
    folder = get_converter(str(sdist(tmp_path / f"llama_cpp_python-{version}.tar.gz", version)), echo=lambda _: None)
    assert folder == tmp_path / "cache" / "llama.cpp" / version and converter_dir() == folder
    found = {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()}
    assert found == {SCRIPT, "conversion/__init__.py", "gguf-py/gguf/__init__.py"}
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(".")], "no temporary folder left"


def test_a_missing_extra_names_the_install_command(monkeypatch):
    import sys

    from chatlora.export.gguf import llama_cpp

    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # import llama_cpp raises ImportError
    with pytest.raises(ChatloraError, match=r'pip install "chatlora\[export\]", then chatlora export --get-converter'):
        llama_cpp()
