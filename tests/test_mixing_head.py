"""MixingHead (SPEC section 2): starts at the base model, shapes, the sigmoid variant, gradients."""

from __future__ import annotations

import pytest
import torch
from helpers import DEVICE

from quietstar import MixingHead, linear_cross_entropy

WIDTH = 16


def states(*batch, seed=0):
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(*batch, WIDTH, generator=gen).to(DEVICE).requires_grad_()
    talk = torch.randn(*batch, WIDTH, generator=gen).to(DEVICE).requires_grad_()
    return base, talk


def scoring_problem(rows=10, vocab=30):
    """A fresh head, base and talk states ``[rows, WIDTH]``, an lm_head weight and targets."""
    torch.manual_seed(0)
    head = MixingHead(WIDTH).to(DEVICE)
    base, talk = states(rows)
    weight = torch.randn(vocab, WIDTH, device=DEVICE)
    targets = torch.randint(0, vocab, (rows,), device=DEVICE)
    return head, base, talk, weight, targets


def test_raw_weight_starts_at_exactly_zero():
    torch.manual_seed(0)
    head = MixingHead(WIDTH).to(DEVICE)
    w = head(*states(3, 5))
    assert torch.equal(w, torch.zeros(3, 5, device=DEVICE))


def test_zero_weight_scores_exactly_the_base_state():
    head, base, talk, weight, targets = scoring_problem()
    mixed = linear_cross_entropy(talk, weight, targets, mix=(base, head(base, talk)))
    assert torch.equal(mixed, linear_cross_entropy(base, weight, targets))


def test_initialisation_is_the_authors():
    """normal(0, 0.02) weights and zero biases in the first two layers; the last layer has no
    bias and zero weights."""
    torch.manual_seed(0)
    head = MixingHead(256)
    first, second, last = head.mlp[0], head.mlp[2], head.mlp[4]
    for layer in (first, second):
        assert abs(layer.weight.std().item() - 0.02) < 0.001 and abs(layer.weight.mean().item()) < 0.001
        assert torch.equal(layer.bias, torch.zeros_like(layer.bias))
    assert last.bias is None and torch.equal(last.weight, torch.zeros_like(last.weight))
    assert MixingHead(8, last_layer_bias=True).mlp[4].bias.eq(0).all()


@pytest.mark.parametrize("batch", [(), (7,), (2, 3, 4)], ids=["no-batch", "rows", "three-batch-dims"])
def test_weight_has_the_input_shape_without_the_hidden_dimension(batch):
    head = MixingHead(WIDTH).to(DEVICE)
    assert head(*states(*batch)).shape == batch


def test_sigmoid_variant_starts_at_one_half_and_stays_in_the_open_unit_interval():
    torch.manual_seed(0)
    head = MixingHead(WIDTH, sigmoid=True).to(DEVICE)
    base, talk = states(64)
    assert torch.equal(head(base, talk), torch.full((64,), 0.5, device=DEVICE))
    torch.nn.init.normal_(head.mlp[-1].weight, std=30.0)  # the 0.02-init layers keep features small
    w = head(base, talk)
    assert ((w > 0) & (w < 1)).all() and w.std() > 0.05


def test_gradient_reaches_every_parameter_and_both_states_through_the_loss():
    head, base, talk, weight, targets = scoring_problem()

    def loss():
        return linear_cross_entropy(talk, weight, targets, mix=(base, head(base, talk))).mean()

    loss().backward()
    # At the start only the zero-initialised last layer can move (everything before it is
    # multiplied by its zero weight) ...
    last = head.mlp[-1]
    assert last.weight.grad.abs().sum() > 0
    assert head.mlp[0].weight.grad.abs().sum() == 0
    # ... and after one step the gradient flows through the whole MLP into both states.
    with torch.no_grad():
        for p in head.parameters():
            p -= 0.5 * p.grad
    head.zero_grad()
    base.grad = talk.grad = None
    loss().backward()
    for name, p in head.named_parameters():
        assert p.grad.abs().sum() > 0, name
    assert base.grad.abs().sum() > 0 and talk.grad.abs().sum() > 0


@pytest.mark.parametrize(
    "base_shape,talk_shape,argument",
    [((4, WIDTH + 1), (4, WIDTH + 1), "base_hidden"), ((4, WIDTH), (5, WIDTH), "talk_hidden"), ((), (), "base_hidden")],
)
def test_mismatched_states_raise_value_error_naming_them(base_shape, talk_shape, argument):
    head = MixingHead(WIDTH)
    with pytest.raises(ValueError, match=argument):
        head(torch.zeros(base_shape), torch.zeros(talk_shape))


def test_hidden_size_must_be_positive():
    with pytest.raises(ValueError, match="hidden_size"):
        MixingHead(0)
