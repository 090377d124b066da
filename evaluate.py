"""
Evaluation, per refinement step k, in one teacher-forced pass, summed over DDP ranks: fluency val loss,
and on held-out reasoning answers exact match, token accuracy and how often step K beats step 1. train.py
runs it every eval_interval; experiments.py reuses evaluate_reasoning (sample.py decodes greedily instead).

CLI: python evaluate.py --plot --out_dir=DIR   plots of one run's DIR/metrics.jsonl, written next to it (PLOTS
     below; needs matplotlib, an optional extra: pip install matplotlib)
"""

import argparse
import json
import os
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F


def all_reduce_sum(t, world):
    """Sum over DDP ranks, in place (a no-op for one process)."""
    if world > 1:
        dist.all_reduce(t)
    return t

# Every rank must run the same all_reduce calls, in the same order, with the same shapes, whatever its share of
# the eval set (possibly none). Tensors on the device are float32 (loss sums, small per-example counts, exact
# below 2**24) or int64 (global token counts): no float64, which MPS lacks.


@torch.no_grad()
def evaluate_fluency(model, batches, n_steps, world=1):
    """Per-step val loss: the mean of ℓ_k over all valid targets of all ranks' batches; `batches` is this rank's
    share, possibly empty. Two all_reduce calls on every rank: Σ ℓ_k per step, then the count of valid targets."""
    device = model.lm_head.weight.device
    sums = torch.zeros(max(n_steps, 1), dtype=torch.float32, device=device)   # Σ ℓ_k per step
    count = torch.zeros((), dtype=torch.int64, device=device)                 # valid targets
    for b in batches:
        _, nll = model(b.x, b.y, n_steps=n_steps)                        # (K', B, T), 0 on ignored targets
        sums += nll.sum((1, 2)).float()
        count += (b.y >= 0).sum()
    sums, count = all_reduce_sum(sums, world), all_reduce_sum(count, world)
    return (sums / count.clamp(min=1)).tolist()


@torch.no_grad()
def evaluate_reasoning(model, batches, n_steps, n_examples=None, world=1):
    """
    Teacher-forced, one pass per batch, for each step k = 1..K':
      answer_token_acc   answer tokens (and closing eot) that are the argmax given the gold prefix
      answer_exact_match answers all of whose tokens are: exactly what greedy decoding would produce
      step_K_beats_1     answer tokens where ℓ_K < ℓ_1
    Also per_example_exact (N, K'), for per-task tables. batches: this rank's share of eval_batches, possibly
    empty; n_examples: the size of the whole eval set (answer_id < n_examples), needed with DDP or no batches.
    Only answer positions are unembedded: (K', n, V) logits for the batch's n answer tokens, never (K', B, T, V).
    """
    K = max(n_steps, 1)
    if n_examples is None:
        if not batches or world > 1:
            raise ValueError("evaluate_reasoning needs n_examples (the size of the whole eval set) when this rank has "
                             "no batches or with DDP (world > 1): every rank must sum tensors of the same shape")
        n_examples = 1 + max(int(b.answer_id.max()) for b in batches)
    device = model.lm_head.weight.device
    wrong = torch.zeros(n_examples, K, dtype=torch.float32, device=device)  # wrong answer tokens, per example, step
    seen = torch.zeros(n_examples, dtype=torch.float32, device=device)      # answer tokens per example
    beats = torch.zeros(2, dtype=torch.int64, device=device)                # (tokens where ℓ_K < ℓ_1, answer tokens)
    for b in batches:
        m = b.answer_mask
        ids, y = b.answer_id[m], b.y[m]                                       # (n,) each answer token's example, target
        o = model.transformer.ln_f(model.head_outputs(model.trunk(b.x), n_steps))   # (K', B, T, C)
        o = o[:, m]                                                           # (K', n, C): answer positions only
        for k in range(K):
            logits = model.lm_head(o[k]).float()                              # (n, V): one step at a time
            wrong[:, k].index_add_(0, ids, (logits.argmax(-1) != y).float())
            if k in (0, K - 1):                                               # ℓ_1 and ℓ_K on answer tokens
                nll = F.cross_entropy(logits, y, reduction="none")
                nll_first = nll if k == 0 else nll_first
        seen.index_add_(0, ids, torch.ones_like(ids, dtype=seen.dtype))
        beats += torch.stack([(nll < nll_first).sum(), m.sum()])
    wrong, seen, beats = (all_reduce_sum(t, world) for t in (wrong, seen, beats))
    has = seen > 0
    exact = (wrong == 0).float()[has]                                         # (N, K')
    n_wrong, n_seen = wrong[has].long().sum(0), seen.long().sum()             # exact totals
    return {
        "answer_exact_match": exact.mean(0).tolist(),
        "answer_token_acc": (1 - n_wrong / n_seen).tolist(),
        "step_K_beats_1": (beats[0] / beats[1].clamp(min=1)).item(),
        "per_example_exact": (wrong == 0).float().masked_fill(~has[:, None], float("nan")),
    }


def per_task(exact, tags):
    """{'add:3': exact match at each step, ...} from per_example_exact and the examples' task tags."""
    out = {}
    for tag in dict.fromkeys(tags):
        rows = exact[[i for i, t in enumerate(tags) if t == tag]]
        out[tag] = rows[~rows[:, 0].isnan()].mean(0).tolist()
    return out


