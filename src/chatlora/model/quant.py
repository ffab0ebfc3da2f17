"""A 4-bit base model for LoRA (QLoRA): NF4 weights through bitsandbytes, bf16 compute.

The field's standard recipe (Dettmers et al., 2023): the decoder layers' linear weights as 4-bit
NormalFloat in blocks of 64, the blocks' scales quantized again (double quantization), matmuls in
bfloat16 on weights de-quantized one layer at a time. Embeddings, norms and the output layer stay in
16 bits (transformers keeps the output layer unquantized), and so do the LoRA weights' gradients.
bitsandbytes is imported only when a 4-bit model is asked for.
"""

from __future__ import annotations

import torch

from chatlora.errors import ModelError

INSTALL = "pip install 'chatlora[qlora]' (bitsandbytes)"


def require_bitsandbytes():
    """The bitsandbytes module; raises ModelError saying how to install it."""
    try:
        import bitsandbytes
    except ImportError:
        raise ModelError(f"model.quantize=nf4 needs the bitsandbytes package: {INSTALL}") from None
    except Exception as e:  # a broken install (missing CUDA library) fails in many ways
        raise ModelError(f"bitsandbytes could not be loaded ({e.__class__.__name__}: {str(e).splitlines()[0]}); "
                         f"reinstall it: {INSTALL}") from None
    return bitsandbytes


def nf4_config(compute_dtype: torch.dtype = torch.bfloat16):
    """transformers' BitsAndBytesConfig for QLoRA's NF4."""
    from transformers import BitsAndBytesConfig

    require_bitsandbytes()
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=compute_dtype, bnb_4bit_quant_storage=torch.uint8)


def quantize_in_place(model, compute_dtype: torch.dtype = torch.bfloat16):
    """Replace the decoder layers' nn.Linear with bitsandbytes' NF4 Linear4bit, quantizing the weights
    they hold: for a model built from a config with random weights (model.random_init), which
    from_pretrained's quantization never sees. Layer by layer, so at most one extra 16-bit weight
    exists at a time. The output layer stays as it is, as transformers' loader leaves it."""
    bnb = require_bitsandbytes()
    head = model.get_output_embeddings()
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if type(child) is not torch.nn.Linear or child is head:
                continue
            device = child.weight.device
            q = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                  compute_dtype=compute_dtype, quant_type="nf4", compress_statistics=True,
                                  quant_storage=torch.uint8, device="meta")
            q.weight = bnb.nn.Params4bit(child.weight.data, requires_grad=False, quant_type="nf4",
                                         compress_statistics=True, quant_storage=torch.uint8)
            if child.bias is not None:
                q.bias = torch.nn.Parameter(child.bias.data, requires_grad=False)
            setattr(module, child_name, q.to(device))  # .to(device) quantizes, on the device the weight is on
            del child
    # What peft and Trainer read to treat the model as a 4-bit one (as from_pretrained would set).
    model.is_loaded_in_4bit = True
    model.config.quantization_config = nf4_config(compute_dtype).to_dict()
    return model


def is_4bit(model) -> bool:
    return bool(getattr(model, "is_loaded_in_4bit", False))


def dequantize(model, dtype: torch.dtype = torch.bfloat16):
    """The model with every Linear4bit replaced by an nn.Linear holding its de-quantized weights
    (what the 4-bit matmuls computed with), for merging an adapter into."""
    bnb = require_bitsandbytes()
    for _, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if not isinstance(child, bnb.nn.Linear4bit):
                continue
            data, state = child.weight.data, child.weight.quant_state
            if getattr(state, "packing_format_for_cpu", False):
                # bitsandbytes' CPU kernels repack a weight in place on its first inference call;
                # de-quantizing needs the original layout back (what its own .cuda() does).
                data, state = bnb.functional._convert_weight_packed_for_cpu_inverse(data, state)
            weight = bnb.functional.dequantize_4bit(data, state).to(dtype)
            plain = torch.nn.Linear(child.in_features, child.out_features, bias=child.bias is not None,
                                    device=weight.device, dtype=dtype)
            plain.weight = torch.nn.Parameter(weight, requires_grad=False)
            if child.bias is not None:
                plain.bias = torch.nn.Parameter(child.bias.data.to(dtype), requires_grad=False)
            setattr(module, child_name, plain)
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer.remove_quantization_config(model)  # loaded by from_pretrained: its own flags
    for attr in ("quantization_method", "is_loaded_in_4bit"):
        if attr in vars(model):
            delattr(model, attr)
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return model


def require_cuda_for_training() -> None:
    """Raise ModelError unless a CUDA GPU is present. bitsandbytes runs NF4 on a CPU for inference,
    but its CPU kernels, once a layer has run without gradients, take a path autograd cannot
    differentiate (bitsandbytes 0.50: gradients through the 4-bit layers come out wrong, with only a
    warning), so training on a 4-bit base is refused there."""
    if not torch.cuda.is_available():
        raise ModelError("model.quantize=nf4 trains on a CUDA GPU only: bitsandbytes' CPU kernels do not compute "
                         "correct gradients through 4-bit layers. On a CPU, train without it (model.quantize=none); "
                         "`chatlora plan` shows what a 4-bit base needs on a GPU (--gpu NAME).")
