"""CUDA checks for a machine with a GPU, then GPU timings.

Checks, for the PyTorch Mamba (`TorchMamba`) and, where mamba-ssm is installed, `mamba_ssm.Mamba` given the same
state dict: the forward against the float64 reference of tests/test_model.py, gradients against float64
autograd, step mode against the full sequence, causality; and an encoder built on `mamba_ssm` loaded into the
PyTorch one on the CPU (a checkpoint trained on a GPU, evaluated on a laptop). Timings: the Mamba block's
forward + backward, and the full OPSO update and critic step, with each backend.

    python benchmarks/check_cuda.py [--device cuda] [--repeats 20] [--batch_sizes 16 64 256]

Exits with status 1 if a check fails. `--device cpu` runs the PyTorch half only (a smoke test of the script).
"""
import argparse
import sys

import torch

from common import machine_line, median_seconds
from bench_update import synthetic_maze_data, update_timings
from model import EncoderConfig, MambaEncoder, cuda_mamba_available, randomized_block, reference_mamba
from offline_agent import AgentConfig, OfflineAgent
from ogbench_utils import WindowSampler

TOLERANCE = 1e-4   # relative error, as in the CPU tests


def relative_error(actual, expected):
    actual, expected = actual.detach().double().cpu(), expected.detach().double().cpu()
    return float((actual - expected).norm() / expected.norm().clamp_min(1e-12))


class Report:
    def __init__(self):
        self.failures = 0

    def check(self, name, value, limit):
        ok = value <= limit
        self.failures += not ok
        print(f"  {'ok  ' if ok else 'FAIL'} {name}: {value:.2e} (limit {limit:.0e})", flush=True)


def mamba_builders(device):
    """backend name -> a function turning a CPU `TorchMamba` into that backend's block, same parameters."""
    builders = {"torch": lambda block: block.to(device)}
    if device.type == "cuda" and cuda_mamba_available():
        from mamba_ssm import Mamba

        def as_mamba_ssm(block):
            twin = Mamba(block.d_model, d_state=block.d_state, d_conv=block.d_conv, expand=block.expand)
            twin.load_state_dict(block.state_dict())
            return twin.to(device)
        builders["mamba_ssm"] = as_mamba_ssm
    return builders


def check_block(build, device, report):
    for length in (1, 17, 64, 100):
        block = randomized_block(seed=length)
        hidden = torch.randn(3, length, 32)
        expected = reference_mamba(block, hidden)
        with torch.no_grad():
            actual = build(block)(hidden.to(device))
        report.check(f"forward vs float64 reference, length {length}", relative_error(actual, expected), TOLERANCE)

    hidden = torch.randn(2, 40, 32)
    reference = randomized_block(seed=1).double()
    reference(hidden.double().requires_grad_()).pow(2).sum().backward()
    block = build(randomized_block(seed=1))
    block(hidden.to(device)).pow(2).sum().backward()
    worst = max(relative_error(p.grad, dict(reference.named_parameters())[name].grad)
                for name, p in block.named_parameters())
    report.check("gradients vs float64 autograd, worst parameter", worst, TOLERANCE)

    block = build(randomized_block(seed=2))
    hidden = torch.randn(4, 25, 32, device=device)
    with torch.no_grad():
        full = block(hidden)
        conv_state, ssm_state = block.allocate_inference_cache(batch_size=4, max_seqlen=25)
        stepped = [block.step(hidden[:, t:t + 1], conv_state, ssm_state)[0] for t in range(25)]
    report.check("step mode vs full sequence", relative_error(torch.cat(stepped, dim=1), full), TOLERANCE)

    changed = hidden.clone()
    changed[:, 12] += 5.0
    with torch.no_grad():
        leak = (block(changed)[:, :12] - full[:, :12]).abs().max().item()
    report.check("causality: change of outputs before a changed input (max abs)", leak, 0.0)


