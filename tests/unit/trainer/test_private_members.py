"""Every private member of transformers, accelerate or torch that chatlora overrides, reads or replaces
(trainer/overrides.py, PRIVATE_MEMBERS) still exists in the installed versions, with the parameters
chatlora's override takes. A failure names the member: an upgrade renamed or removed it, and
trainer/overrides.py must follow."""

from __future__ import annotations

import importlib
import inspect

import pytest

from chatlora.trainer.overrides import PRIVATE_MEMBERS, TrainerOverrides


def _owner(spec: str) -> tuple[type, bool]:
    module, _, name = spec.partition(":")
    instance = name.endswith("()")
    return getattr(importlib.import_module(module), name.removesuffix("()")), instance


def _sources(cls: type) -> str:
    """The source of `cls` and of its bases (a member may be set in a base class's code)."""
    texts = []
    for klass in cls.__mro__:
        try:
            texts.append(inspect.getsource(klass))
        except (OSError, TypeError):  # builtins, classes made at run time
            pass
    return "\n".join(texts)


@pytest.mark.parametrize("owner, member, kind", PRIVATE_MEMBERS, ids=[f"{o}.{m}" for o, m, _ in PRIVATE_MEMBERS])
def test_the_private_member_still_exists(owner, member, kind):
    cls, instance = _owner(owner)
    if instance:
        found = f"self.{member}" in _sources(cls) or hasattr(cls, member)
    else:
        found = hasattr(cls, member)
    assert found, (f"{owner.removesuffix('()')}.{member} is gone from the installed version: chatlora {kind}s it in "
                   f"src/chatlora/trainer/overrides.py; find what replaced it and update that file")


@pytest.mark.parametrize("member", [m for o, m, k in PRIVATE_MEMBERS if k == "override"])
def test_an_override_takes_what_trainer_passes(member):
    from transformers import Trainer

    theirs = inspect.signature(getattr(Trainer, member))
    ours = inspect.signature(getattr(TrainerOverrides, member))
    takes_any = any(p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in ours.parameters.values())
    missing = [name for name in theirs.parameters if name not in ours.parameters]
    assert takes_any or not missing, (f"transformers.Trainer.{member} now takes {', '.join(missing)}, which "
                                      f"chatlora's override in src/chatlora/trainer/overrides.py does not: update it")


def test_every_override_in_the_file_is_listed():
    from transformers import Trainer

    listed = {m for o, m, k in PRIVATE_MEMBERS if o == "transformers:Trainer" and k == "override"}
    overridden = {name for name in vars(TrainerOverrides) if name.startswith("_") and not name.startswith("__")
                  and hasattr(Trainer, name)}
    assert overridden == listed, f"overrides not in PRIVATE_MEMBERS, or listed and gone: {sorted(overridden ^ listed)}"
