"""
Metrics: what a run measures per refinement step k, the records train.py writes of it, and their plots.

Evaluation is one teacher-forced pass, summed over DDP ranks: fluency val loss and, on held-out reasoning
answers, exact match (greedy decoding's), token accuracy and how often step K beats step 1; and exact match
against the test-time steps K' (exact_match_curve). train.py writes eval and train records to metrics.jsonl
(and wandb).

CLI: python evaluate.py --plot --out_dir=DIR   plots of one run's DIR/metrics.jsonl, written next to it (PLOTS
     below; needs matplotlib, an optional extra: pip install matplotlib)
"""

import argparse
import json
import os
import sys
from statistics import fmean

import torch
import torch.distributed as dist
import torch.nn.functional as F

from configurator import existing_file


def all_reduce_sum(t, world):
    """Sum over DDP ranks, in place (a no-op for one process)."""
    if world > 1:
        dist.all_reduce(t)
    return t


def all_reduce_dict(values, world):
    """{name: tensor} summed over ranks in one all-reduce -> {name: float, or list for a tensor of 1+ dims}.
    Layout: the tensors flattened and concatenated in the dict's order (every rank builds the same dict),
    then split back by their sizes."""
    sums = all_reduce_sum(torch.cat([v.reshape(-1) for v in values.values()]), world)
    parts = sums.split([v.numel() for v in values.values()])
    return {k: p.tolist() if v.dim() else p.item() for (k, v), p in zip(values.items(), parts)}

# Every rank must run the same all_reduce calls, in the same order, with the same shapes, whatever its share
# of the eval set (possibly none). Tensors on the device are float32 (loss sums, small per-example counts,
# exact below 2**24) or int64 (global token counts): no float64, which MPS lacks.


@torch.no_grad()
def evaluate_fluency(model, batches, n_steps, world=1):
    """Per-step val loss: the mean of ℓ_k over all valid targets of all ranks' batches; `batches` is this
    rank's share, possibly empty. Two all_reduce calls on every rank: Σ ℓ_k per step, then the count of valid
    targets."""
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
    Only answer positions are unembedded: (K', n, V) logits for the n answer tokens, never (K', B, T, V).
    """
    K = max(n_steps, 1)
    if n_examples is None:
        if not batches or world > 1:
            raise ValueError("evaluate_reasoning needs n_examples (the whole eval set's size) without "
                             "batches or with DDP: every rank must sum tensors of the same shape")
        n_examples = 1 + max(int(b.answer_id.max()) for b in batches)
    device = model.lm_head.weight.device
    wrong = torch.zeros(n_examples, K, dtype=torch.float32, device=device)  # wrong answer tokens (example, k)
    seen = torch.zeros(n_examples, dtype=torch.float32, device=device)      # answer tokens per example
    beats = torch.zeros(2, dtype=torch.int64, device=device)                # (tokens where ℓ_K < ℓ_1, all)
    for b in batches:
        m = b.answer_mask
        ids, y = b.answer_id[m], b.y[m]                   # (n,): each answer token's example, and target
        o = model.head_outputs(model.trunk(b.x), n_steps)[:, m]   # o_k, (K', n, C): answer positions only
        for k in range(K):
            logits = model.unembed(o[k]).float()                              # (n, V): one step at a time
            wrong[:, k].index_add_(0, ids, (logits.argmax(-1) != y).float())
            if k in (0, K - 1):                                               # ℓ_1 and ℓ_K on answer tokens
                nll = F.cross_entropy(logits, y, reduction="none")
                if k == 0:
                    nll_first = nll
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


@torch.no_grad()
def exact_match_curve(model, batches, n_steps, tags=()):
    """
    Teacher-forced exact match (greedy decoding's, see evaluate_reasoning) at every test-time K' = 0..n_steps
    -> (curve, {task: curve}), given each example's task tag. Step k's logits do not depend on how many steps
    follow, so one pass with n_steps steps gives K' = 1..n_steps; K' = 0 (the trunk alone) is a second pass.
    """
    passes = [0, n_steps] if n_steps else [0]
    exact = torch.cat([evaluate_reasoning(model, batches, k)["per_example_exact"] for k in passes], dim=1)
    return exact[~exact[:, 0].isnan()].mean(0).tolist(), per_task(exact, tags)

# -----------------------------------------------------------------------------
# train.py's records, one JSON object a line in metrics.jsonl


def eval_sets(fluency, reasoning, c, rank, world, device):
    """train.py's fixed eval sets, this rank's share: (fluency val batches, reasoning eval batches, the task
    of every reasoning example); None = no such evaluation. A rank may get no batches, but every rank runs
    every evaluation (they all-reduce): the config decides what is evaluated, never a rank's shard."""
    B = c["batch_size"]
    n = c["eval_examples"] if reasoning else 0
    fluency_val = [fluency.get_batch("val", i, B).to(device) for i in range(rank, c["eval_iters"], world)] \
        if fluency else None
    reasoning_val = [b.to(device) for b in reasoning.eval_batches(B, n)[rank::world]] if n else None
    return fluency_val, reasoning_val, reasoning.eval_tags(n) if n else []


def eval_metrics(model, fluency_val, reasoning_val, tags, n_steps, n_examples, world=1):
    """An eval record's metrics, from eval_sets: fluency_loss, answer_exact_match, answer_token_acc (per
    step), step_K_beats_1 and task_exact_match ({task: per step}), those of the sets there are."""
    rec = {}
    if fluency_val is not None:
        rec["fluency_loss"] = evaluate_fluency(model, fluency_val, n_steps, world)
    if reasoning_val is not None:
        r = evaluate_reasoning(model, reasoning_val, n_steps, n_examples, world)
        r["task_exact_match"] = per_task(r.pop("per_example_exact").cpu(), tags)
        rec.update(r)
    return rec


def format_eval(rec):
    """An eval record as a table: one column per step k."""
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


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description="Plots of one training run's metrics.jsonl, written next to it: "
                                 + ", ".join(PLOTS.values()) + " (those the run has data for). Needs "
                                 "matplotlib.", epilog="example: python evaluate.py --plot --out_dir=out-cpu")
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