def check_encoder_portability(device, report):
    """An encoder on mamba_ssm, its state dict loaded into the PyTorch encoder on the CPU: same latents."""
    config = EncoderConfig(obs_dim=2)
    torch.manual_seed(0)
    gpu = MambaEncoder(config, backend="cuda").to(device)
    cpu = MambaEncoder(config, backend="torch")
    cpu.load_state_dict(gpu.state_dict())
    windows = torch.randn(8, 100, 2) * 3
    with torch.no_grad():
        report.check("encoder windows, mamba_ssm on GPU vs PyTorch on CPU",
                     relative_error(gpu(windows.to(device)), cpu(windows)), TOLERANCE)
        report.check("goal encodings (length 1), same", relative_error(
            gpu.encode_goals(windows[:, 0].to(device)), cpu.encode_goals(windows[:, 0])), TOLERANCE)
        cache = gpu.allocate_inference_cache(8)
        last = [gpu.step(windows[:, t].to(device), cache) for t in range(100)][-1]
        report.check("encoder step mode on mamba_ssm vs PyTorch full window on CPU",
                     relative_error(last, cpu(windows)[:, -1]), TOLERANCE)


def synced_median_ms(fn, repeats, device):
    def run():
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
    return 1000 * median_seconds(run, repeats, warmup=3)


def time_block(builders, device, repeats):
    print("Mamba block forward + backward, batch 16, length 100, d_model 128 (median ms):")
    hidden = torch.randn(16, 100, 128, device=device, requires_grad=True)
    for name, build in builders.items():
        torch.manual_seed(0)
        block = build(randomized_block(d_model=128))

        def forward_backward():
            block(hidden).square().mean().backward()
        with torch.no_grad():
            forward = synced_median_ms(lambda: block(hidden), repeats, device)
        print(f"  {name:9s} fwd+bwd {synced_median_ms(forward_backward, repeats, device):7.2f}   fwd {forward:7.2f}")


def time_update(builders, device, repeats, batch_sizes):
    print("OPSO window update (encoder, all heads, every loss but the value's, Adam), a value step and a training "
          "step (the update and the defaults' critic and value steps), windows of 100 steps (median ms):")
    data = synthetic_maze_data()
    for name in builders:
        for batch_size in batch_sizes:
            torch.manual_seed(0)
            agent = OfflineAgent(AgentConfig(obs_dim=2, action_dim=2, mamba_backend="cuda" if name == "mamba_ssm"
                                             else "torch"), device=device)
            agent.set_normalization(data.observations)
            c = agent.config
            sampler = WindowSampler(data, **c.sampler_settings())
            update, value, step = update_timings(agent, sampler, batch_size, repeats,
                                                 lambda fn, r: synced_median_ms(fn, r, device), device)
            transitions = batch_size * agent.context_length
            print(f"  {name:9s} batch {batch_size:4d} windows: update {update:7.1f} "
                  f"({transitions / update * 1000:,.0f} transitions/s), value step {value:6.1f} "
                  f"({c.value_batch_size} transitions), training step {step:7.1f}", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", help="cuda (the point) or cpu (a smoke test)")
    parser.add_argument("--repeats", type=int, default=20, help="timed calls (median reported)")
    parser.add_argument("--batch_sizes", type=int, nargs="+", default=[16, 64, 256], help="windows per update")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("no CUDA device: run this on a machine with a GPU (or --device cpu for a smoke test)")
    print(machine_line())
    if device.type == "cuda":
        print(f"gpu: {torch.cuda.get_device_name()}, cuda {torch.version.cuda}")
    builders = mamba_builders(device)
    print(f"backends: {', '.join(builders)}"
          + ("" if "mamba_ssm" in builders else " (mamba_ssm not installed or no GPU: its checks are skipped)"))
    report = Report()
    for name, build in builders.items():
        print(f"{name} on {device}:")
        check_block(build, device, report)
    if "mamba_ssm" in builders:
        check_encoder_portability(device, report)
    time_block(builders, device, args.repeats)
    time_update(builders, device, args.repeats, args.batch_sizes)
    print(f"{report.failures} check(s) failed" if report.failures else "all checks passed")
    sys.exit(1 if report.failures else 0)


if __name__ == "__main__":
    main()
