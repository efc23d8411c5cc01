"""``fuse_layers``: the decoder's norms and MLPs on the fused ops, with the model's own weights,
keys and outputs."""

from __future__ import annotations

import copy

import pytest
import torch

from helpers import ARCHITECTURES, DEVICE, quietstar_model, relative_error, requires_triton, tiny_causal_lm
from quietstar.model.fused_layers import QuietStarMLP, QuietStarRMSNorm, fuse_layers


def logits_and_grads(model, ids):
    model.zero_grad()
    logits = model(ids).logits
    logits.square().mean().backward()
    return logits, {name: p.grad.clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize("backend", [None, pytest.param("triton", marks=requires_triton)])
@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_fused_layers_give_the_model_s_own_logits_and_gradients(architecture, backend, monkeypatch):
    device = torch.device("cpu")
    if backend is not None:  # the kernels the fused modules run (the automatic choice on CUDA)
        monkeypatch.setenv("QUIETSTAR_BACKEND", backend)
        device = DEVICE  # a GPU, or the CPU under the Triton interpreter
    model = tiny_causal_lm(architecture).to(device)
    fused = fuse_layers(copy.deepcopy(model))
    for layer in fused.model.layers:
        assert isinstance(layer.input_layernorm, QuietStarRMSNorm)
        assert isinstance(layer.post_attention_layernorm, QuietStarRMSNorm)
        assert isinstance(layer.mlp, QuietStarMLP)
    assert isinstance(fused.model.norm, QuietStarRMSNorm)
    assert list(fused.state_dict()) == list(model.state_dict())
    ids = torch.randint(0, 97, (2, 11), generator=torch.Generator().manual_seed(0)).to(device)
    expected, expected_grads = logits_and_grads(model, ids)
    logits, grads = logits_and_grads(fused, ids)
    if backend is not None:
        assert fused.model.norm(torch.randn(2, fused.config.hidden_size, device=device)).grad_fn.name() == "RMSNormTritonBackward"
    assert relative_error(logits, expected) < 1e-5
    for name, grad in expected_grads.items():
        assert relative_error(grads[name], grad) < 1e-4, name


def test_fuse_layers_shares_the_weights_and_is_idempotent():
    model = tiny_causal_lm()
    norm, mlp = model.model.layers[0].input_layernorm, model.model.layers[0].mlp
    fuse_layers(model)
    layer = model.model.layers[0]
    assert layer.input_layernorm.weight is norm.weight
    assert layer.mlp.gate_proj is mlp.gate_proj and layer.mlp.down_proj is mlp.down_proj
    fused_norm = layer.input_layernorm
    fuse_layers(model)
    assert model.model.layers[0].input_layernorm is fused_norm


def test_fuse_layers_leaves_other_activations_and_hooked_modules_alone():
    model = tiny_causal_lm(hidden_act="gelu")
    hooked = model.model.layers[1].post_attention_layernorm
    hooked.register_forward_hook(lambda module, args, out: out * 2)
    fuse_layers(model)
    assert not isinstance(model.model.layers[0].mlp, QuietStarMLP)  # gelu gate
    assert model.model.layers[1].post_attention_layernorm is hooked
    assert isinstance(model.model.layers[0].input_layernorm, QuietStarRMSNorm)


def test_quietstar_model_fuses_layers_unless_told_not_to():
    assert isinstance(quietstar_model().model.model.layers[0].mlp, QuietStarMLP)
    from quietstar import QuietStarModel

    plain = QuietStarModel(tiny_causal_lm(), fused_layers=False)
    assert not isinstance(plain.model.model.layers[0].mlp, QuietStarMLP)
    assert not isinstance(plain.model.model.norm, QuietStarRMSNorm)


def test_the_step_with_fused_layers_equals_the_step_without():
    from quietstar import QuietStarConfig, QuietStarModel

    models = []
    for fused_layers in (True, False):
        qs = QuietStarModel(tiny_causal_lm(), config=QuietStarConfig(), fused_layers=fused_layers)
        torch.nn.init.normal_(qs.mixing_head.mlp[-1].weight, std=0.3, generator=torch.Generator().manual_seed(3))
        models.append(qs)
    ids = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(1))
    results = []
    for qs in models:
        out = qs(ids, generator=torch.Generator().manual_seed(2))
        out.loss.backward()
        results.append((out.loss.detach(), {n: p.grad for n, p in qs.named_parameters() if p.grad is not None}))
    (loss_fused, grads_fused), (loss_plain, grads_plain) = results
    # Each float32 step is about 1e-4 from the float64 one here (rewards are differences of
    # log-probabilities): the two may differ by as much.
    assert relative_error(loss_fused, loss_plain) < 2e-4
    assert grads_fused.keys() == grads_plain.keys()
    for name, grad in grads_plain.items():
        assert relative_error(grads_fused[name], grad) < 1e-3, name


def test_fuse_layers_keeps_modules_with_backward_or_activation_hooks_and_the_training_mode():
    model = tiny_causal_lm()  # eval mode
    norm = model.model.layers[0].input_layernorm
    norm.register_full_backward_hook(lambda module, grad_in, grad_out: None)
    act = model.model.layers[1].mlp.act_fn
    act.register_forward_hook(lambda module, args, out: out)
    fuse_layers(model)
    assert model.model.layers[0].input_layernorm is norm
    assert model.model.layers[1].mlp.act_fn is act
    assert isinstance(model.model.layers[0].mlp, QuietStarMLP)
    assert not any(module.training for module in model.modules())


def test_fuse_layers_leaves_an_mlp_whose_activation_was_replaced():
    model = tiny_causal_lm()
    model.model.layers[0].mlp.act_fn = torch.nn.GELU()
    fuse_layers(model)
    assert not isinstance(model.model.layers[0].mlp, QuietStarMLP)
    assert isinstance(model.model.layers[1].mlp, QuietStarMLP)
