"""The one options type and the samplers that read it: no model, so this runs in a second."""

from __future__ import annotations

import pytest
import torch

from chatlora.errors import ConfigError
from chatlora.generate.events import RequestError
from chatlora.generate.replies import generate_replies
from chatlora.generate.sampling import GREEDY_BELOW, Sampling, generate_options, pick_tokens, processors
from chatlora.recipes.chat import CHAT_SAMPLING, check_sampling
from chatlora.serve.params import request_sampling


def test_defaults_are_greedy_and_override_the_models_own():
    assert Sampling().greedy and Sampling(temperature=GREEDY_BELOW / 2).greedy
    assert generate_options(Sampling()) == {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
    sampled = generate_options(Sampling(temperature=0.7, top_p=0.9, top_k=5, repetition_penalty=1.1, min_new_tokens=3))
    assert sampled == {"do_sample": True, "temperature": 0.7, "top_p": 0.9, "top_k": 5, "repetition_penalty": 1.1,
                       "min_new_tokens": 3}


def test_processors_in_generates_order():
    names = [type(p).__name__ for p in processors(Sampling(temperature=0.7, top_p=0.9, top_k=5, repetition_penalty=1.1))]
    assert names == ["RepetitionPenaltyLogitsProcessor", "TemperatureLogitsWarper", "TopKLogitsWarper", "TopPLogitsWarper"]
    assert list(processors(Sampling())) == []


def test_pick_tokens_is_argmax_for_greedy_rows_and_seeded_otherwise():
    class Row:
        def __init__(self, sampling, seed=None):
            self.sampling = sampling
            self.generator = torch.Generator().manual_seed(seed) if seed is not None else None

    logits = torch.randn(2, 50, generator=torch.Generator().manual_seed(0))
    rows = [Row(Sampling()), Row(Sampling(temperature=1.0, top_p=0.9), seed=3)]
    first = pick_tokens(logits.clone(), rows)
    assert first[0] == int(logits[0].argmax())
    rows[1] = Row(Sampling(temperature=1.0, top_p=0.9), seed=3)
    assert pick_tokens(logits.clone(), rows) == first


def test_each_caller_checks_its_own_ranges():
    with pytest.raises(RequestError, match="temperature") as e:
        request_sampling(temperature=3)
    assert e.value.param == "temperature"
    assert request_sampling(max_tokens=5) == Sampling(max_new_tokens=5, temperature=1.0)
    check_sampling(CHAT_SAMPLING)
    with pytest.raises(ConfigError, match="--temperature: -1 must be 0"):
        check_sampling(Sampling(max_new_tokens=8, temperature=-1))


def test_replies_take_a_sampling():
    with pytest.raises(TypeError, match="Sampling"):
        generate_replies(None, None, [], 16)
