"""Small shared helpers: config flags, run plumbing (threads, device, run folders, finite checks), seeding,
schedules, CSV logs, curves, checkpoints, JSON."""
import argparse
import csv
import dataclasses
import glob
import json
import math
import os
import random
import signal
import sys
import tempfile
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

DEVICES = ("auto", "cpu", "cuda")
CHECKPOINT_FORMAT = "opso-checkpoint-v2"   # v2: the retired variants' fields are gone (issue 26)
CHECKPOINT_FORMAT_PREFIX = "opso-checkpoint-"
DEFAULT_DATASET_DIR = "datasets"
LAST_SAVED = {"path": None}   # the checkpoint this process wrote last, for the message on Ctrl-C
CTRL_C = {"pressed": False}


class UserError(Exception):
    """A problem with the user's input: printed as one line, no traceback, exit status 2."""


def _on_ctrl_c(signum, frame):
    CTRL_C["pressed"] = True
    raise KeyboardInterrupt


def exit_on_user_error(main):
    """Run main(); a UserError becomes a one-line message on stderr and exit status 2, Ctrl-C one naming the last
    checkpoint and exit status 130."""
    CTRL_C["pressed"] = False
    signal.signal(signal.SIGINT, _on_ctrl_c)
    try:
        return main()
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    except Exception:
        if not CTRL_C["pressed"]:
            raise
        exit_interrupted()   # a library turned the KeyboardInterrupt into its own error (an interrupted import)
    except KeyboardInterrupt:
        exit_interrupted()


def exit_interrupted():
    last = LAST_SAVED["path"]
    print("interrupted; " + (f"the last checkpoint is {last}" if last else "no checkpoint was written"),
          file=sys.stderr)
    sys.exit(130)


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
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value


def non_negative_float(text):
    value = float(text)
    if not (value >= 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return value


def discount_float(text):
    value = float(text)
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1) (returns are sums of -1 rewards), got {text}")
    return value


def context_int(text):
    value = int(text)
    if value < 2:
        raise argparse.ArgumentTypeError(f"must be at least 2 (a window needs a step and a successor), got {text}")
    return value


def unit_float(text):
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {text}")
    return value


# ----------------------------------------------------------------------------- config flags, written once

def flag(default, help, type=None, choices=None, action=None, group=None):
    """A config field that is also a command-line flag: its default, help text and argparse type live here."""
    return dataclasses.field(default=default, metadata=dict(help=help, type=type, choices=choices, action=action,
                                                            group=group))


def add_flags(parser, config_cls, group=None, overrides=False):
    """One --name per field of config_cls that has a help text (only those of `group`, if given).

    overrides: every default is None, for flags that override a saved config only where given."""
    for field in dataclasses.fields(config_cls):
        meta = field.metadata
        if "help" not in meta or (group is not None and meta["group"] != group):
            continue
        if meta["action"] == "store_true":
            parser.add_argument(f"--{field.name}", action="store_true", help=meta["help"])
            continue
        kind = meta["type"] or type(field.default)
        parser.add_argument(f"--{field.name}", type=kind, choices=meta["choices"],
                            default=None if overrides else field.default,
                            help=meta["help"] + (" (default: the checkpoint's)" if overrides else ""))


def config_from_args(config_cls, args, **values):
    """config_cls from the parsed flags (fields not given as flags come from `values` or their defaults)."""
    names = {field.name for field in dataclasses.fields(config_cls)}
    given = {k: v for k, v in vars(args).items() if k in names and k not in values}
    return config_cls(**given, **values)


def field_names(config_cls, group=None):
    return [f.name for f in dataclasses.fields(config_cls)
            if "help" in f.metadata and (group is None or f.metadata["group"] == group)]


# ----------------------------------------------------------------------------- run plumbing

@dataclass
class RunConfig:
    """The flags of a training run, offline or online (each trainer extends them)."""
    dataset: str = flag("pointmaze-medium-navigate-v0", "OGBench dataset name (an unknown name lists the supported ones)")
    dataset_dir: str = flag(DEFAULT_DATASET_DIR, "folder of the dataset files (generated ones: datasets/generated)")
    max_trajectories: Optional[int] = flag(None, "keep the first N trajectories (default: all)", type=positive_int)
    batch_size: int = flag(16, "windows per update", type=positive_int)
    eval_episodes: int = flag(20, "evaluation episodes per task (5 tasks)", type=positive_int)
    seed: int = flag(0, "random seed", type=non_negative_int)
    device: str = flag("auto", "torch device", choices=list(DEVICES))
    threads: int = flag(0, "torch.set_num_threads (0: leave the default; runs side by side: 1 each)",
                       type=non_negative_int)
    max_episode_steps: Optional[int] = flag(None, "episode limit for evaluation and online episodes (default: the "
                                                  "environment's, 1000 for the mazes; shorter only for quick runs)",
                                            type=positive_int)
    save_dir: str = flag("runs/offline", "output folder")
    resume: bool = flag(False, "continue the run in --save_dir from its last checkpoint", action="store_true")
    overwrite: bool = flag(False, "replace the outputs of a previous run in --save_dir", action="store_true")
    no_progress: bool = flag(False, "hide progress bars", action="store_true")


