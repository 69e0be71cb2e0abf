"""The flow bottleneck is invertible and its log-determinant is the true one."""

import pytest
import torch

from aeflow.errors import ConfigError
from aeflow.nn.flow import FlowBottleneck


def _perturbed_flow(channels: int, steps: int, subnet: str, seed: int = 0) -> FlowBottleneck:
    """A flow in eval mode whose couplings are no longer the zero-initialised identity."""
    torch.manual_seed(seed)
    flow = FlowBottleneck(channels, steps=steps, subnet=subnet)
    with torch.no_grad():
        for name, p in flow.named_parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn_like(p))
        flow.feature_mean.normal_()
        flow.feature_std.uniform_(0.5, 2.0)
    return flow.eval()


@pytest.mark.parametrize("subnet", ["conv", "resnet"])
def test_flow_inverts_to_1e_4(subnet):
    flow = _perturbed_flow(16, 8, subnet)
    z = 2 * torch.randn(3, 16, 4, 4)
    z_prime, log_det = flow(z)
    assert (z_prime - z).abs().max() > 0.1, "the perturbed flow must not be the identity"
    assert log_det.abs().min() > 1e-3
    assert (flow.inverse(z_prime) - z).abs().max() < 1e-4


@pytest.mark.parametrize("subnet", ["conv", "resnet"])
def test_log_det_matches_brute_force_jacobian(subnet):
    flow = _perturbed_flow(4, 8, subnet).double()
    z = torch.randn(1, 4, 2, 2, dtype=torch.float64)
    _, log_det = flow(z)
    jacobian = torch.autograd.functional.jacobian(lambda v: flow(v.view_as(z))[0].flatten(), z.flatten())
    _, brute_force = torch.linalg.slogdet(jacobian)
    assert torch.allclose(log_det[0], brute_force, atol=1e-8)


def test_first_training_batch_standardises_the_features():
    torch.manual_seed(0)
    flow = FlowBottleneck(8, steps=2, subnet="conv")  # zero-init couplings: the steps start near the identity
    z = 5 + 7 * torch.randn(16, 8, 4, 4)
    flow.train()
    z_prime, _ = flow(z)
    assert bool(flow.initialized)
    assert z_prime.mean().abs() < 0.2 and (z_prime.std() - 1).abs() < 0.2
    before = flow.feature_std.clone()
    flow(3 * z)  # later batches leave the standardisation alone
    assert torch.equal(flow.feature_std, before)


def test_rejects_unknown_subnet():
    with pytest.raises(ConfigError, match="subnet"):
        FlowBottleneck(8, subnet="mlp")


def test_image_norm_log_det_is_that_of_the_normalised_map():
    """With input_norm="image" the flow models u = (z - m(z)) / s(z): its log-determinant is that of u -> z'."""
    from aeflow.nn.flow import image_norm

    torch.manual_seed(0)
    flow = FlowBottleneck(4, steps=4, subnet="conv", input_norm="image")
    with torch.no_grad():
        for p in flow.parameters():
            if p.requires_grad:  # not the fixed permutation matrices
                p.add_(0.1 * torch.randn_like(p))
    flow = flow.eval().double()
    z = 3 + 2 * torch.randn(1, 4, 2, 2, dtype=torch.float64)
    u = image_norm(z)
    assert abs(float(u.mean())) < 1e-9 and abs(float(u.std(unbiased=False)) - 1) < 1e-4
    z_prime, log_det = flow(z)
    jacobian = torch.autograd.functional.jacobian(lambda v: flow.inn(v.view_as(u))[0].flatten(), u.flatten())
    assert torch.allclose(log_det[0], torch.linalg.slogdet(jacobian)[1], atol=1e-8)
    assert (flow.inverse(z_prime) - u).abs().max() < 1e-6  # the inverse gives u: m(z) and s(z) are not kept


def test_image_norm_forgets_each_images_feature_scale_and_the_channel_norm_does_not():
    torch.manual_seed(0)
    z = torch.randn(2, 8, 4, 4)
    rescaled = z.clone()
    rescaled[1] = 5 * z[1] + 2  # one image's features louder and shifted
    by_image = FlowBottleneck(8, steps=2, subnet="conv", input_norm="image").eval()
    by_channel = FlowBottleneck(8, steps=2, subnet="conv", input_norm="channel").eval()
    for flow in (by_image, by_channel):
        with torch.no_grad():
            for p in flow.parameters():
                if p.requires_grad:  # not the fixed permutation matrices
                    p.add_(0.1 * torch.randn_like(p))
    assert torch.allclose(by_image(z)[0], by_image(rescaled)[0], atol=1e-4)
    assert torch.allclose(by_image(z)[1], by_image(rescaled)[1], atol=1e-4)
    assert torch.equal(by_channel(z)[0][0], by_channel(rescaled)[0][0])
    assert not torch.allclose(by_channel(z)[0][1], by_channel(rescaled)[0][1], atol=1e-2)


