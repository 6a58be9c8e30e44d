"""Small shared helpers: seeding, device choice, schedules, CSV logs, curves, checkpoints, JSON."""
import argparse
import csv
import json
import math
import os
import random
import sys
import tempfile

import numpy as np
import torch

DEVICES = ("auto", "cpu", "cuda")
CHECKPOINT_FORMAT = "opso-checkpoint-v1"


class UserError(Exception):
    """A problem with the user's input: printed as one line, no traceback, exit status 2."""


def exit_on_user_error(main):
    """Run main(); a UserError becomes a one-line message on stderr and exit status 2."""
    try:
        return main()
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)


# ----------------------------------------------------------------------------- argparse types

def positive_int(text):
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def non_negative_int(text):
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {text}")
    return value


def positive_float(text):
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def non_negative_float(text):
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def unit_float(text):
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {text}")
    return value


def set_seed(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def resolve_device(name):
    if name not in DEVICES:
        raise UserError(f"--device must be one of {DEVICES}, got {name!r}")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but no CUDA device is available")
    return torch.device(name)


def linear_schedule(start, end, progress):
    """start at progress 0, end at progress >= 1, linear in between."""
    progress = min(max(progress, 0.0), 1.0)
    return start + (end - start) * progress


def num_updates_per_epoch(num_transitions, batch_size, context_length):
    """Updates so that every transition is seen about once per epoch."""
    return max(1, math.ceil(num_transitions / (batch_size * context_length)))


# ----------------------------------------------------------------------------- files

def atomic_write(path, write_fn, suffix=".tmp"):
    """write_fn(tmp_path) then rename over path, so a reader never sees a half-written file."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp_path = tempfile.mkstemp(dir=directory, prefix=os.path.basename(path) + ".", suffix=suffix)
    os.close(fd)
    try:
        write_fn(tmp_path)
        os.chmod(tmp_path, 0o644)  # mkstemp makes 0600 files
        os.replace(tmp_path, path)
    finally:
        if os.path.exists(tmp_path):
            os.remove(tmp_path)


def write_json(path, obj):
    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2, sort_keys=True, default=str)
            f.write("\n")
    atomic_write(path, write)


def read_json(path):
    with open(path) as f:
        return json.load(f)


def save_checkpoint(checkpoint, path):
    atomic_write(path, lambda tmp: torch.save(checkpoint, tmp))


def load_checkpoint(path, map_location="cpu", expected_format=CHECKPOINT_FORMAT, kind="OPSO checkpoint"):
    """Load a checkpoint without executing code (weights_only) and check that it is of the expected format."""
    if not os.path.isfile(path):
        raise UserError(f"{kind} {path} does not exist")
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # pickle, zip and torch errors all mean: not a readable checkpoint
        raise UserError(f"{path} is not a readable checkpoint ({type(error).__name__})") from None
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != expected_format:
        raise UserError(f"{path} is not an {kind}" if kind[0].lower() in "aeiou" else f"{path} is not a {kind}")
    return checkpoint


# ----------------------------------------------------------------------------- logs and curves

class CSVLogger:
    """One row per call, the whole file rewritten atomically each time (a kill never leaves half a row).

    The columns are fixed by the first row; later rows must use a subset of them.
    """

    def __init__(self, path, resume=False, keep_rows_until=None):
        """resume: continue an existing file; keep_rows_until=(column, value) drops the rows written after
        the checkpoint being resumed (a run killed between its CSV row and its checkpoint)."""
        self.path = path
        self.fieldnames, self.rows = None, []
        if resume and os.path.exists(path):
            with open(path, newline="") as f:
                reader = csv.DictReader(f)
                self.fieldnames, self.rows = reader.fieldnames, list(reader)
            if keep_rows_until is not None:
                column, last = keep_rows_until
                self.rows = [r for r in self.rows if float(r[column]) <= last]
                self._write()
        elif os.path.exists(path):
            os.remove(path)

    def log(self, row):
        if self.fieldnames is None:
            self.fieldnames = list(row)
        unknown = set(row) - set(self.fieldnames)
        if unknown:
            raise KeyError(f"columns {sorted(unknown)} are not in {self.path}")
        self.rows.append({k: _format(row.get(k, "")) for k in self.fieldnames})
        self._write()

    def _write(self):
        def write(tmp):
            with open(tmp, "w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=self.fieldnames)
                writer.writeheader()
                writer.writerows(self.rows)
        atomic_write(self.path, write)


def _format(value):
    return f"{value:.6g}" if isinstance(value, float) else value


def read_csv(path):
    """Columns of a CSV as float arrays (empty cells become NaN)."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        return {}
    return {k: np.array([_to_float(r[k]) for r in rows]) for k in rows[0]}


def _to_float(text):
    try:
        return float(text)
    except (TypeError, ValueError):
        return float("nan")


def plot_curves(csv_path, png_path, x_key, panels, title=None):
    """Draw curves from a CSV: panels is a list of (panel title, [column, ...]). Missing columns skip."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = read_csv(csv_path)
    if not columns:
        return
    n_cols = min(3, len(panels))
    n_rows = math.ceil(len(panels) / n_cols)
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(4.5 * n_cols, 3.2 * n_rows), squeeze=False)
    x = columns[x_key]
    for ax, (panel_title, keys) in zip(axes.flat, panels):
        for key in keys:
            if key in columns:
                y = columns[key]
                finite = np.isfinite(y)
                ax.plot(x[finite], y[finite], marker="o" if finite.sum() < 30 else None, ms=3, label=key)
        ax.set_title(panel_title)
        ax.set_xlabel(x_key)
        ax.grid(alpha=0.3)
        if len(keys) > 1:
            ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    atomic_write(png_path, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
    plt.close(fig)


if __name__ == "__main__":
    # Redraw curves from a metrics CSV: python utils.py plot RUN/metrics.csv OUT.png
    if len(sys.argv) == 4 and sys.argv[1] == "plot":
        cols = list(read_csv(sys.argv[2]))
        plot_curves(sys.argv[2], sys.argv[3], cols[0], [(c, [c]) for c in cols[1:]])
    else:
        print("usage: python utils.py plot METRICS.csv OUT.png", file=sys.stderr)
        sys.exit(2)
