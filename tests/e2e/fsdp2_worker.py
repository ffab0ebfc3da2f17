"""chatlora's FSDP2 parts on 2 CPU processes (gloo), run by tests/e2e/test_fsdp2.py under torchrun:

    python -m torch.distributed.run --nproc-per-node 2 tests/e2e/fsdp2_worker.py MODEL_DIR OUT_DIR

accelerate (and so Trainer) shards models on GPUs only, so here the tiny model is sharded with torch's
own fully_shard the way accelerate does it (each decoder layer, then the root), and trained for a few
SGD steps with chatlora's loss, each process on its half of every step's samples. Rank 0 trains an
unsharded copy on the whole steps alongside, and writes OUT_DIR/result.json, the adapter saved from
the gathered state (OUT_DIR/sharded) and the reference adapter (OUT_DIR/reference).
"""

from __future__ import annotations

import json
import sys
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

STEPS = [  # 4 samples per optimizer step; process r takes samples 2r and 2r+1
    [{"input_ids": list(range(3, 40)), "labels": [-100] * 20 + list(range(23, 40))},
     {"input_ids": list(range(50, 70)), "labels": [-100] * 5 + list(range(55, 70))},
     {"input_ids": [5, 9, 13, 200, 7, 256], "labels": [-100, -100, -100, 200, 7, 256]},
     {"input_ids": list(range(100, 131)), "labels": [-100] * 10 + list(range(110, 131))}],
    [{"input_ids": [8, 3, 256], "labels": [-100, 3, 256]},
     {"input_ids": list(range(7, 70)), "labels": [-100] * 30 + list(range(37, 70))},
     {"input_ids": list(range(1, 11)) + [256], "labels": [-100] * 6 + list(range(7, 11)) + [256]},
     {"input_ids": list(range(60, 90)), "labels": [-100] * 12 + list(range(72, 90))}],
]
ROUNDS = 2  # passes over STEPS


def build(model_dir: str):
    from transformers import AutoModelForCausalLM

    from chatlora.config.schema import LoraSettings
    from chatlora.model.lora import add_lora

    model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="sdpa")
    torch.manual_seed(0)
    return add_lora(model, LoraSettings(r=4, alpha=8, dropout=0.0))