def test_rejects_unknown_input_norm():
    with pytest.raises(ConfigError, match="input_norm"):
        FlowBottleneck(8, input_norm="batch")


def _freia_and_ours(shape: tuple[int, ...], subnet):
    """FrEIA's AllInOneBlock and a PermutationStep built with another permutation, then given FrEIA's state dict."""
    import FrEIA.modules as Fm
    import numpy as np

    from aeflow.nn.flow import PermutationStep

    kwargs = {"subnet_constructor": subnet, "affine_clamping": 2.0, "global_affine_type": "SOFTPLUS",
              "permute_soft": False}
    np.random.seed(0)
    freia = Fm.AllInOneBlock([shape], **kwargs)
    np.random.seed(1)
    ours = PermutationStep([shape], **kwargs)
    assert not torch.equal(ours.w_perm, freia.w_perm), "the two must start with different permutations"
    torch.manual_seed(0)
    with torch.no_grad():
        for p in freia.parameters():
            if p.requires_grad:
                p.add_(0.3 * torch.randn_like(p))
    ours.load_state_dict(freia.state_dict())
    return freia, ours


@pytest.mark.parametrize("rank", [1, 3])
def test_permutation_by_index_equals_freias_step_bit_for_bit(rank):
    from torch import nn

    from aeflow.nn.flow import _subnet_constructor

    if rank == 3:
        shape, subnet, x = (16, 1, 1), _subnet_constructor("conv", 1.0), torch.randn(4, 16, 5, 5)
    else:
        shape, x = (12,), torch.randn(4, 12)

        def subnet(c_in, c_out):
            return nn.Sequential(nn.Linear(c_in, 8), nn.ReLU(), nn.Linear(8, c_out))
    freia, ours = _freia_and_ours(shape, subnet)
    (y_freia,), log_det_freia = freia([x])
    (y_ours,), log_det_ours = ours([x])
    assert (y_ours - x).abs().max() > 0.1
    assert torch.equal(y_ours, y_freia) and torch.equal(log_det_ours, log_det_freia)
    (x_freia,), _ = freia([y_freia], rev=True)
    (x_ours,), _ = ours([y_ours], rev=True)
    assert torch.equal(x_ours, x_freia) and (x_ours - x).abs().max() < 1e-5
    # the gradients too: the backward of index_select is that of the 0/1 convolution
    x.requires_grad_(True)
    grad_freia, = torch.autograd.grad(freia([x])[0][0].square().sum(), x)
    grad_ours, = torch.autograd.grad(ours([x])[0][0].square().sum(), x)
    assert torch.allclose(grad_ours, grad_freia, rtol=0, atol=1e-6)


def test_permutation_step_refuses_a_soft_permutation_and_a_matrix_that_is_not_one():
    from aeflow.nn.flow import PermutationStep, _subnet_constructor

    with pytest.raises(ConfigError, match="hard permutation"):
        PermutationStep([(8, 1, 1)], subnet_constructor=_subnet_constructor("conv", 1.0), permute_soft=True)
    step = PermutationStep([(8, 1, 1)], subnet_constructor=_subnet_constructor("conv", 1.0))
    state = step.state_dict()
    state["w_perm"] = torch.full_like(state["w_perm"], 1 / 8)
    with pytest.raises(ConfigError, match="not a permutation"):
        step.load_state_dict(state)


def test_training_adam_is_fused_on_the_cpu_and_takes_the_same_steps():
    from aeflow.training.module import adam

    torch.manual_seed(0)
    weights = [torch.nn.Parameter(torch.randn(5, 3)), torch.nn.Parameter(torch.randn(3))]
    start = [w.detach().clone() for w in weights]
    copies = [torch.nn.Parameter(w.clone()) for w in start]
    fused, plain = adam(weights, lr=1e-2, weight_decay=1e-4), torch.optim.Adam(copies, lr=1e-2, weight_decay=1e-4)
    assert fused.param_groups[0]["fused"] is True and not plain.param_groups[0]["fused"]
    for _ in range(5):
        for params, optimizer in ((weights, fused), (copies, plain)):
            optimizer.zero_grad()
            (params[0] @ params[1]).sin().sum().backward()
            optimizer.step()
    for a, b, a0 in zip(weights, copies, start):
        assert (a - a0).abs().min() > 1e-3, "every weight moved"
        assert torch.allclose(a, b, rtol=0, atol=1e-6)
