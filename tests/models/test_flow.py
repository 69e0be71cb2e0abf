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
