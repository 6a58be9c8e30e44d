"""Networks of OPSO: the Mamba mixer, the observation-history encoder and the MLP heads.

Mamba follows Gu & Dao (2023) and mirrors `mamba_ssm.Mamba` (v2) exactly: the same constructor,
parameter names, shapes and initialisation, so a state dict moves between the CUDA kernel and the
pure-PyTorch `TorchMamba` unchanged. The heads follow SPEC.md: Q(z, z', z_g) (Edwards et al.,
2020), V(z, z_g) (IQL, Kostrikov et al., 2021), inverse dynamics, state and reward predictors and
a latent subgoal proposer (HIQL, Park et al., 2023).
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

MAMBA_BACKENDS = ("auto", "torch", "cuda")


# ----------------------------------------------------------------------------- selective scan

SCAN_CHUNK = 8  # time steps processed together: their (chunk, b, d, n) tensors stay in cache


class _SelectiveScan(torch.autograd.Function):
    """h_t = exp(delta_t A) h_{t-1} + delta_t u_t B_t,  y_t = C_t . h_t, with a hand-written backward.

    Autograd through a per-step loop records a dozen nodes per step; a fully vectorised scan streams
    several (L, batch, d_inner, d_state) tensors through memory. Here time is cut into chunks of
    SCAN_CHUNK steps: everything that is not sequential is vectorised over a chunk (small enough to
    stay in cache), and only the recurrence itself is one fused multiply-add per step. The backward
    runs the reverse-time recurrence of the gradient the same way and recomputes the decays.
    Inputs are time-major: u, delta (L, b, d); A (d, n); B, C (L, b, n); h0 (b, d, n).
    """

    @staticmethod
    def forward(ctx, u, delta, A, B, C, h0):
        states = torch.empty(u.shape[0], *h0.shape, dtype=u.dtype, device=u.device)
        y = torch.empty_like(u)
        h = h0
        for lo, hi in _chunks(u.shape[0]):
            decay, drive = _decay_and_drive(u[lo:hi], delta[lo:hi], A, B[lo:hi])
            for t in range(hi - lo):
                h = torch.addcmul(drive[t], decay[t], h, out=states[lo + t])
            y[lo:hi] = (states[lo:hi] * C[lo:hi].unsqueeze(2)).sum(-1)
        ctx.save_for_backward(u, delta, A, B, C, h0, states)
        return y, states[-1]

    @staticmethod
    def backward(ctx, grad_y, grad_last):
        u, delta, A, B, C, h0, states = ctx.saved_tensors
        grad_u, grad_delta = torch.empty_like(u), torch.empty_like(delta)
        grad_B, grad_C = torch.empty_like(B), torch.empty_like(C)
        grad_A = torch.zeros_like(A)
        # dL/dh_{lo-1} contributed through h_lo, carried from one chunk to the one before it
        grad_carry = torch.zeros_like(h0) if grad_last is None else grad_last
        for lo, hi in reversed(_chunks(u.shape[0])):
            u_c, delta_c, B_c = u[lo:hi], delta[lo:hi], B[lo:hi]
            decay, _ = _decay_and_drive(u_c, delta_c, A, B_c)
            grad_h = grad_y[lo:hi].unsqueeze(-1) * C[lo:hi].unsqueeze(2)    # direct part of dL/dh_t
            grad_h[-1] += grad_carry
            for t in range(hi - lo - 2, -1, -1):
                grad_h[t].addcmul_(decay[t + 1], grad_h[t + 1])              # full dL/dh_t
            grad_carry = grad_h[0] * decay[0]
            h_prev = states[lo - 1:hi - 1] if lo > 0 else torch.cat([h0.unsqueeze(0), states[:hi - 1]])
            grad_C[lo:hi] = (states[lo:hi] * grad_y[lo:hi].unsqueeze(-1)).sum(2)
            grad_log_decay = grad_h * h_prev * decay                          # d/d(delta_t A)
            grad_A += (grad_log_decay * delta_c.unsqueeze(-1)).sum((0, 1))
            grad_drive_scale = (grad_h * B_c.unsqueeze(2)).sum(-1)
            grad_B[lo:hi] = (grad_h * (delta_c * u_c).unsqueeze(-1)).sum(2)
            grad_u[lo:hi] = grad_drive_scale * delta_c
            grad_delta[lo:hi] = grad_drive_scale * u_c + (grad_log_decay * A).sum(-1)
        return grad_u, grad_delta, grad_A, grad_B, grad_C, grad_carry


def _chunks(length):
    return [(lo, min(lo + SCAN_CHUNK, length)) for lo in range(0, length, SCAN_CHUNK)]


def _decay_and_drive(u, delta, A, B):
    """exp(delta A) and delta u B for a chunk of time steps, each (t, b, d, n)."""
    decay = torch.exp(delta.unsqueeze(-1) * A)
    drive = (delta * u).unsqueeze(-1) * B.unsqueeze(2)
    return decay, drive


def selective_scan(u, delta, A, B, C, D, z=None, delta_bias=None, delta_softplus=True, h0=None):
    """The selective scan of mamba_ssm (`selective_scan_fn`) in PyTorch, same layouts.

    u, delta, z: (batch, d_inner, L); A: (d_inner, d_state); B, C: (batch, d_state, L); D: (d_inner,).
    Returns y (batch, d_inner, L) and the last state (batch, d_inner, d_state).
    """
    if delta_bias is not None:
        delta = delta + delta_bias[:, None]
    if delta_softplus:
        delta = F.softplus(delta)
    if h0 is None:
        h0 = u.new_zeros(u.shape[0], u.shape[1], A.shape[1])
    time_major = [t.permute(2, 0, 1).contiguous() for t in (u, delta, B, C)]
    y, last_state = _SelectiveScan.apply(*time_major[:2], A, *time_major[2:], h0)
    y = y.permute(1, 2, 0) + u * D[:, None]
    if z is not None:
        y = y * F.silu(z)
    return y, last_state


def causal_depthwise_conv(x, weight, bias=None):
    """Conv1d(groups=channels, padding=K-1)[..., :L] as K shifted multiply-adds.

    Same numbers as the nn.Conv1d of mamba_ssm; on CPU, PyTorch's depthwise-conv backward is
    several times slower than these few elementwise ops. x (b, d, L); weight (d, 1, K).
    """
    kernel, length = weight.shape[-1], x.shape[-1]
    padded = F.pad(x, (kernel - 1, 0))
    out = padded[..., kernel - 1:] * weight[:, 0, kernel - 1, None]
    for j in range(kernel - 1):
        out = out + padded[..., j:j + length] * weight[:, 0, j, None]
    return out if bias is None else out + bias[:, None]


def ssm_inputs(mixer, x):
    """x (..., d_inner) -> dt (..., d_inner) before bias/softplus, B and C (..., d_state)."""
    x_dbl = mixer.x_proj(x)
    dt, B, C = torch.split(x_dbl, [mixer.dt_rank, mixer.d_state, mixer.d_state], dim=-1)
    return F.linear(dt, mixer.dt_proj.weight), B, C


def forward_from_zero_state(mixer, hidden_states):
    """A Mamba mixer (`TorchMamba` or `mamba_ssm.Mamba`: same parameters) on length-1 sequences from a zero
    state, as plain (batch, features) math: the conv sees only its last tap and the state is delta x B, so
    y = x (delta (B . C) + D). Goal encodings are thousands of such sequences per batch; through mamba_ssm's
    kernels a 256-window update took 20x longer on a GPU (BENCHMARKS.md, section 6). The conv's tap and bias
    are folded into in_proj's x rows, which spares passes over (batch, d_inner) (section 2)."""
    h = hidden_states[:, 0]
    x_bias, z_bias = (None, None) if mixer.in_proj.bias is None else mixer.in_proj.bias.chunk(2)
    x_weight, z_weight = mixer.in_proj.weight.chunk(2)
    tap, conv_bias = mixer.conv1d.weight[:, 0, -1], mixer.conv1d.bias
    if x_bias is not None:
        conv_bias = x_bias * tap if conv_bias is None else x_bias * tap + conv_bias
    x = F.silu(F.linear(h, x_weight * tap[:, None], conv_bias))
    dt, B, C = ssm_inputs(mixer, x)
    dt = F.softplus(dt + mixer.dt_proj.bias)
    y = x * torch.addcmul(mixer.D, dt, (B * C).sum(-1, keepdim=True))
    return mixer.out_proj(y * F.silu(F.linear(h, z_weight, z_bias))).unsqueeze(1)