def format_eval(rec):
    K = len(rec.get("fluency_loss") or rec.get("answer_exact_match"))
    lines = [f"eval @ iter {rec['iter']} ({rec['tokens'] / 1e6:.2f}M tokens)",
             f"{'':>14}" + "".join(f"{'k=' + str(k + 1):>8}" for k in range(K))]
    for key, label in (("fluency_loss", "fluency loss"), ("answer_exact_match", "answer EM"),
                       ("answer_token_acc", "answer tok acc")):
        if key in rec:
            lines.append(f"{label:>14}" + "".join(f"{v:8.4f}" for v in rec[key]))
    for tag, em in rec.get("task_exact_match", {}).items():
        lines.append(f"{'EM ' + tag:>14}" + "".join(f"{v:8.4f}" for v in em))
    if "step_K_beats_1" in rec:
        lines.append(f"step K beats step 1 on {100 * rec['step_K_beats_1']:.1f}% of answer tokens")
    return "\n".join(lines)


# -----------------------------------------------------------------------------
# plots of one run: python evaluate.py --plot --out_dir=DIR

PLOTS = {  # what: the PNG written next to metrics.jsonl (only when the run logged that data)
    "train_loss": "train_loss.png",                    # training loss over iterations, fluency and reasoning apart
    "fluency_loss": "fluency_loss_per_step.png",       # fluency val loss over training, one line per step k
    "answer_exact_match": "answer_em_per_step.png",    # held-out answer exact match over training, one line per k
    "task_exact_match": "task_em_step_K.png",          # exact match at the last step K, one line per task
}
KINDS = ("fluency", "reasoning")


def read_metrics(path):
    """The records of a metrics.jsonl, skipping a line cut short by a crash."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found: it is written by `python train.py --out_dir="
                                f"{os.path.dirname(path) or '.'}`")
    records = []
    with open(path) as f:
        for line in f:
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if isinstance(rec, dict):
                records.append(rec)
    return records


def plot_series(records):
    """What the plots show, from metrics.jsonl records, in iteration order:
      train_loss          {kind: (iters, losses)}; a train record has a sub-dict per kind that ran since the last log
                          ({"fluency": {"loss": ...}, "reasoning": {...}}), or, in the older format, "kind" and "loss"
      fluency_loss        [(iters, values)] for each step k, from eval records (eval_only records are left out)
      answer_exact_match  the same
      task_exact_match    {task: (iters, exact match at the last step K)}"""
    records = sorted(records, key=lambda r: r.get("iter", 0))  # sorted() is stable: ties keep the file's order
    out = {"train_loss": {}, "fluency_loss": [], "answer_exact_match": [], "task_exact_match": {}}

    def add(series, key, it, value):
        xs, ys = series.setdefault(key, ([], []))
        xs.append(it)
        ys.append(value)

    for rec in records:
        it = rec.get("iter")
        if rec.get("type") == "train":
            parts = {kind: rec[kind] for kind in KINDS if isinstance(rec.get(kind), dict)}
            if not parts and rec.get("kind") in KINDS:  # the older format: one kind per record
                parts = {rec["kind"]: rec}
            for kind, part in parts.items():
                if isinstance(part.get("loss"), (int, float)):
                    add(out["train_loss"], kind, it, part["loss"])
        elif rec.get("type") == "eval":
            for key in ("fluency_loss", "answer_exact_match"):
                for k, v in enumerate(rec.get(key) or []):
                    while len(out[key]) <= k:
                        out[key].append(([], []))
                    out[key][k][0].append(it)
                    out[key][k][1].append(v)
            for task, em in (rec.get("task_exact_match") or {}).items():
                if em:
                    add(out["task_exact_match"], task, it, em[-1])
    out["fluency_loss"], out["answer_exact_match"] = (
        [(list(xs), list(ys)) for xs, ys in out[key]] for key in ("fluency_loss", "answer_exact_match"))
    return out


def plot_run(out_dir):
    """Write PLOTS of out_dir/metrics.jsonl next to it; returns the paths written. matplotlib is imported here:
    it is an optional extra."""
    path = os.path.join(out_dir, "metrics.jsonl")
    series = plot_series(read_metrics(path))
    if not any(series.values()):
        raise ValueError(f"{path}: no train or eval records to plot")
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ImportError("--plot needs matplotlib, an optional extra: pip install matplotlib") from None
    name = os.path.basename(os.path.abspath(out_dir))
    written = []

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
                                ("answer_exact_match", "held-out answer exact match per step", "exact match")):
        if series[what]:
            fig, ax = plt.subplots(figsize=(6, 4))
            for k, (xs, ys) in enumerate(series[what]):
                ax.plot(xs, ys, marker=".", label=f"k={k + 1}")
            ax.set(title=f"{name}: {title}", xlabel="iter", ylabel=ylabel)
            ax.legend(fontsize=8)
            save(fig, what)
    if series["task_exact_match"]:
        fig, ax = plt.subplots(figsize=(6, 4))
        for task, (xs, ys) in series["task_exact_match"].items():
            ax.plot(xs, ys, marker=".", label=task)
        ax.set(title=f"{name}: exact match per task at step K", xlabel="iter", ylabel="exact match")
        ax.legend(fontsize=8)
        save(fig, "task_exact_match")
    return written


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description="Plots of one training run's metrics.jsonl, written next to it: "
                                 + ", ".join(PLOTS.values()) + " (those the run has data for). Needs matplotlib.",
                                 epilog="example: python evaluate.py --plot --out_dir=out-cpu")
    ap.add_argument("--plot", action="store_true", help="plot OUT_DIR/metrics.jsonl into OUT_DIR/*.png")
    ap.add_argument("--out_dir", default="out", help="the run's folder, train.py's out_dir (default: out)")
    args = ap.parse_args()
    if not args.plot:
        ap.error("nothing to do: pass --plot")
    try:
        for p in plot_run(args.out_dir):
            print(f"wrote {p}")
    except (FileNotFoundError, ValueError, ImportError) as e:  # one line, no traceback
        sys.exit(f"evaluate.py: {e}")
