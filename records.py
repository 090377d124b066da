"""
A run's records: what train.py writes to out_dir/metrics.jsonl (one JSON object a line, and wandb), reading
them back, and their plots (python evaluate.py --plot --out_dir=DIR: PLOTS below; matplotlib is an optional
extra, imported only to draw).
"""

import json
import os
import sys
from statistics import fmean

from configurator import existing_file


class TrainWindow:
    """The optimizer steps since the last train record: what each logged, and what they took."""

    def __init__(self, tokens_per_iter):
        self.tokens_per_iter = tokens_per_iter
        self.logged = {"fluency": [], "reasoning": []}   # what each step logged (loss, ds, rl, imp, nll_k)
        self.n_steps, self.tokens, self.flops, self.seconds = [], 0, 0, 0.0

    def add(self, kind, K, logged, flops_per_token, seconds):
        self.logged[kind].append(logged)
        self.n_steps.append(K)
        self.tokens += self.tokens_per_iter
        self.flops += flops_per_token * self.tokens_per_iter
        self.seconds += seconds

    def record(self, it, lr, world, gpu_peak_tflops=None):
        """The train record at iteration `it`: means over the window's steps, each kind's apart (kind_means),
        and throughput; MFU given the GPU's peak TFLOP/s."""
        steps = self.logged["fluency"] + self.logged["reasoning"]
        tflops = self.flops / self.seconds / world / 1e12       # per process, FLOPs actually run
        rec = {"type": "train", "iter": it, "tokens": it * self.tokens_per_iter, "lr": lr,
               "loss": sum(s["loss"] for s in steps) / len(steps), "n_steps": self.n_steps,
               **{kind: kind_means(logged) for kind, logged in self.logged.items() if logged},
               "tokens_per_s": self.tokens / self.seconds, "tflops": tflops}
        if gpu_peak_tflops:
            rec["mfu"] = tflops / gpu_peak_tflops
        return rec


def kind_means(steps):
    """The mean of each logged value over the steps of one kind; ℓ_k over the steps that ran step k (K varies
    with random K). steps: what each logged, {"loss", "ds", "rl", "imp": float, "nll_k": [ℓ_1..ℓ_K]}."""
    rec = {"steps": len(steps), **{k: fmean(s[k] for s in steps) for k in ("loss", "ds", "rl", "imp")}}
    K = max(len(s["nll_k"]) for s in steps)
    # None: no step of the window that ran step k drew it (sampled deep supervision)
    ran = [[s["nll_k"][k] for s in steps if len(s["nll_k"]) > k and s["nll_k"][k] is not None]
           for k in range(K)]
    rec["nll_k"] = [fmean(values) if values else None for values in ran]
    return rec


class Records:
    """A run's metrics.jsonl, one JSON record a line, and the same records to wandb when given a wandb run."""

    def __init__(self, path, wandb=None):
        self.path, self.wandb = path, wandb

    def write(self, rec):
        with open(self.path, "a") as f:
            f.write(json.dumps(rec) + "\n")
        if self.wandb:
            self.wandb.log(flat(rec), step=rec["iter"])

    def start(self, resumed_at=None):
        """Training starts: a fresh run (resumed_at None) removes the old records; a resumed one keeps those
        up to its checkpoint's iteration, dropping what the crashed run wrote after it (the resumed run writes
        it again) and a line cut short by the crash. Atomic."""
        if not os.path.exists(self.path):
            return
        if resumed_at is None:
            os.remove(self.path)
            return
        kept = [json.dumps(rec) + "\n" for rec in read_metrics(self.path) if rec["iter"] <= resumed_at]
        with open(self.path + ".tmp", "w") as f:
            f.writelines(kept)
        os.replace(self.path + ".tmp", self.path)


def flat(rec, prefix=""):
    """A record as flat scalars for wandb: {'fluency_loss': [a, b]} -> {'fluency_loss/k1': a, ...}."""
    out = {}
    for key, v in rec.items():
        name = prefix + key
        if isinstance(v, dict):
            out.update(flat(v, name + "/"))
        elif isinstance(v, list):
            out.update({f"{name}/k{k + 1}": x for k, x in enumerate(v)})
        elif isinstance(v, (int, float)):
            out[name] = v
    return out


# -----------------------------------------------------------------------------
# plots of one run: python evaluate.py --plot --out_dir=DIR

PLOTS = {  # what: the PNG written next to metrics.jsonl (only when the run logged that data)
    "train_loss": "train_loss.png",                  # training loss over iterations, fluency, reasoning apart
    "fluency_loss": "fluency_loss_per_step.png",     # fluency val loss over training, one line per step k
    "answer_exact_match": "answer_em_per_step.png",  # held-out answer exact match over training, a line per k
    "task_exact_match": "task_em_step_K.png",        # exact match at the last step K, one line per task
}
KINDS = ("fluency", "reasoning")


def read_metrics(path, skipped=None):
    """The records of a metrics.jsonl. A line that is not one of train.py's records is skipped, its number
    appended to `skipped`: cut short by a crash, not UTF-8 or JSON, or of other types than train.py writes."""
    records, fix = [], f": train.py writes it (--out_dir={os.path.dirname(path) or '.'})"
    with open(existing_file(path, "metrics file", fix), "rb") as f:
        for lineno, line in enumerate(f, 1):
            try:
                rec = json.loads(line.decode("utf-8"))
            except ValueError:   # json's and UTF-8's errors alike
                rec = None
            if is_record(rec):
                records.append(rec)
            elif line.strip() and skipped is not None:
                skipped.append(lineno)
    return records