# ----------------------------------------------------------------------------- Mamba mixer

class TorchMamba(nn.Module):
    """Pure-PyTorch twin of `mamba_ssm.Mamba`: same arguments, parameters, init and math."""

    def __init__(self, d_model, d_state=16, d_conv=4, expand=2, dt_rank="auto", dt_min=0.001,
                 dt_max=0.1, dt_init="random", dt_scale=1.0, dt_init_floor=1e-4, conv_bias=True,
                 bias=False, use_fast_path=True, layer_idx=None, device=None, dtype=None):
        factory = {"device": device, "dtype": dtype}
        super().__init__()
        self.d_model, self.d_state, self.d_conv, self.expand = d_model, d_state, d_conv, expand
        self.d_inner = int(expand * d_model)
        self.dt_rank = math.ceil(d_model / 16) if dt_rank == "auto" else dt_rank
        self.layer_idx = layer_idx
        self.in_proj = nn.Linear(d_model, 2 * self.d_inner, bias=bias, **factory)
        self.conv1d = nn.Conv1d(self.d_inner, self.d_inner, kernel_size=d_conv, groups=self.d_inner,
                                padding=d_conv - 1, bias=conv_bias, **factory)
        self.x_proj = nn.Linear(self.d_inner, self.dt_rank + 2 * d_state, bias=False, **factory)
        self.dt_proj = nn.Linear(self.dt_rank, self.d_inner, bias=True, **factory)
        self._init_dt_proj(dt_init, dt_scale, dt_min, dt_max, dt_init_floor)
        A = torch.arange(1, d_state + 1, dtype=torch.float32, device=device).repeat(self.d_inner, 1)
        self.A_log = nn.Parameter(torch.log(A))
        self.A_log._no_weight_decay = True
        self.D = nn.Parameter(torch.ones(self.d_inner, device=device))
        self.D._no_weight_decay = True
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=bias, **factory)

    def _init_dt_proj(self, dt_init, dt_scale, dt_min, dt_max, dt_init_floor):
        dt_init_std = self.dt_rank ** -0.5 * dt_scale
        if dt_init == "constant":
            nn.init.constant_(self.dt_proj.weight, dt_init_std)
        elif dt_init == "random":
            nn.init.uniform_(self.dt_proj.weight, -dt_init_std, dt_init_std)
        else:
            raise NotImplementedError(f"dt_init must be 'constant' or 'random', got {dt_init!r}")
        # softplus(bias) is then log-uniform in [dt_min, dt_max], as in mamba_ssm.
        dt = torch.exp(torch.rand(self.d_inner) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        dt = dt.clamp(min=dt_init_floor)
        inv_dt = dt + torch.log(-torch.expm1(-dt))
        with torch.no_grad():
            self.dt_proj.bias.copy_(inv_dt)
        self.dt_proj.bias._no_reinit = True

    def forward(self, hidden_states, inference_params=None):
        """(batch, L, d_model) -> (batch, L, d_model), causal."""
        if hidden_states.shape[1] == 1:
            return forward_from_zero_state(self, hidden_states)
        xz = self.in_proj(hidden_states).transpose(1, 2)          # (b, 2*d_inner, L)
        x, z = xz.chunk(2, dim=1)
        x = F.silu(causal_depthwise_conv(x, self.conv1d.weight, self.conv1d.bias))
        dt, B, C = ssm_inputs(self, x.transpose(1, 2))
        A = -torch.exp(self.A_log.float())
        y, _ = selective_scan(x, dt.transpose(1, 2), A, B.transpose(1, 2), C.transpose(1, 2), self.D.float(),
                              z=z, delta_bias=self.dt_proj.bias.float(), delta_softplus=True)
        return self.out_proj(y.transpose(1, 2))

    def allocate_inference_cache(self, batch_size, max_seqlen, dtype=None, **kwargs):
        device = self.out_proj.weight.device
        conv_dtype = self.conv1d.weight.dtype if dtype is None else dtype
        ssm_dtype = self.dt_proj.weight.dtype if dtype is None else dtype
        conv_state = torch.zeros(batch_size, self.d_inner, self.d_conv, device=device, dtype=conv_dtype)
        ssm_state = torch.zeros(batch_size, self.d_inner, self.d_state, device=device, dtype=ssm_dtype)
        return conv_state, ssm_state

    def step(self, hidden_states, conv_state, ssm_state):
        """One time step, (batch, 1, d_model); updates the states in place like mamba_ssm."""
        xz = self.in_proj(hidden_states.squeeze(1))
        x, z = xz.chunk(2, dim=-1)
        conv_state.copy_(torch.roll(conv_state, shifts=-1, dims=-1))
        conv_state[:, :, -1] = x
        x = torch.sum(conv_state * self.conv1d.weight.squeeze(1), dim=-1)
        if self.conv1d.bias is not None:
            x = x + self.conv1d.bias
        x = F.silu(x)
        dt, B, C = ssm_inputs(self, x)
        dt = F.softplus(dt + self.dt_proj.bias)
        A = -torch.exp(self.A_log.float())
        decay = torch.exp(dt.unsqueeze(-1) * A)
        ssm_state.copy_(ssm_state * decay + (dt * x).unsqueeze(-1) * B.unsqueeze(1))
        y = torch.einsum("bdn,bn->bd", ssm_state, C) + self.D * x
        y = y * F.silu(z)
        return self.out_proj(y).unsqueeze(1), conv_state, ssm_state


def reference_mamba(block, hidden):
    """Mamba's forward written time step by time step in float64: the specification that the tests and
    benchmarks/check_cuda.py hold both backends to (slow; never used for training)."""
    p = {k: v.detach().double() for k, v in block.state_dict().items()}
    hidden = hidden.double()
    batch, length, _ = hidden.shape
    d_inner, d_state, d_conv = block.d_inner, block.d_state, block.d_conv
    xz = hidden @ p["in_proj.weight"].T
    x, z = xz[..., :d_inner], xz[..., d_inner:]
    weight = p["conv1d.weight"][:, 0, :]
    A = -torch.exp(p["A_log"])
    h = torch.zeros(batch, d_inner, d_state, dtype=torch.float64)
    outputs = []
    for t in range(length):
        conv = p["conv1d.bias"].clone().expand(batch, d_inner).clone()
        for j in range(d_conv):
            src = t - (d_conv - 1) + j
            if src >= 0:
                conv = conv + weight[:, j] * x[:, src]
        xc = F.silu(conv)
        x_dbl = xc @ p["x_proj.weight"].T
        dt_low, B, C = x_dbl.split([block.dt_rank, d_state, d_state], dim=-1)
        dt = F.softplus(dt_low @ p["dt_proj.weight"].T + p["dt_proj.bias"])
        h = torch.exp(dt[..., None] * A) * h + (dt * xc)[..., None] * B[:, None, :]
        y = (h * C[:, None, :]).sum(-1) + p["D"] * xc
        y = y * F.silu(z[:, t])
        outputs.append(y @ p["out_proj.weight"].T)
    return torch.stack(outputs, dim=1)


def randomized_block(d_model=32, seed=0):
    """A TorchMamba moved away from its initialisation, so that a check exercises every path."""
    torch.manual_seed(seed)
    block = TorchMamba(d_model)
    with torch.no_grad():  # move away from the init so every path is exercised
        block.A_log.add_(0.3 * torch.randn_like(block.A_log))
        block.D.add_(0.5 * torch.randn_like(block.D))
        block.dt_proj.bias.add_(torch.randn_like(block.dt_proj.bias))
    return block


def cuda_mamba_available():
    if not torch.cuda.is_available():
        return False
    try:
        import mamba_ssm  # noqa: F401
    except ImportError:
        return False
    return True


def make_mamba(d_model, backend="auto", **kwargs):
    """`mamba_ssm.Mamba` when CUDA and mamba-ssm are there (or backend='cuda'), else `TorchMamba`."""
    if backend not in MAMBA_BACKENDS:
        raise ValueError(f"mamba backend must be one of {MAMBA_BACKENDS}, got {backend!r}")
    if backend == "cuda" or (backend == "auto" and cuda_mamba_available()):
        if not cuda_mamba_available():
            raise RuntimeError("backend='cuda' needs a CUDA device and `pip install -r requirements-cuda.txt`")
        from mamba_ssm import Mamba
        return Mamba(d_model, **kwargs)
    return TorchMamba(d_model, **kwargs)


# ----------------------------------------------------------------------------- encoder

@dataclass
class EncoderConfig:
    obs_dim: int
    latent_dim: int = 64
    d_model: int = 128
    n_layers: int = 2
    d_state: int = 16
    d_conv: int = 4
    expand: int = 2


class MambaBlock(nn.Module):
    """Pre-norm residual block: x + Mamba(RMSNorm(x))."""

    def __init__(self, config, backend):
        super().__init__()
        self.norm = nn.RMSNorm(config.d_model)
        self.mixer = make_mamba(config.d_model, backend=backend, d_state=config.d_state,
                                d_conv=config.d_conv, expand=config.expand)

    def forward(self, x):
        if x.shape[1] == 1:   # whichever backend: mamba_ssm's kernels are slow on many length-1 sequences
            return x + forward_from_zero_state(self.mixer, self.norm(x))
        return x + self.mixer(self.norm(x))


class MambaEncoder(nn.Module):
    """Observations (B, L, obs_dim) -> latents (B, L, latent_dim); position t sees only o_{<=t}."""

    def __init__(self, config: EncoderConfig, backend="auto"):
        super().__init__()
        self.config = config
        self.register_buffer("obs_mean", torch.zeros(config.obs_dim))
        self.register_buffer("obs_std", torch.ones(config.obs_dim))
        self.embed = nn.Linear(config.obs_dim, config.d_model)
        self.blocks = nn.ModuleList(MambaBlock(config, backend) for _ in range(config.n_layers))
        self.final_norm = nn.RMSNorm(config.d_model)
        self.to_latent = nn.Linear(config.d_model, config.latent_dim)

    def set_normalization(self, mean, std, min_std=1e-3):
        self.obs_mean.copy_(torch.as_tensor(mean, dtype=torch.float32))
        self.obs_std.copy_(torch.as_tensor(std, dtype=torch.float32).clamp(min=min_std))

    def normalize(self, observations):
        return (observations - self.obs_mean) / self.obs_std

    def forward(self, observations):
        x = self.embed(self.normalize(observations))
        for block in self.blocks:
            x = block(x)
        return self.to_latent(self.final_norm(x))

    def allocate_inference_cache(self, batch_size):
        """Per block (conv_state, ssm_state), for `step`."""
        return [block.mixer.allocate_inference_cache(batch_size, max_seqlen=1) for block in self.blocks]

    def step(self, observations, cache):
        """One observation per sequence, (B, obs_dim) -> (B, latent_dim); equals forward's last position."""
        x = self.embed(self.normalize(observations)).unsqueeze(1)
        for block, (conv_state, ssm_state) in zip(self.blocks, cache):
            x = x + block.mixer.step(block.norm(x), conv_state, ssm_state)[0]
        return self.to_latent(self.final_norm(x)).squeeze(1)

    def encode_goals(self, goals):
        """Goals (..., obs_dim) as length-1 sequences: z_g = E([g]), shape (..., latent_dim)."""
        flat = goals.reshape(-1, 1, goals.shape[-1])
        return self.forward(flat).reshape(*goals.shape[:-1], self.config.latent_dim)


# ----------------------------------------------------------------------------- heads

def mlp(in_dim, hidden_dim, out_dim, n_hidden=2):
    """Linear -> LayerNorm -> GELU, n_hidden times, then a linear output (OGBench's value MLPs)."""
    layers, width = [], in_dim
    for _ in range(n_hidden):
        layers += [nn.Linear(width, hidden_dim), nn.LayerNorm(hidden_dim), nn.GELU()]
        width = hidden_dim
    layers.append(nn.Linear(width, out_dim))
    return nn.Sequential(*layers)


class ConcatMLP(nn.Module):
    """An MLP over the concatenation of its inputs; a trailing singleton output is squeezed."""

    def __init__(self, in_dim, hidden_dim, out_dim):
        super().__init__()
        self.net = mlp(in_dim, hidden_dim, out_dim)
        self.squeeze = out_dim == 1

    def forward(self, *inputs):
        out = self.net(torch.cat(inputs, dim=-1))
        return out.squeeze(-1) if self.squeeze else out


@dataclass
class HeadsConfig:
    latent_dim: int
    obs_dim: int
    action_dim: int
    hidden_dim: int = 256


class OPSOHeads(nn.Module):
    """All heads of SPEC.md. The EMA target critics live in the agent, not here."""

    def __init__(self, config: HeadsConfig):
        super().__init__()
        self.config = config
        z, h = config.latent_dim, config.hidden_dim
        self.q1 = ConcatMLP(3 * z, h, 1)                       # Q(z, z', z_g)
        self.q2 = ConcatMLP(3 * z, h, 1)
        self.value = ConcatMLP(2 * z, h, 1)                    # V(z, z_g)
        self.inverse = ConcatMLP(3 * z, h, config.action_dim)  # I(z, z', z_g) -> a (pre-tanh)
        self.state = ConcatMLP(z + config.action_dim, h, config.obs_dim)  # (z_t, a_t) -> o_{t+1} - o_t
        self.reward = ConcatMLP(3 * z, h, 2)                   # (z, z', z_g) -> (r, done logit)
        self.proposer = ConcatMLP(2 * z, h, z)                 # P(z, z_g) -> z'

    def q_values(self, z, z_next, z_goal):
        return self.q1(z, z_next, z_goal), self.q2(z, z_next, z_goal)

    def action(self, z, z_next, z_goal):
        return torch.tanh(self.inverse(z, z_next, z_goal))

