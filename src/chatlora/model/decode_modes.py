"""Decode modes (`--decode`) and the devices that can run them, checked before any weight loads."""

from __future__ import annotations

from typing import TYPE_CHECKING

from chatlora.errors import ChatloraError

if TYPE_CHECKING:  # torch is imported where a device is asked about: `--help` and flag errors need not wait for it
    import torch

MODES = ("auto", "graphs", "compile", "static", "eager")
MODE_HELP = ("decoding: compile = static KV cache, each step replayed from a CUDA graph of torch.compile's "
             "fused kernels (the fastest per token; the first start on a GPU compiles the decoder layers, later "
             "starts read them from the cache on disk), graphs = the same with the model's own kernels (no "
             "compiling), static = static KV cache without graphs (CPU too), eager = transformers' plain "
             "forward with a growing cache (the default on CPU), auto = compile on CUDA, eager elsewhere")


def device_problem(name: torch.device | str) -> str | None:
    """Why `name` (a --device value) is no device to load a model on here, or None when it is one.
    Asked before any weight loads: torch's own errors come only later, as tracebacks ("Invalid device
    string", "Torch not compiled with CUDA enabled")."""
    import torch

    try:
        device = torch.device(name)
    except (RuntimeError, TypeError, ValueError):
        return f"{name!r} is not a device name; use cpu, cuda or cuda:N"
    if device.type == "cpu":
        return None
    # cuda, mps and xpu each have a torch module that says whether (and how many) are here; other
    # device types (meta, hpu, ...) cannot hold a model chatlora loads.
    backend = getattr(torch, device.type, None)
    if not hasattr(backend, "is_available"):
        return f"{device.type} devices cannot run a model here; use cpu, cuda or cuda:N"
    if not backend.is_available():
        if device.type == "cuda" and torch.version.cuda is None and torch.version.hip is None:
            return "this torch was built without CUDA (a CPU-only build); use --device cpu, or install a CUDA build of torch"
        return f"no {device.type} device is available on this machine; use --device cpu"
    count = backend.device_count()
    if device.index is not None and device.index >= count:
        names = f"{device.type}:0" if count == 1 else f"{device.type}:0 to {device.type}:{count - 1}"
        return f"this machine has {count} {device.type} device{'s' if count != 1 else ''} ({names})"
    return None


def resolve_mode(mode: str, device: torch.device | str) -> str:
    """The decode mode to use on `device`; raises ChatloraError for a mode the device cannot run, or
    a device that is not here."""
    import torch

    why = device_problem(device)
    if why:
        raise ChatloraError(f"--device {device}: {why}")
    device = torch.device(device)
    if mode not in MODES:
        raise ChatloraError(f"--decode {mode}: choose one of {', '.join(MODES)}")
    if mode == "auto":
        return "compile" if device.type == "cuda" else "eager"
    if mode == "graphs" and device.type != "cuda":
        raise ChatloraError("--decode graphs needs a CUDA device (CUDA graphs); use --decode static on this device")
    return mode
