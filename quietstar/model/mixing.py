"""The mixing head (SPEC section 2): how much of the post-thought state to trust, per token."""

from __future__ import annotations

import torch
from torch import nn

from quietstar._checks import check_int, check_tensor

INIT_STD = 0.02  # the authors' normal(0, 0.02) for the first two layers' weights


class MixingHead(nn.Module):
    """A small MLP mapping ``(h_base, h_talk)`` to one mixing weight per token.

    ``Linear(2d, d) -> ReLU -> Linear(d, d) -> ReLU -> Linear(d, 1, bias=False)`` on the
    concatenation ``[base_hidden ; talk_hidden]``, initialised as the authors' code does: the
    first two layers' weights from normal(0, 0.02) and their biases zero, the last layer's
    weights zero, so the raw weight starts at exactly 0 and ``(1 - w) * h_base + w * h_talk``
    starts as the base model. Feed ``w`` to
    ``quietstar.linear_cross_entropy(talk_hidden, ..., mix=(base_hidden, w))``.

    Args:
        hidden_size: ``d``, the width of both hidden states.
        sigmoid: squash ``w`` into ``(0, 1)`` (the paper's variant; it then starts at 0.5).
            Off by default: the authors' code uses the raw output.
        last_layer_bias: give the last layer a bias (zero at the start); only to load
            checkpoints saved by quietstar before 0.2, whose mixing head had one.
        device, dtype: of the parameters.

    Shapes:
        ``forward(base_hidden [..., d], talk_hidden [..., d]) -> w [...]``.
    """

    def __init__(
        self,
        hidden_size: int,
        *,
        sigmoid: bool = False,
        last_layer_bias: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        check_int("hidden_size", hidden_size, minimum=1)
        factory = {"device": device, "dtype": dtype}
        self.hidden_size = hidden_size
        self.sigmoid = bool(sigmoid)
        self.mlp = nn.Sequential(
            nn.Linear(2 * hidden_size, hidden_size, **factory),
            nn.ReLU(),
            nn.Linear(hidden_size, hidden_size, **factory),
            nn.ReLU(),
            nn.Linear(hidden_size, 1, bias=bool(last_layer_bias), **factory),
        )
        for layer in (self.mlp[0], self.mlp[2]):
            nn.init.normal_(layer.weight, std=INIT_STD)
            nn.init.zeros_(layer.bias)
        # The raw weight is 0 for every input: training starts at the base model.
        nn.init.zeros_(self.mlp[-1].weight)
        if last_layer_bias:
            nn.init.zeros_(self.mlp[-1].bias)

    def forward(self, base_hidden: torch.Tensor, talk_hidden: torch.Tensor) -> torch.Tensor:
        """Mixing weight ``w [...]`` of ``base_hidden [..., d]`` and ``talk_hidden [..., d]``."""
        check_tensor("base_hidden", base_hidden)
        check_tensor("talk_hidden", talk_hidden, device=base_hidden.device)
        if base_hidden.dim() == 0 or base_hidden.shape[-1] != self.hidden_size:
            raise ValueError(f"base_hidden must be [..., {self.hidden_size}], got {tuple(base_hidden.shape)}")
        if talk_hidden.shape != base_hidden.shape:
            raise ValueError(
                f"talk_hidden must have the shape of base_hidden {tuple(base_hidden.shape)}, "
                f"got {tuple(talk_hidden.shape)}"
            )
        w = self.mlp(torch.cat([base_hidden, talk_hidden], dim=-1)).squeeze(-1)
        return torch.sigmoid(w) if self.sigmoid else w

    def extra_repr(self) -> str:
        return f"hidden_size={self.hidden_size}, sigmoid={self.sigmoid}, last_layer_bias={self.mlp[-1].bias is not None}"
