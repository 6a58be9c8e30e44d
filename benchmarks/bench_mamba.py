"""Mamba block forward+backward and forward-only on CPU: TorchMamba vs a plain per-step autograd loop
(and mambapy's parallel scan when it is installed). Medians of several runs after warm-up.

    python benchmarks/bench_mamba.py [--batch 16 --length 100 --d_model 128 --repeats 20 --threads 2]
"""
import argparse

import torch
import torch.nn.functional as F

from common import machine_line, median_seconds
from model import TorchMamba, ssm_inputs


class LoopMamba(TorchMamba):
    """The same math with the scan as a plain per-time-step autograd loop: the naive baseline."""

    def forward(self, hidden_states, inference_params=None):
        length = hidden_states.shape[1]
        x, z = self.in_proj(hidden_states).chunk(2, dim=-1)
        x = F.silu(self.conv1d(x.transpose(1, 2))[..., :length]).transpose(1, 2)
        dt, B, C = ssm_inputs(self, x)
        dt = F.softplus(dt + self.dt_proj.bias)
        A = -torch.exp(self.A_log)
        h = torch.zeros(x.shape[0], self.d_inner, self.d_state)
        ys = []
        for t in range(length):
            h = torch.exp(dt[:, t, :, None] * A) * h + (dt[:, t] * x[:, t])[..., None] * B[:, t, None, :]
            ys.append((h * C[:, t, None, :]).sum(-1))
        y = (torch.stack(ys, dim=1) + self.D * x) * F.silu(z)
        return self.out_proj(y)


def time_it(fn, repeats):
    return 1000 * median_seconds(fn, repeats, warmup=3)


def make_mambapy(d_model, d_state, expand):
    try:
        from mambapy.mamba import MambaBlock, MambaConfig
    except ImportError:
        return None
    return MambaBlock(MambaConfig(d_model=d_model, n_layers=1, d_state=d_state, expand_factor=expand, pscan=True))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=16, help="sequences per batch")
    parser.add_argument("--length", type=int, default=100, help="sequence length")
    parser.add_argument("--d_model", type=int, default=128, help="model width")
    parser.add_argument("--d_state", type=int, default=16, help="SSM state size")
    parser.add_argument("--repeats", type=int, default=20, help="timed runs per variant (median reported)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch.set_num_threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(machine_line())
    print(f"shape: batch {args.batch}, length {args.length}, d_model {args.d_model}, d_state {args.d_state}")
    fast = TorchMamba(args.d_model, d_state=args.d_state)
    loop = LoopMamba(args.d_model, d_state=args.d_state)
    loop.load_state_dict(fast.state_dict())
    variants = {"TorchMamba": fast, "plain loop": loop}
    pymamba = make_mambapy(args.d_model, args.d_state, 2)
    if pymamba is not None:
        variants["mambapy (pscan)"] = pymamba
    x = torch.randn(args.batch, args.length, args.d_model)

    def fwd_bwd(block):
        def run():
            block.zero_grad(set_to_none=True)
            block(x).square().mean().backward()
        return run

    def fwd(block):
        def run():
            with torch.no_grad():
                block(x)
        return run

    results = {name: (time_it(fwd_bwd(b), args.repeats), time_it(fwd(b), args.repeats)) for name, b in variants.items()}
    base_fb, base_f = results["TorchMamba"]
    print(f"{'variant':<18}{'fwd+bwd ms':>12}{'x TorchMamba':>14}{'fwd ms':>10}{'x TorchMamba':>14}")
    for name, (fb, f) in results.items():
        print(f"{name:<18}{fb:>12.1f}{fb / base_fb:>14.2f}{f:>10.1f}{f / base_f:>14.2f}")


if __name__ == "__main__":
    main()
