"""
Checkpoints and resume: atomic writes that keep the previous checkpoint, one-line errors for a missing or
unreadable file, the resumed run's config (the checkpoint's own, with only the keys that are safe to change
overridable), and the metric records a crashed run wrote after its last checkpoint.
"""

import json
import os

import torch

from configurator import ConfigError, configure

# What a resumed run may change: where and how often it evaluates, logs and saves, how long it runs and where
# its learning-rate schedule ends, and the machine it runs on. Everything else (architecture, data, objective,
# optimizer, seed) comes from the checkpoint: a different value would make it another run, not this one resumed.
SAFE_ON_RESUME = ("out_dir", "init_from", "eval_interval", "log_interval", "eval_iters", "eval_examples",
                  "eval_only", "checkpoint_interval", "checkpoint_minutes", "wandb_log", "wandb_project",
                  "wandb_run_name", "max_iters", "lr_decay_iters", "min_lr", "device", "dtype", "compile",
                  "threads", "gpu_peak_tflops", "tokenizer_file")


def previous(path):
    """ckpt.pt -> ckpt.prev.pt, the checkpoint before the latest."""
    root, ext = os.path.splitext(path)
    return f"{root}.prev{ext}"


def save(path, state):
    """Atomic (written to a temp file, then renamed): a crash mid-write leaves the last checkpoint intact. The one
    it replaces is kept as ckpt.prev.pt, so a checkpoint damaged later (a full disk, a bad copy) loses one interval."""
    torch.save(state, path + ".tmp")
    if os.path.exists(path):
        os.replace(path, previous(path))
    os.replace(path + ".tmp", path)


def load(path):
    """The checkpoint at `path` (on the CPU), or a ConfigError naming the file and what to do instead."""
    prev = previous(path)
    hint = f"; the previous checkpoint is {prev}: copy it to {path} to resume from it" if os.path.exists(prev) else ""
    if not os.path.exists(path):
        raise ConfigError(f"init_from=resume but {path} does not exist" + (hint or "; start with init_from=scratch"))
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # a truncated zip, a damaged pickle, ...: whatever it is, the file cannot be used
        raise ConfigError(f"{path} is unreadable ({type(e).__name__}), truncated or corrupt{hint}") from e


def resume_config(defaults, saved, argv):
    """The resumed run's config: the checkpoint's, then argv (presets and --key=value) applied over it. A key
    outside SAFE_ON_RESUME whose value differs from the checkpoint's is an error naming the key."""
    base = {**defaults, **{k: v for k, v in saved.items() if k in defaults}}
    c = configure(base, argv)
    for key in defaults:
        if key not in SAFE_ON_RESUME and c[key] != base[key]:
            raise ConfigError(f"{key}={c[key]!r} differs from the checkpoint's {base[key]!r}; a resumed run keeps its "
                              f"config except {', '.join(SAFE_ON_RESUME)} (start a new out_dir to change it)")
    return c


def keep_records_until(path, it):
    """On resume: drop the metric records past the checkpoint's iteration (the crashed run wrote them after its
    last checkpoint and the resumed run writes them again), and a line cut short by the crash. Atomic."""
    if not os.path.exists(path):
        return
    keep = []
    with open(path) as f:
        for line in f:
            try:
                if json.loads(line)["iter"] <= it:
                    keep.append(line)
            except ValueError:
                pass
    with open(path + ".tmp", "w") as f:
        f.writelines(keep)
    os.replace(path + ".tmp", path)