def explicit_flags(parser, argv):
    """The flags the command line actually gives (not their defaults): {name: value}."""
    quiet = argparse.ArgumentParser(add_help=False)
    for action in parser._actions:
        if action.option_strings and action.dest != "help":
            kwargs = dict(dest=action.dest, default=argparse.SUPPRESS)
            if isinstance(action, argparse._StoreTrueAction):
                kwargs["action"] = "store_true"
            else:
                kwargs["type"] = action.type
            quiet.add_argument(*action.option_strings, **kwargs)
    known, _ = quiet.parse_known_args(argv)
    return vars(known)


def resumed_flags(run_config, given, may_change, what="the run"):
    """The flags of a resumed run: its own, with the given ones that may change (e.g. --num_epochs) applied; any
    other given flag that differs from the run's is refused in one line naming each difference."""
    changed = {k: v for k, v in given.items() if k not in may_change and run_config.get(k) != v}
    if changed:
        listed = ", ".join(f"--{k} ({run_config.get(k)!r} in {what}, {v!r} given)" for k, v in sorted(changed.items()))
        raise UserError(f"--resume continues {what} with its own settings and cannot change {listed}; drop those "
                        "flags, or start a new run in another --save_dir")
    return dict(run_config, **{k: v for k, v in given.items() if k in may_change})


def setup_torch(threads, device):
    """Threads and device, resolved once per run."""
    if threads > 0:
        torch.set_num_threads(threads)
    return resolve_device(device)


class RunFolder:
    """The outputs of one run in --save_dir, never mixed with another run's.

    A folder holds a run once that run wrote its last checkpoint (`last_file`); files of a run that never got
    that far may be replaced by a plain rerun. With --overwrite the old run's files are moved aside into
    `.previous-run/` and restored if the new run fails before its first checkpoint (`committed()` drops them).
    Only the files of the project's own atomic writes (`<run file>.<random>.tmp`) are ever deleted as stale.
    """

    PREVIOUS = ".previous-run"

    def __init__(self, save_dir, run_files, last_file):
        self.save_dir, self.run_files, self.last_file = save_dir, run_files, last_file
        self.moved = []

    def path(self, name):
        return os.path.join(self.save_dir, name)

    def check(self, resume, overwrite):
        """Before anything is written: the folder can hold this run (raises UserError with one line)."""
        if os.path.exists(self.save_dir) and not os.path.isdir(self.save_dir):
            raise UserError(f"--save_dir {self.save_dir} is a file, not a folder")
        holds_run = os.path.exists(self.path(self.last_file))
        if resume and not holds_run:
            raise UserError(f"nothing to resume: {self.path(self.last_file)} does not exist")
        if holds_run and not (resume or overwrite):
            existing = [f for f in self.run_files if os.path.exists(self.path(f))]
            raise UserError(f"{self.save_dir} already holds a run ({', '.join(existing)}); "
                            f"pass --resume to continue it, --overwrite to replace it, or another --save_dir")
        existing = self.save_dir
        while not os.path.exists(existing):   # the nearest folder that exists will hold the new ones
            existing = os.path.dirname(os.path.abspath(existing))
        if not os.access(existing, os.W_OK | os.X_OK):
            raise UserError(f"cannot write to --save_dir {self.save_dir} ({existing} is not writable)")

    def open(self, resume):
        """Make room for the run: stale temporary files go; a replaced run's files are moved aside."""
        try:
            os.makedirs(self.save_dir, exist_ok=True)
        except OSError as error:
            raise UserError(f"cannot create --save_dir {self.save_dir} ({error.strerror})") from None
        for name in self.run_files:
            for stale in glob.glob(glob.escape(self.path(name)) + ".*.tmp"):   # half-written by a killed run
                os.remove(stale)
        if resume:
            return
        previous = self.path(self.PREVIOUS)
        for name in self.run_files:
            if os.path.exists(self.path(name)):
                os.makedirs(previous, exist_ok=True)
                os.replace(self.path(name), os.path.join(previous, name))
                self.moved.append(name)

    def run(self, resume, train):
        """open(), then train(): the replaced run's files come back if train() fails before `committed()`."""
        self.open(resume)
        try:
            return train()
        except BaseException:
            self.restore()
            raise

    def committed(self):
        """The new run wrote its first checkpoint: the replaced run's files go for good."""
        if self.moved:
            for name in self.moved:
                os.remove(os.path.join(self.path(self.PREVIOUS), name))
            os.rmdir(self.path(self.PREVIOUS))
            self.moved = []

    def restore(self):
        """The new run failed before its first checkpoint: its files go, the replaced run's come back."""
        if self.moved:
            for name in self.run_files:
                if os.path.exists(self.path(name)):
                    os.remove(self.path(name))
            for name in self.moved:
                os.replace(os.path.join(self.path(self.PREVIOUS), name), self.path(name))
            os.rmdir(self.path(self.PREVIOUS))
            self.moved = []


