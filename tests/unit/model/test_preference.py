"""chatlora's preference losses against TRL 1.16 on a tiny Llama with fixed weights and batches: loss,
chosen/rejected rewards and LoRA gradients within 1e-5 in float32.

sigmoid and ipo go through TRL's own DPOTrainer.compute_loss (its padded [chosen; rejected] forward with
the adapter disabled for the reference); kto through KTOTrainer.compute_loss (its KL samples included);
simpo and orpo through TRL's loss functions (CPOTrainer.cpo_loss, ORPOTrainer.odds_ratio_loss) on
log-probabilities from TRL's own get_batch_logps over padded logits. chatlora computes everything from
one packed row (data/collate.py PreferenceCollator, model/preference.py)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from conftest import build_byte_tokenizer

torch.set_default_dtype(torch.float32)
TOL = 1e-5

PAIRS = [
    ({"role": "user", "content": "Who are you?"}, "Captain Bess, arr!", "I am an AI assistant."),
    ({"role": "user", "content": "Any tea?"}, "Rum, matey.", "Here is a list of teas: green, black."),
    ({"role": "user", "content": "Bye"}, "Fair winds!", "Goodbye. Let me know if you need anything else."),
]


@pytest.fixture
def setup():
    """A fresh model each test: TRL's trainers add a reference adapter to the model they are given."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from chatlora.data.pairs import Preference, render_preference
    from chatlora.data.render import Renderer

    tok = build_byte_tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=512, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id, bos_token_id=None, attn_implementation="sdpa")
    base = LlamaForCausalLM(config)
    # init_lora_weights=False: B is random too, so the adapter moves the log-probs and A has gradients.
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False))
    renderer = Renderer(tok, {tok.eos_token_id})
    rows = [render_preference(renderer, Preference([u], {"role": "assistant", "content": c}, {"role": "assistant", "content": r}, "t", f"line {i}"))
            for i, (u, c, r) in enumerate(PAIRS)]
    return tok, model, rows


def move_adapter(model) -> None:
    """The trained adapter moved away from its frozen reference copy, so rewards are not zero."""
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".default." in name:
                p.add_(0.5 * torch.randn_like(p))


def head(sample) -> int:
    return next(k for k, label in enumerate(sample.labels) if label != -100)


def grads(model) -> dict[str, torch.Tensor]:
    out = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out


def ours(model, rows, knobs, labels=None, share=None):
    from chatlora.data.collate import PreferenceCollator
    from chatlora.model.preference import preference_loss

    if labels is None:
        features = [{"input_ids": c.input_ids, "labels": c.labels, "rejected_input_ids": r.input_ids, "rejected_labels": r.labels}
                    for c, r in rows]
    else:
        features = [{"input_ids": s.input_ids, "labels": s.labels, "label": lab} for s, lab in zip(rows, labels)]
    model.zero_grad(set_to_none=True)
    loss, metrics = preference_loss(model, PreferenceCollator(share)(features), knobs)
    loss.backward()
    return loss.detach(), metrics, grads(model)


def assert_close(a, b, what):
    assert torch.allclose(torch.as_tensor(a, dtype=torch.float32), torch.as_tensor(b, dtype=torch.float32), atol=TOL, rtol=TOL), \
        f"{what}: chatlora {a} vs TRL {b}"


def assert_grads(mine, theirs):
    assert mine.keys() == theirs.keys() and mine
    for name in mine:
        assert torch.allclose(mine[name], theirs[name], atol=TOL, rtol=1e-4), f"gradient of {name} differs"
    assert any(g.abs().sum() > 0 for g in mine.values())


@pytest.mark.parametrize("share", [None, "mask"], ids=["prompt-twice", "prompt-shared"])
@pytest.mark.parametrize("loss_type,beta,sft", [("sigmoid", 0.1, 0.0), ("ipo", 0.5, 0.0), ("sigmoid", 0.1, 0.5)])
def test_dpo_matches_trl(setup, tmp_path, loss_type, beta, sft, share):
    import datasets
    from trl import DPOConfig, DPOTrainer
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    from chatlora.config.preference import PreferenceConfig as Knobs

    tok, model, rows = setup
    data = datasets.Dataset.from_list([{"prompt": [u], "chosen": [{"role": "assistant", "content": c}],
                                        "rejected": [{"role": "assistant", "content": r}]} for u, c, r in PAIRS])
    # preference.sft_weight is TRL's added "sft" loss (the chosen replies' mean token loss), weighted.
    losses = dict(loss_type=[loss_type, "sft"], loss_weights=[1.0, sft]) if sft else dict(loss_type=[loss_type])
    args = DPOConfig(output_dir=str(tmp_path), beta=beta, bf16=False, report_to=[], use_cpu=True, **losses)
    # Given a PeftModel, TRL keeps a frozen copy of its adapter as the reference ("ref"), as chatlora
    # does when it starts from an SFT run's adapter.
    trainer = DPOTrainer(model=model, args=args, train_dataset=data, processing_class=tok)
    assert "ref" in model.peft_config
    move_adapter(model)
    loss, metrics, mine = ours(model, rows, Knobs(loss=loss_type, beta=beta, sft_weight=sft), share=share)
    batch = DataCollatorForPreference(pad_token_id=tok.pad_token_id)(
        [{"prompt_ids": c.input_ids[: head(c)], "chosen_ids": c.input_ids[head(c):], "rejected_ids": r.input_ids[head(r):]} for c, r in rows])
    model.train()
    model.zero_grad(set_to_none=True)
    theirs_loss = trainer.compute_loss(model, batch)
    theirs_loss.backward()
    theirs = grads(model)
    logged = trainer._metrics["train"]
    assert_close(loss, theirs_loss.detach(), "loss")
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"):
        assert_close(metrics[key], logged[key][-1], key)
    assert metrics["rewards/chosen"] != 0 and metrics["rewards/margins"] != 0
    assert_grads(mine, theirs)