def is_record(rec):
    """Whether rec has train.py's types where a plot or a resume reads it: an int iter, numbers per step."""
    number = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)
    per_step = lambda v: isinstance(v, list) and all(map(number, v))
    if not (isinstance(rec, dict) and type(rec.get("iter")) is int):
        return False
    parts = [rec[k] for k in KINDS if k in rec] + ([rec] if "kind" in rec else [])   # train records' losses
    tasks = rec.get("task_exact_match", {})
    return (all(isinstance(p, dict) and number(p.get("loss", 0)) for p in parts)
            and all(per_step(rec[k]) for k in ("fluency_loss", "answer_exact_match") if k in rec)
            and isinstance(tasks, dict) and all(map(per_step, tasks.values())))


def plot_series(records):
    """What the plots show, from metrics.jsonl records (read_metrics'), in iteration order:
      train_loss          {kind: (iters, losses)}; a train record has a sub-dict per kind that ran since the
                          last log ({"fluency": {"loss": ...}, "reasoning": {...}}), or, in the older format,
                          "kind" and "loss"
      fluency_loss        [(iters, values)] for each step k, from eval records (not eval_only records)
      answer_exact_match  the same
      task_exact_match    {task: (iters, exact match at the last step K)}"""
    out = {"train_loss": {}, "fluency_loss": {}, "answer_exact_match": {}, "task_exact_match": {}}

    def add(series, key, it, value):
        xs, ys = series.setdefault(key, ([], []))
        xs.append(it)
        ys.append(value)

    for rec in sorted(records, key=lambda r: r["iter"]):  # stable: ties keep the file's order
        it = rec["iter"]
        if rec.get("type") == "train":
            parts = {kind: rec[kind] for kind in KINDS if isinstance(rec.get(kind), dict)}
            if not parts and rec.get("kind") in KINDS:  # the older format: one kind per record
                parts = {rec["kind"]: rec}
            for kind, part in parts.items():
                if "loss" in part:
                    add(out["train_loss"], kind, it, part["loss"])
        elif rec.get("type") == "eval":
            for key in ("fluency_loss", "answer_exact_match"):
                for k, v in enumerate(rec.get(key) or []):
                    add(out[key], k, it, v)
            for task, em in (rec.get("task_exact_match") or {}).items():
                if em:
                    add(out["task_exact_match"], task, it, em[-1])
    for key in ("fluency_loss", "answer_exact_match"):   # {k: series} -> [series of k = 1, 2, ...]
        out[key] = [out[key][k] for k in sorted(out[key])]
    return out


def pyplot():
    """matplotlib.pyplot drawing to files (the Agg backend), or None: matplotlib is an optional extra."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def plot_run(out_dir):
    """Write PLOTS of out_dir/metrics.jsonl next to it; returns the paths written. matplotlib is imported
    here: it is an optional extra."""
    path, skipped = os.path.join(out_dir, "metrics.jsonl"), []
    series = plot_series(read_metrics(path, skipped))
    if skipped:
        print(f"evaluate.py: skipped line(s) {', '.join(map(str, skipped[:5]))}{' ...' * (len(skipped) > 5)} "
              f"of {path}: not train.py's records", file=sys.stderr)
    if not any(series.values()):
        raise ValueError(f"{path}: no train or eval records to plot")
    plt = pyplot()
    if plt is None:
        raise ImportError("--plot needs matplotlib, an optional extra: pip install matplotlib")
    name, written = os.path.basename(os.path.abspath(out_dir)), []

    def save(fig, what):
        fig.tight_layout()
        written.append(os.path.join(out_dir, PLOTS[what]))
        fig.savefig(written[-1], dpi=110)
        plt.close(fig)

    if series["train_loss"]:
        kinds = [k for k in KINDS if k in series["train_loss"]]
        fig, axes = plt.subplots(1, len(kinds), figsize=(5 * len(kinds), 3.8), squeeze=False)
        for ax, kind in zip(axes[0], kinds):
            ax.plot(*series["train_loss"][kind], color="C0" if kind == "fluency" else "C1")
            ax.set(title=f"{name}: {kind} training loss", xlabel="iter", ylabel="loss")
        save(fig, "train_loss")
    for what, title, ylabel in (("fluency_loss", "fluency val loss per step", "loss"),
                                ("answer_exact_match", "held-out answer exact match per step", "exact match"),
                                ("task_exact_match", "exact match per task at step K", "exact match")):
        lines = series[what] if what == "task_exact_match" else {f"k={k + 1}": xy for k, xy in
                                                                   enumerate(series[what])}
        if lines:
            fig, ax = plt.subplots(figsize=(6, 4))
            for label, (xs, ys) in lines.items():
                ax.plot(xs, ys, marker=".", label=label)
            ax.set(title=f"{name}: {title}", xlabel="iter", ylabel=ylabel)
            ax.legend(fontsize=8)
            save(fig, what)
    return written
