"""``QuietStarConfig``: the Quiet-STaR hyper-parameters (defaults from SPEC section 3)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

from quietstar._checks import check_int, check_temperature

MIX_MODES = ("hidden", "logprobs")


@dataclass
class QuietStarConfig:
    """Hyper-parameters of thinking, talking and learning.

    Attributes:
        thought_tokens: ``T``, sampled thought tokens per position (reference: 9, i.e.
            ``n_ahead = 12`` counting the base step, start and end).
        talk_tokens: ``n_talk``, true tokens each thought is judged on (extended teacher forcing).
        n_thoughts: independent thoughts per position (reward baseline over them).
        sampling_temperature: Gumbel-softmax temperature of thought sampling (at least
            ``MIN_TEMPERATURE``, 1e-6, as ``policy_temperature``).
        policy_temperature: ``tau`` of the REINFORCE log-probabilities.
        policy_weight: ``beta`` in ``L = L_nll + beta * L_policy`` (reference: 1e6 with lr 1e-6).
        base_loss_weight: weight of the no-thought loss; the talk loss gets ``1 - base_loss_weight``.
        clamp_negative_rewards: clamp rewards below 0 to 0 (reference code).
        meta_token_scale: ``s``; start/end embeddings are stored divided by it and used times it.
        mix: ``"hidden"`` (raw weight mixing hidden states, the authors' code) or ``"logprobs"``
            (the paper: sigmoid weight interpolating log-probabilities).
    """

    thought_tokens: int = 9
    talk_tokens: int = 4
    n_thoughts: int = 2
    sampling_temperature: float = 1.0
    policy_temperature: float = 3.0
    policy_weight: float = 1e6
    base_loss_weight: float = 0.5
    clamp_negative_rewards: bool = True
    meta_token_scale: float = 100.0
    mix: str = "hidden"

    def __post_init__(self) -> None:
        for name in ("thought_tokens", "talk_tokens", "n_thoughts"):
            check_int(name, getattr(self, name), minimum=1)
        for name in ("sampling_temperature", "policy_temperature"):
            check_temperature(name, getattr(self, name))
        if not _is_number(self.meta_token_scale) or not 0 < self.meta_token_scale < math.inf:
            raise ValueError(f"meta_token_scale must be a finite number > 0, got {self.meta_token_scale!r}")
        if not _is_number(self.policy_weight) or not 0 <= self.policy_weight < math.inf:
            raise ValueError(f"policy_weight must be a finite number >= 0, got {self.policy_weight!r}")
        if not _is_number(self.base_loss_weight) or not 0 <= self.base_loss_weight <= 1:
            raise ValueError(f"base_loss_weight must be a number in [0, 1], got {self.base_loss_weight!r}")
        if not isinstance(self.clamp_negative_rewards, bool):
            raise ValueError(f"clamp_negative_rewards must be a bool, got {self.clamp_negative_rewards!r}")
        if self.mix not in MIX_MODES:
            raise ValueError(f"mix must be one of {MIX_MODES}, got {self.mix!r}")

    @property
    def chain_steps(self) -> int:
        """``C``: start, the thought tokens, end, then the ``talk_tokens - 1`` talk inputs."""
        return self.thought_tokens + self.talk_tokens + 1

    @property
    def tree_slots(self) -> int:
        """``1 + C * N``: the text's slot and every chain step of every thought."""
        return 1 + self.chain_steps * self.n_thoughts

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> QuietStarConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise ValueError(f"unknown QuietStarConfig fields: {sorted(unknown)}")
        return cls(**values)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
