"""The `preference` section of a config: the loss of `stage: dpo` and its knobs (model/preference.py)."""

from __future__ import annotations

from dataclasses import dataclass

from chatlora.errors import ConfigError

LOSSES = ("sigmoid", "ipo", "orpo", "simpo", "kto")


@dataclass
class PreferenceConfig:
    loss: str = "sigmoid"
    """The preference loss of `stage: dpo`: sigmoid (DPO), ipo, orpo, simpo (pairs of chosen and
    rejected replies) or kto (single replies labelled true or false). sigmoid, ipo and kto compare with
    a reference: the SFT run's adapter frozen (model.adapter), else the base model. orpo and simpo use
    none; orpo adds the chosen replies' token loss."""
    beta: float = 0.1
    """The loss's temperature: DPO's and KTO's beta, IPO's tau, ORPO's weight of the odds-ratio term
    (lambda), SimPO's beta (its paper uses 2 to 10)."""
    simpo_gamma: float = 0.5
    """SimPO only: the target reward margin gamma (TRL's simpo_gamma)."""
    sft_weight: float = 0.0
    """sigmoid and ipo: adds this weight times the chosen replies' token loss (their mean negative
    log-probability per trained token; TRL's loss_type [sigmoid, sft] with loss_weights [1, w], RPO's
    alpha). Keeps the chosen replies likely, end-of-turn token included, where DPO alone lowers both
    sides and replies grow longer and stop less (docs/preference.md)."""
    desirable_weight: float = 1.0
    """KTO only: weight of the losses of rows labelled true."""
    undesirable_weight: float = 1.0
    """KTO only: weight of the losses of rows labelled false."""
    share_prompt: bool = False
    """Pairs only: each pair's prompt goes through the model once, its two replies both attending to it
    (data/collate.py pack_shared), where by default chosen and rejected each carry their own copy. The
    same log-probabilities (checked against TRL on the CPU), for a quarter to a third fewer tokens a
    step. Off by default until its GPU kernel path is measured (docs/preference.md)."""

    def __post_init__(self) -> None:
        if self.loss not in LOSSES:
            raise ConfigError(f"preference.loss: {self.loss!r} is not one of {', '.join(LOSSES)}")
        if self.sft_weight < 0:
            raise ConfigError(f"preference.sft_weight {self.sft_weight} must be 0 or more")
        if self.sft_weight and self.loss not in ("sigmoid", "ipo"):
            raise ConfigError(f"preference.sft_weight is for the sigmoid and ipo losses; {self.loss} "
                              + ("has the chosen replies' token loss built in" if self.loss == "orpo" else "takes none"))
        if self.share_prompt and self.loss == "kto":
            raise ConfigError("preference.share_prompt is for pairs of chosen and rejected replies; kto trains on single replies")
        for key in ("beta", "desirable_weight", "undesirable_weight"):
            value = getattr(self, key)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0:
                raise ConfigError(f"preference.{key}: {value!r} must be a positive number")
        if not isinstance(self.simpo_gamma, (int, float)) or self.simpo_gamma < 0:
            raise ConfigError(f"preference.simpo_gamma: {self.simpo_gamma!r} must be 0 or more")
