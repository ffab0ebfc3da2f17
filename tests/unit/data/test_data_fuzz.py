"""Random JSON (and random bytes) thrown at the data loader: whatever a file holds, reading it either
gives well-formed conversations or raises DataError naming the file; never anything else."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from chatlora.config.schema import DataConfig
from chatlora.data.prepare import load_conversations
from chatlora.errors import DataError

# Keys the formats look for, so random rows often come close to valid ones and reach the deeper
# checks (roles, order, empty replies), not only "fits no known format".
KEYS = ["instruction", "input", "output", "system", "history", "messages", "role", "content", "conversations",
        "from", "value", "type", "text"]
ROLES = ["user", "assistant", "system", "human", "gpt", "model", "tool", ""]
scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8) | st.sampled_from(ROLES)
json_values = st.recursive(
    scalars,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=5), children, max_size=5),
    max_leaves=25,
)
message = st.fixed_dictionaries({"role": st.sampled_from(ROLES), "content": st.text(max_size=6) | scalars})
near_valid_rows = st.one_of(
    st.fixed_dictionaries({"messages": st.lists(message, max_size=5)}),
    st.fixed_dictionaries({"instruction": scalars, "output": scalars}, optional={"input": scalars, "history": json_values}),
    st.fixed_dictionaries({"conversations": st.lists(st.fixed_dictionaries({"from": st.sampled_from(ROLES), "value": scalars}), max_size=5)}),
    json_values,
)


def load(name: str, content: bytes):
    """load_conversations on a file holding `content`: (conversations, None) or (None, DataError)."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / name
        path.write_bytes(content)
        try:
            train, _, _ = load_conversations(DataConfig(train=[str(path)]))
            return train, None, str(path)
        except DataError as e:
            return None, e, str(path)


def check(result) -> None:
    conversations, error, path = result
    if error is not None:
        assert error.problems and all(p.source == path for p in error.problems)
        assert str(error).startswith("the data has ")
        return
    assert conversations
    for conv in conversations:
        roles = [m["role"] for m in conv.messages]
        body = roles[1:] if roles[0] == "system" else roles
        assert body and body == ["user", "assistant"] * (len(body) // 2), roles
        assert all(isinstance(m["content"], str) for m in conv.messages)
        assert conv.messages[-1]["content"].strip(), "a trained reply is never empty"


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(near_valid_rows, max_size=6))
def test_random_jsonl_rows(rows):
    check(load("data.jsonl", "\n".join(json.dumps(r) for r in rows).encode()))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(json_values | st.lists(near_valid_rows, max_size=6))
def test_random_json_documents(document):
    check(load("data.json", json.dumps(document).encode()))


@settings(max_examples=100, deadline=None)
@given(st.binary(max_size=200), st.sampled_from(["data.json", "data.jsonl", "data.txt"]))
def test_random_bytes(content, name):
    check(load(name, content))
