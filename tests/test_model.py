"""The Mamba fallback against a slow float64 reference; causality; step mode; the interface."""
import pytest
import torch
import torch.nn.functional as F

from model import EncoderConfig, MambaEncoder, TorchMamba, make_mamba, randomized_block, reference_mamba, selective_scan

MAMBA_PARAMETER_SHAPES = {  # mamba_ssm.Mamba(d_model=32) with its defaults
    "in_proj.weight": (128, 32), "conv1d.weight": (64, 1, 4), "conv1d.bias": (64,),
    "x_proj.weight": (2 + 32, 64), "dt_proj.weight": (64, 2), "dt_proj.bias": (64,),
    "A_log": (64, 16), "D": (64,), "out_proj.weight": (32, 64),
}


@pytest.mark.parametrize("length", [1, 3, 17, 64])
def test_forward_matches_float64_reference(length):
    block = randomized_block(seed=length)
    hidden = torch.randn(3, length, 32)
    expected = reference_mamba(block, hidden)
    actual = block(hidden).double()
    rel_err = (actual - expected).norm() / expected.norm()
    assert rel_err < 1e-4


def test_gradients_match_float64_autograd():
    block = randomized_block(seed=1)
    hidden = torch.randn(2, 20, 32)
    block(hidden).pow(2).sum().backward()
    grads = {k: v.grad.clone() for k, v in block.named_parameters()}
    ref = randomized_block(seed=1).double()
    ref(hidden.double()).pow(2).sum().backward()
    for name, param in ref.named_parameters():
        rel = (grads[name].double() - param.grad).norm() / param.grad.norm().clamp_min(1e-12)
        assert rel < 1e-4, name


@pytest.mark.parametrize("bias, conv_bias", [(False, True), (True, False), (True, True)])
def test_length_one_closed_form_equals_the_scan_with_its_gradients(bias, conv_bias):
    """The closed form (conv tap folded into in_proj) against the first position of the full scan: the
    outputs and every parameter's gradient, with and without in_proj's and the conv's biases."""
    torch.manual_seed(3)
    closed, scanned = (TorchMamba(32, bias=bias, conv_bias=conv_bias) for _ in range(2))
    with torch.no_grad():
        closed.D.add_(0.5 * torch.randn_like(closed.D))
        closed.dt_proj.bias.add_(torch.randn_like(closed.dt_proj.bias))
    scanned.load_state_dict(closed.state_dict())
    hidden = torch.randn(5, 2, 32)
    first_closed, first_scanned = closed(hidden[:, :1])[:, 0], scanned(hidden)[:, 0]
    torch.testing.assert_close(first_closed, first_scanned, rtol=1e-5, atol=1e-6)
    first_closed.pow(2).sum().backward()
    first_scanned.pow(2).sum().backward()
    for (name, p_closed), p_scanned in zip(closed.named_parameters(), scanned.parameters()):
        if name == "A_log":   # the state starts at zero: A does not reach the first position
            continue
        torch.testing.assert_close(p_closed.grad, p_scanned.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_selective_scan_gradcheck():
    torch.manual_seed(0)
    b, d, n, length = 2, 3, 4, 5
    args = (torch.randn(b, d, length), torch.randn(b, d, length), -torch.rand(d, n) - 0.5,
            torch.randn(b, n, length), torch.randn(b, n, length), torch.randn(d))
    args = tuple(a.double().requires_grad_() for a in args)
    h0 = torch.randn(b, d, n, dtype=torch.float64, requires_grad=True)

    def scan(u, delta, A, B, C, D, h0):
        y, last = selective_scan(u, delta, A, B, C, D, h0=h0)
        return y, last
    assert torch.autograd.gradcheck(scan, (*args, h0))


def test_output_is_causal():
    block = randomized_block()
    hidden = torch.randn(2, 30, 32)
    changed = hidden.clone()
    changed[:, 12] += 5.0
    before, after = block(hidden), block(changed)
    assert torch.allclose(before[:, :12], after[:, :12], atol=0, rtol=0)
    assert not torch.allclose(before[:, 12:], after[:, 12:])


def test_step_mode_equals_full_sequence():
    block = randomized_block()
    hidden = torch.randn(4, 25, 32)
    full = block(hidden)
    conv_state, ssm_state = block.allocate_inference_cache(batch_size=4, max_seqlen=25)
    stepped = []
    for t in range(25):
        out, conv_state, ssm_state = block.step(hidden[:, t:t + 1], conv_state, ssm_state)
        stepped.append(out)
    torch.testing.assert_close(torch.cat(stepped, dim=1), full, rtol=1e-4, atol=1e-5)


def test_parameter_names_and_shapes_match_mamba_ssm():
    shapes = {k: tuple(v.shape) for k, v in TorchMamba(32).state_dict().items()}
    assert shapes == MAMBA_PARAMETER_SHAPES


def test_initialisation_follows_mamba_ssm():
    block = TorchMamba(32)
    A = torch.arange(1, 17, dtype=torch.float32).repeat(64, 1)
    torch.testing.assert_close(block.A_log, torch.log(A))
    torch.testing.assert_close(block.D, torch.ones(64))
    dt = F.softplus(block.dt_proj.bias)
    assert dt.min() >= 1e-4 - 1e-7 and dt.max() <= 0.1 + 1e-6
    assert block.dt_proj.weight.abs().max() <= 2 ** -0.5


def test_factory_picks_fallback_without_cuda():
    if torch.cuda.is_available():
        pytest.skip("machine has CUDA")
    assert isinstance(make_mamba(32), TorchMamba)
    assert isinstance(make_mamba(32, backend="torch"), TorchMamba)
    with pytest.raises(RuntimeError, match="requirements-cuda"):
        make_mamba(32, backend="cuda")


def test_encoder_is_causal_and_carries_normalisation():
    torch.manual_seed(0)
    encoder = MambaEncoder(EncoderConfig(obs_dim=5, latent_dim=8, d_model=32, n_layers=2))
    encoder.set_normalization(torch.arange(5.0), torch.full((5,), 2.0))
    obs = torch.randn(2, 15, 5)
    changed = obs.clone()
    changed[:, 9] += 3.0
    z, z_changed = encoder(obs), encoder(changed)
    assert z.shape == (2, 15, 8)
    assert torch.equal(z[:, :9], z_changed[:, :9])
    restored = MambaEncoder(EncoderConfig(obs_dim=5, latent_dim=8, d_model=32, n_layers=2))
    restored.load_state_dict(encoder.state_dict())
    torch.testing.assert_close(restored.obs_std, torch.full((5,), 2.0))
    torch.testing.assert_close(restored(obs), z)


def test_goal_encodings_take_the_closed_form_with_any_backend():
    """Length-1 sequences never reach the mixer's own forward (mamba_ssm's kernels are slow on them), and
    the closed form equals the first position of a longer sequence through the full scan."""
    torch.manual_seed(0)
    encoder = MambaEncoder(EncoderConfig(obs_dim=3, latent_dim=8, d_model=32, n_layers=2))
    goals = torch.randn(6, 3)
    full_path = encoder(torch.stack([goals, torch.randn(6, 3)], dim=1))[:, 0]

    def refuse(*args, **kwargs):
        raise AssertionError("a length-1 sequence reached the mixer's forward")
    for block in encoder.blocks:
        block.mixer.forward = refuse
    torch.testing.assert_close(encoder.encode_goals(goals), full_path, rtol=1e-5, atol=1e-6)
