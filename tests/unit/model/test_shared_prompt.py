"""Pairs packed with each prompt once (data/collate.py pack_shared): the row is shorter, and both of its
attention descriptions give every trained token the log-probability it has with the prompt written
twice. The dense-mask form runs on the CPU as it is (and against TRL: test_preference.py). The varlen
form runs model/attention.py's own code, through transformers, with its CUDA kernel replaced by a
per-segment reference (float64), so everything but the kernel is checked here; tests/gpu runs the kernel."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from test_preference import PAIRS, setup  # noqa: F401  (a fixture)


def features(rows) -> list[dict]:
    return [{"input_ids": c.input_ids, "labels": c.labels, "rejected_input_ids": r.input_ids, "rejected_labels": r.labels}
            for c, r in rows]


def reference_varlen(q, k, v, cu_q, cu_k, max_q, max_k, *, scale=None, window_size=(-1, -1)):
    """What torch's varlen flash kernel computes, segment by segment: causal from the bottom right."""
    assert window_size == (-1, 0)
    out = torch.empty_like(q)
    for a, b, c, d in zip(cu_q[:-1].tolist(), cu_q[1:].tolist(), cu_k[:-1].tolist(), cu_k[1:].tolist()):
        assert b - a <= max_q and d - c <= max_k
        qs, ks, vs = (t.transpose(0, 1) for t in (q[a:b], k[c:d], v[c:d]))
        sees = torch.arange(d - c)[None, :] <= torch.arange(b - a)[:, None] + (d - c) - (b - a)
        scores = (qs @ ks.transpose(-1, -2) * scale).masked_fill(~sees, float("-inf"))
        out[a:b] = (scores.softmax(-1) @ vs).transpose(0, 1)
    return out


def test_each_prompt_is_in_the_row_once(setup):  # noqa: F811
    from chatlora.data.collate import PreferenceCollator

    _tok, _model, rows = setup
    twice, once = PreferenceCollator()(features(rows)), PreferenceCollator("varlen")(features(rows))
    prompts = sum(next(k for k, x in enumerate(c.labels) if x != -100) for c, _r in rows)
    assert once["input_ids"].shape[1] == twice["input_ids"].shape[1] - prompts
    assert once["trained_positions"].numel() == twice["trained_positions"].numel()
    assert torch.equal(once["sequence"].sort().values, twice["sequence"].sort().values)


@pytest.mark.parametrize("share", ["mask", "varlen"])
def test_shared_prompt_log_probs_equal_the_prompt_twice(setup, monkeypatch, request, share):  # noqa: F811
    from chatlora.data.collate import PreferenceCollator
    from chatlora.model import attention
    from chatlora.model.preference import sequence_logps

    _tok, model, rows = setup
    model = model.double().eval()
    expected = sequence_logps(model, PreferenceCollator()(features(rows)))[0]
    calls = []

    def counted(*args, window_size=(-1, -1), **kwargs):
        calls.append(1)
        return reference_varlen(*args, window_size=window_size, **kwargs)

    if share == "varlen":
        # _windowed() remembers the kernel's signature: forget the stand-in's when the test ends.
        attention._windowed.cache_clear()
        request.addfinalizer(attention._windowed.cache_clear)
        monkeypatch.setattr(attention, "_varlen", lambda: counted)
        model.get_base_model().config._attn_implementation = attention.register()
    got = sequence_logps(model, PreferenceCollator(share)(features(rows)))[0]
    assert torch.allclose(got, expected, atol=1e-10, rtol=1e-10), (got, expected)
    assert len(calls) == (2 if share == "varlen" else 0)  # the kernel ran in both layers
    assert len(got) == 2 * len(PAIRS)


def test_a_shared_prompt_is_refused_where_its_mask_would_be_wrong():
    """Sliding-window layers (the dense mask replaces transformers' windows) and attention kernels that
    take no 4D mask: refused before training, with what to do instead."""
    from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM

    from chatlora.config.preference import PreferenceConfig
    from chatlora.errors import ConfigError
    from chatlora.recipes.train import shared_prompt_form

    cfg = SimpleNamespace(preference=PreferenceConfig(share_prompt=True))
    tiny = dict(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                num_key_value_heads=1, attn_implementation="sdpa")
    assert shared_prompt_form(cfg, LlamaForCausalLM(LlamaConfig(**tiny))) == "mask"
    with pytest.raises(ConfigError, match="sliding-window layers"):
        shared_prompt_form(cfg, MistralForCausalLM(MistralConfig(**tiny, sliding_window=4)))
    flex = LlamaForCausalLM(LlamaConfig(**tiny))
    flex.config._attn_implementation = "flex_attention"
    with pytest.raises(ConfigError, match="the flex_attention attention takes no mask"):
        shared_prompt_form(cfg, flex)