def padded_logps(model, rows, average: bool):
    """TRL's own log-probabilities of the chosen and rejected samples, from a padded batch."""
    from trl.experimental.cpo.cpo_trainer import CPOTrainer

    samples = [c for c, _ in rows] + [r for _, r in rows]
    width = max(len(s) for s in samples)
    ids = torch.tensor([s.input_ids + [0] * (width - len(s)) for s in samples])
    labels = torch.tensor([s.labels + [-100] * (width - len(s)) for s in samples])
    mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in samples])
    logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits.float()
    logps = CPOTrainer.get_batch_logps(logits, labels, average_log_prob=average)
    nll = torch.nn.functional.cross_entropy(logits[: len(rows), :-1].flatten(0, 1), labels[: len(rows), 1:].flatten())
    return logps[: len(rows)], logps[len(rows):], nll


@pytest.mark.parametrize("share", [None, "mask"], ids=["prompt-twice", "prompt-shared"])
@pytest.mark.parametrize("loss_type,beta", [("simpo", 2.0), ("orpo", 0.1)])
def test_reference_free_losses_match_trl(setup, loss_type, beta, share):
    from trl.experimental.cpo.cpo_trainer import CPOTrainer
    from trl.experimental.orpo.orpo_trainer import ORPOTrainer

    from chatlora.config.preference import PreferenceConfig as Knobs

    tok, model, rows = setup
    model.train()
    loss, metrics, mine = ours(model, rows, Knobs(loss=loss_type, beta=beta, simpo_gamma=0.5), share=share)
    chosen, rejected, nll = padded_logps(model, rows, average=True)
    trl_self = SimpleNamespace(beta=beta, alpha=0.0, loss_type="sigmoid" if loss_type == "orpo" else loss_type,
                               simpo_gamma=0.5, label_smoothing=0.0, accelerator=SimpleNamespace(device=torch.device("cpu")))
    if loss_type == "simpo":
        losses, chosen_reward, rejected_reward = CPOTrainer.cpo_loss(trl_self, chosen, rejected)
        theirs_loss = losses.mean()
    else:
        # ORPO's NLL term: chatlora's is the chosen replies' token loss (TRL's ORPOTrainer also counts
        # the prompt's tokens); the odds-ratio term is TRL's function.
        losses, chosen_reward, rejected_reward, _, _ = ORPOTrainer.odds_ratio_loss(trl_self, chosen, rejected)
        theirs_loss = nll - losses.mean()
    theirs_loss.backward()
    assert_close(loss, theirs_loss.detach(), "loss")
    assert_close(metrics["rewards/chosen"], chosen_reward.mean(), "rewards/chosen")
    assert_close(metrics["rewards/rejected"], rejected_reward.mean(), "rewards/rejected")
    assert_grads(mine, grads(model))


def test_kto_matches_trl(setup, tmp_path):
    import datasets
    from trl import KTOConfig, KTOTrainer
    from trl.trainer.kto_trainer import DataCollatorForUnpairedPreference

    from chatlora.config.preference import PreferenceConfig as Knobs

    tok, model, rows = setup
    samples = [rows[0][0], rows[1][1], rows[2][0], rows[0][1]]
    labels = [True, False, True, False]
    data = datasets.Dataset.from_list([{"prompt": [u], "completion": [{"role": "assistant", "content": c}], "label": True}
                                       for u, c, _ in PAIRS] + [{"prompt": [PAIRS[0][0]], "completion": [{"role": "assistant", "content": PAIRS[0][2]}], "label": False}])
    args = KTOConfig(output_dir=str(tmp_path), beta=0.1, bf16=False, report_to=[], use_cpu=True, per_device_train_batch_size=4)
    trainer = KTOTrainer(model=model, args=args, train_dataset=data, processing_class=tok)
    assert "ref" in model.peft_config
    move_adapter(model)
    loss, metrics, mine = ours(model, samples, Knobs(loss="kto", beta=0.1), labels)
    completions = [s.input_ids[head(s):] for s in samples]
    batch = DataCollatorForUnpairedPreference(pad_token_id=tok.pad_token_id)(
        [{"prompt_ids": s.input_ids[: head(s)], "completion_ids": c, "KL_completion_ids": k, "label": lab}
         for s, c, k, lab in zip(samples, completions, completions[-1:] + completions[:-1], labels)])
    model.train()
    model.zero_grad(set_to_none=True)
    theirs_loss = trainer.compute_loss(model, batch)
    theirs_loss.backward()
    logged = trainer._metrics["train"]
    assert_close(loss, theirs_loss.detach(), "loss")
    assert_close(metrics["kl"], logged["kl"][-1], "kl")
    assert metrics["rewards/chosen"] != 0 and metrics["rewards/rejected"] != 0
    assert_grads(mine, grads(model))