def check_finite(info, step):
    """Stop at the first non-finite loss, naming it; the checkpoints on disk are the last good ones."""
    for key, value in info.items():
        if not math.isfinite(value):
            raise UserError(f"training diverged: non-finite {key} ({value}) at step {step}; stopping, the last good "
                            "checkpoint is kept (lower --lr)")


def check_finite_weights(named_tensors, step):
    """Before any save: every weight finite, or stop naming them; the checkpoints on disk are the last good ones."""
    bad = [name for name, tensor in named_tensors if not torch.isfinite(tensor).all()]
    if bad:
        raise UserError(f"training diverged: {len(bad)} weight tensors are not finite at step {step} (e.g. {bad[0]}); "
                        "stopping, the last good checkpoint is kept (lower --lr)")


def check_finite_actions(result, step):
    """An evaluation whose policy emitted NaN or Inf comes from a diverged model: stop before it is saved."""
    if result["non_finite_episodes"]:
        raise UserError(f"training diverged: the policy emitted non-finite actions in {result['non_finite_episodes']} "
                        f"evaluation episodes at step {step}; stopping, the last good checkpoint is kept (lower --lr)")


def average(infos):
    """Means of a list of equal-keyed dicts of floats."""
    return {k: float(np.mean([info[k] for info in infos])) for k in infos[0]}


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
    try:
        os.makedirs(directory, exist_ok=True)
        fd, tmp_path = tempfile.mkstemp(dir=directory, prefix=os.path.basename(path) + ".", suffix=suffix)
    except OSError as error:
        raise UserError(f"could not write {path} ({error.strerror or type(error).__name__})") from None
    os.close(fd)
    try:
        write_fn(tmp_path)
        os.chmod(tmp_path, 0o644)  # mkstemp makes 0600 files
        os.replace(tmp_path, path)
    except OSError as error:   # a full disk, a folder made read-only: the old file is intact
        raise UserError(f"could not write {path} ({error.strerror or type(error).__name__}); the file "
                        "already there, if any, is intact") from None
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
    LAST_SAVED["path"] = str(path)


def load_checkpoint(path, map_location="cpu", expected_format=CHECKPOINT_FORMAT, kind="OPSO checkpoint",
                    required=()):
    """Load a checkpoint without executing code (weights_only) and check that it is of the expected format and
    holds the `required` keys."""
    if os.path.isdir(path):
        raise UserError(f"{path} is a folder; pass the {kind} file in it (e.g. best_model.pth or last_model.pth)")
    if not os.path.isfile(path):
        raise UserError(f"{kind} {path} does not exist")
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # pickle, zip and torch errors all mean: not a readable checkpoint
        raise UserError(f"{path} is not a readable checkpoint ({type(error).__name__})") from None
    found = checkpoint.get("format") if isinstance(checkpoint, dict) else None
    if (expected_format.startswith(CHECKPOINT_FORMAT_PREFIX) and isinstance(found, str)
            and found.startswith(CHECKPOINT_FORMAT_PREFIX) and found != expected_format):
        raise UserError(f"{path} is an OPSO checkpoint of an older format ({found}; this code reads "
                        f"{expected_format}): retrain it, or read it with commit 04831cc or earlier")
    if found != expected_format:
        raise UserError(f"{path} is not an {kind}" if kind[0].lower() in "aeiou" else f"{path} is not a {kind}")
    missing = [key for key in required if key not in checkpoint]
    if missing:
        raise UserError(f"{path} is an incomplete {kind}: it lacks {', '.join(missing)}")
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


def plot_command(argv):
    """python utils.py plot METRICS.csv OUT.png: every column of a metrics CSV against its first."""
    if len(argv) != 3 or argv[0] != "plot":
        raise UserError("usage: python utils.py plot METRICS.csv OUT.png")
    csv_path, png_path = argv[1], argv[2]
    if not os.path.isfile(csv_path):
        raise UserError(f"{csv_path} does not exist")
    if os.path.abspath(png_path) == os.path.abspath(csv_path) or not png_path.lower().endswith(".png"):
        raise UserError(f"the output {png_path} must be a .png file other than the CSV")
    columns = read_csv(csv_path)
    if not columns:
        raise UserError(f"{csv_path} holds no rows to plot")
    names = list(columns)
    plot_curves(csv_path, png_path, names[0], [(c, [c]) for c in names[1:]])
    print(f"wrote {png_path}")


if __name__ == "__main__":
    exit_on_user_error(lambda: plot_command(sys.argv[1:]))