def uneven_clip(mesh) -> dict:
    """Clipping on shards of rows that do not split evenly over 2 processes (3 rows; 1 row: one
    process holds an empty shard), against the whole gradients."""
    from torch.distributed.fsdp import fully_shard

    from chatlora.trainer.speed.grads import clip_sharded, sharded_grads

    class Uneven(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = (torch.nn.Parameter(torch.randn(*shape)) for shape in ((3, 5), (1, 4), (5,)))

        def forward(self, x):  # FSDP gathers the weights around forward and backward only
            return (self.a @ x).pow(2).sum() + (self.b @ x[:4]).pow(3).sum() + (self.c * x).sum()

    torch.manual_seed(0)
    module = Uneven()
    fully_shard(module, mesh=mesh)
    module(torch.randn(5)).backward()
    params = list(module.parameters())
    whole = [p.grad.full_tensor().clone() for p in params]
    expected = torch.stack([g.norm() for g in whole]).norm()
    norm = clip_sharded(params, 0.5 * expected.item(), sharded_grads(params))
    clipped = [p.grad.full_tensor() for p in params]
    empty = torch.tensor(float(any(p.grad.to_local().numel() == 0 for p in params)))
    dist.all_reduce(empty, op=dist.ReduceOp.MAX)  # on some process
    return {"empty_shard": bool(empty), "norm": norm.item(), "expected": expected.item(),
            "scaled": max(((c - 0.5 * w).norm() / w.norm()).item() for c, w in zip(clipped, whole))}


def passes_of_a_step(model_dir: str, mesh) -> dict:
    """One optimizer step in two forward/backward passes (as ChatTrainer makes them from a token
    budget), on a model whose layers keep their weights gathered through backward
    (reshard_after_forward=False): the weight gathers counted with and without
    fsdp.kept_between_passes, and the gradients of both against the step in one pass."""
    from contextlib import nullcontext

    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    from chatlora.data.collate import PackCollator
    from chatlora.trainer.distributed.fsdp import gathered_through_backward, kept_between_passes
    from chatlora.model.loss import trained_token_loss

    model = build(model_dir)
    layers = model.base_model.model.model.layers
    for layer in layers:
        fully_shard(layer, mesh=mesh, reshard_after_forward=False)
    fully_shard(model, mesh=mesh)  # the root: torch's own choice, which keeps it gathered too
    trainable = [p for p in model.parameters() if p.requires_grad]
    samples = STEPS[0][2 * dist.get_rank() : 2 * dist.get_rank() + 2]
    gathers = [0]

    def counted(gather):  # FSDP2's weight gathers (the collective's name differs between torch releases)
        def call(*args, **kwargs):
            gathers[0] += 1
            return gather(*args, **kwargs)
        return call

    originals = {name: getattr(dist, name) for name in ("all_gather_single", "all_gather_into_tensor") if hasattr(dist, name)}

    def step(batches, keep: bool) -> dict:
        gathers[0] = 0
        for name, gather in originals.items():
            setattr(dist, name, counted(gather))
        try:
            sharded_between = []
            for i, batch in enumerate(batches):
                last = i == len(batches) - 1
                model.set_requires_gradient_sync(last)  # Accelerator.no_sync, FSDP2's way
                with kept_between_passes(gathered_through_backward(model)) if keep and not last else nullcontext():
                    total, _ = trained_token_loss(model, PackCollator()(batch))
                    total.backward()
                sharded_between.append(isinstance(layers[0].mlp.up_proj.base_layer.weight, DTensor))
            counted_gathers = gathers[0]
        finally:
            for name, gather in originals.items():
                setattr(dist, name, gather)
        grads = [p.grad.full_tensor().clone() for p in trainable]
        for p in trainable:
            p.grad = None
        return {"gathers": counted_gathers, "sharded_after_each_pass": sharded_between, "grads": grads}

    one = step([samples], keep=False)
    plain = step([samples[:1], samples[1:]], keep=False)
    kept = step([samples[:1], samples[1:]], keep=True)
    return {"units": len(gathered_through_backward(model)), "layers": len(layers),
            **{f"{name}_gathers": r["gathers"] for name, r in (("one_pass", one), ("plain", plain), ("kept", kept))},
            "plain_sharded_after_each_pass": plain["sharded_after_each_pass"],
            "kept_sharded_after_each_pass": kept["sharded_after_each_pass"],
            "kept_vs_one_pass": difference(kept["grads"], one["grads"]), "plain_vs_one_pass": difference(plain["grads"], one["grads"])}


def difference(grads: list, reference: list) -> float:
    """The norm of the difference over all gradients, relative to the reference's norm (LoRA's B
    starts at zero, so A's gradients are all zero at the first step: no per-tensor ratio)."""
    return (torch.stack([(g - r).norm() for g, r in zip(grads, reference)]).norm() / torch.stack([r.norm() for r in reference]).norm()).item()


def main(model_dir: str, out: Path) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method
    from transformers import AutoTokenizer

    from chatlora.data.collate import PackCollator, PadCollator
    from chatlora.data.render import Renderer
    from chatlora.evaluate.loss import held_out_batches, held_out_loss
    from chatlora.generate.replies import generate_replies
    from chatlora.generate.sampling import Sampling
    from chatlora.trainer.distributed.fsdp import full_adapter_state, gathered_through_backward, sharded
    from chatlora.trainer.speed.grads import all_finite, clip_sharded, local_grads, sharded_grads
    from chatlora.model.loss import separable_head, trained_token_loss

    dist.init_process_group("gloo", timeout=timedelta(seconds=120))  # a rank left waiting fails the test soon
    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh("cpu", (world,))
    model = build(model_dir)
    for layer in model.base_model.model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    register_fsdp_forward_method(model, "generate")  # as Trainer does for FSDP
    reference = build(model_dir) if rank == 0 else None
    result: dict = {"sharded": sharded(model), "head_split_when_sharded": separable_head(model) is not None,
                    "head_split_reference": reference is not None and separable_head(reference) is not None,
                    "losses": [], "reference_losses": []}
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(trainable, lr=0.5)
    ref_optimizer = torch.optim.SGD([p for p in reference.parameters() if p.requires_grad], lr=0.5) if reference else None
    for step in STEPS * ROUNDS:
        total, count = trained_token_loss(model, PackCollator()(step[2 * rank : 2 * rank + 2]))
        # As ChatTrainer: divided by the trained tokens of the whole step (all processes), times the
        # number of processes, because FSDP averages the gradients over them.
        tokens = count.clone().float()
        dist.all_reduce(tokens)
        (total / tokens * world).backward()
        optimizer.step()
        optimizer.zero_grad()
        summed = total.detach().clone()
        dist.all_reduce(summed)
        result["losses"].append((summed / tokens).item())
        if reference is not None:
            ref_total, ref_count = trained_token_loss(reference, PackCollator()(step))
            (ref_total / ref_count).backward()
            ref_optimizer.step()
            ref_optimizer.zero_grad()
            result["reference_losses"].append((ref_total / ref_count).item())

    # The held-out loss on the sharded model (evaluate/loss.py): 5 samples split 3/2 over the
    # processes, 2 per batch, packed into passes of at most 40 tokens: 3 passes on rank 0, 2 on
    # rank 1, which must keep stepping with rank 0 (lockstep), counting nothing, or both hang.
    held = [sample for step in STEPS for sample in step][:5]
    collate = PackCollator(max_tokens=40)
    result["held_out"] = held_out_loss(model, held_out_batches(held, collate, 2, rank, world), distributed=True,
                                       lockstep=True, spare=collate(held[:1])).loss
    if reference is not None:
        result["held_out_reference"] = held_out_loss(reference, held_out_batches(held, PadCollator(0), 8)).loss

    # Clipping and the finite check on the local shards (trainer/speed/grads.py) against torch on the whole
    # gradients: one more backward, clipped to half its norm, and no optimizer step after it.
    total, count = trained_token_loss(model, PackCollator()(STEPS[0][2 * rank : 2 * rank + 2]))
    total.backward()
    whole = [p.grad.full_tensor().clone() for p in trainable]
    expected = torch.stack([g.float().norm() for g in whole]).norm()
    group = sharded_grads(trainable)
    norm = clip_sharded(trainable, 0.5 * expected.item(), group)
    clipped = [p.grad.full_tensor() for p in trainable]
    result["clip"] = {"grouped": group is not None, "norm": norm.item(), "expected": expected.item(),
                      "scaled": max(((c - 0.5 * w).norm() / w.norm().clamp_min(1e-12)).item() for c, w in zip(clipped, whole)),
                      "finite": bool(all_finite(local_grads(trainable)))}
    next(p for p in trainable).grad.to_local().view(-1)[0] = float("nan")
    result["clip"]["finite_with_nan"] = bool(all_finite(local_grads(trainable)))
    optimizer.zero_grad()
    result["uneven_clip"] = uneven_clip(mesh)
    result["passes"] = passes_of_a_step(model_dir, mesh)
    result["passes"]["units_resharded_after_forward"] = len(gathered_through_backward(model))  # the root only

    # The known failure: each process's own LoRA weights are shards (half of each weight's rows here).
    local = {n: list(p.to_local().shape) for n, p in model.named_parameters() if p.requires_grad}
    state = full_adapter_state(model)
    result["local_shapes"], result["full_shapes"] = local, {n: list(t.shape) for n, t in state.items()}

    # Generation: the two processes ask for replies of different lengths; under FSDP each forward
    # needs both, so the one that is done first must keep stepping (transformers' synced_gpus, on for
    # modules fully_shard marks). Counted: forward passes of a decoder layer, i.e. the weight gathers
    # this process took part in.
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    renderer = Renderer(tokenizer, {tokenizer.eos_token_id}, "all")
    forwards = [0]
    hook = model.base_model.model.model.layers[0].register_forward_pre_hook(lambda *_: forwards.__setitem__(0, forwards[0] + 1))
    replies = generate_replies(model, renderer, [[{"role": "user", "content": "hi"}]], Sampling(max_new_tokens=3 + 5 * rank))
    hook.remove()
    counts: list = [None] * world
    dist.all_gather_object(counts, {"forwards": forwards[0], "tokens": replies[0].tokens})
    result["generation"] = counts
    if rank == 0:
        model.save_pretrained(out / "sharded", state_dict=state, save_embedding_layers=False)
        reference.save_pretrained(out / "reference", save_embedding_layers=False)
        (out / "result.json").write_text(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]))
