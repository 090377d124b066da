"""
Metrics: what a run measures per refinement step k, and train.py's eval sets and eval records of it
(records.py writes them to metrics.jsonl and plots them).

Evaluation is one teacher-forced pass, summed over DDP ranks: fluency val loss and, on held-out reasoning
answers, exact match (greedy decoding's), token accuracy and how often step K beats step 1; and exact match
against the test-time steps K' (exact_match_curve).

CLI: python evaluate.py --plot --out_dir=DIR   plots of one run's DIR/metrics.jsonl, written next to it
     (records.PLOTS; needs matplotlib, an optional extra: pip install matplotlib)
"""

import argparse
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F

import data
from latent_head import exit_logits
from records import PLOTS, plot_run
from tasks import chain_answers, tag_level


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
    """
    Per step k, means over all valid targets of all ranks' batches (`batches`: this rank's share, possibly
    empty):
      fluency_loss    ℓ_k, the val loss
      readout_scale   ‖W_out·z_k‖ / ‖h_t‖: how far step k moves the hidden state. A step changes a prediction
                      only once this is large enough; a pretrained trunk's h is large (README "Any pretrained
                      LM"). Absent for K' = 0.
    Two all_reduce calls on every rank: the per-step sums, then the count of valid targets.
    """
    device = model.lm_head.weight.device
    K = max(n_steps, 1)
    sums = torch.zeros(2, K, dtype=torch.float32, device=device)   # Σ ℓ_k, Σ ‖W_out·z_k‖/‖h_t‖ per step
    count = torch.zeros((), dtype=torch.int64, device=device)     # valid targets
    for b in batches:
        h = model.trunk(b.x)                                           # (B, T, C)
        o = model.head_outputs(h, n_steps)                             # o_k = h_t + W_out·z_k, (K', B, T, C)
        valid = b.y >= 0
        sums[0] += torch.stack([model.step_nll(o_k, b.y) for o_k in o]).sum((1, 2)).float()   # 0 if ignored
        scale = (o - h).norm(dim=-1) / h.norm(dim=-1).clamp(min=1e-12)                     # (K', B, T)
        sums[1] += (scale * valid).sum((1, 2)).float()
        count += valid.sum()
    sums, count = all_reduce_sum(sums, world), all_reduce_sum(count, world)
    means = (sums / count.clamp(min=1)).tolist()
    return {"fluency_loss": means[0], **({"readout_scale": means[1]} if n_steps else {})}


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
# the reading per level: an answer of level L (L steps of a chain) at step 1, at K' = L, at one large K', and
# where adaptive exit stops

LONG_STEPS = 21        # the one large K' every level is read at too: does thinking longer hurt?
EXIT_THRESHOLD = 0.01  # adaptive exit's ε (latent_head.exit_logits) where none is given


@torch.no_grad()
def read_steps(model, batches, n_steps, n_examples, threshold=EXIT_THRESHOLD, world=1):
    """
    One teacher-forced pass -> per example: exact at every K' = 1..n_steps (N, K'), exact at adaptive exit
    (N,) and the mean steps its tokens ran there (N,); nan for an example without answer tokens. Adaptive
    exit, at most n_steps steps, is latent_head.exit_logits' rule per answer token (it stops at the first
    k >= 1 with KL(p_k || p_{k-1}) < threshold, p_0 the trunk's): exact answers are what greedy decoding with
    the same exit produces. n_steps = 0: the trunk alone.
    """
    device = model.lm_head.weight.device
    wrong = torch.zeros(n_examples, max(n_steps, 1), device=device)        # wrong tokens (example, K')
    sums = torch.zeros(3, n_examples, device=device)                        # at exit: wrong, steps; tokens
    for b in batches:
        m = b.answer_mask
        ids, y, h = b.answer_id[m], b.y[m], model.trunk(b.x)
        outs = [h[m], *(model.head_outputs(h, n_steps)[:, m] if n_steps else [])]   # o_0 = h, o_1.., (n, C)
        for k, o in enumerate(outs[1:] or outs):
            wrong[:, k].index_add_(0, ids, (model.unembed(o).argmax(-1) != y).float())
        logits, used, _, _ = exit_logits(outs, n_steps, model.unembed, threshold)
        for row, v in zip(sums, (logits.argmax(-1) != y, used, torch.ones_like(used))):
            row.index_add_(0, ids, v.float())
    wrong, (exit_wrong, steps, seen) = all_reduce_sum(wrong, world), all_reduce_sum(sums, world)
    exact = lambda w: torch.where(seen > 0, (w == 0).float(), float("nan"))
    return exact(wrong.T).T, exact(exit_wrong), steps / seen


def level_reading(model, batches, tags, n_steps=LONG_STEPS, threshold=EXIT_THRESHOLD, world=1):
    """
    Per level L (tasks.tag_level of each eval example's tag): exact match at step 1, at K' = L, at
    K' = n_steps (one large K' for every level) and at adaptive exit (at most n_steps), with the mean steps
    its tokens ran -> {L: {'n', 'step_1', 'at_L', 'long', 'at_long', 'exit', 'exit_steps'}}; {} when no
    example has a level.
    """
    levels = torch.tensor([tag_level(t) for t in tags])
    if not levels.any():
        return {}
    read = read_steps(model, batches, n_steps, len(tags), threshold=threshold, world=world)
    exact, exit_exact, exit_steps = (t.cpu() for t in read)
    reading = {}
    for L in sorted(set(levels.tolist()) - {0}):
        rows = (levels == L) & ~exact[:, 0].isnan()
        mean = lambda v: v[rows].mean().item()
        reading[L] = {"n": int(rows.sum()), "step_1": mean(exact[:, 0]),
                      "at_L": mean(exact[:, min(L, exact.size(1)) - 1]), "long": n_steps,
                      "at_long": mean(exact[:, -1]), "exit": mean(exit_exact), "exit_steps": mean(exit_steps)}
    return reading


def chain_batches(tok, block_size, examples, tags, batch_size):
    """Examples [(prompt, answer)] of the chain families, tagged ('hopo:5'), as hop_reading reads them: one
    per row, with their chain f^1(x)..f^L(x) (tasks.chain_answers) as step_y."""
    suite = data.ReasoningData("synthetic", tok, block_size, tasks=",".join(dict.fromkeys(tags)),
                               step_targets="chain")
    rows = [(p, a, chain_answers(t.partition(":")[0], p, tag_level(t)), tag_level(t))
            for (p, a), t in zip(examples, tags)]
    return suite.batches_of(rows, batch_size)


@torch.no_grad()
def hop_reading(model, batches, tags):
    """
    Does step k compute hop k? Per level L: the fraction of examples whose step k gives f^k(x), the k-th
    element of their chain, on every answer token (argmax given the gold prefix, as exact match is read), for
    k = 1..L -> {L: [fraction at step 1, ..., step L]}. batches: one example per row, each with its chain
    f^1(x)..f^L(x) as step_y (chain_batches); tags: each example's ('hopo:5'). A final-answer
    arm is never trained on f^k(x) for k < L: what it scores there, it found by itself.
    """
    levels = torch.tensor([tag_level(t) for t in tags])
    wrong = torch.zeros(len(tags), int(levels.max()))       # wrong answer tokens (example, step k)
    for b in batches:
        m, S = b.answer_mask, len(b.step_y)                  # S: the longest chain in the batch
        ids = b.answer_id[m]
        o = model.head_outputs(model.trunk(b.x), S)[:, m]   # o_k on answer tokens, (S, n, C)
        for k in range(S):
            miss = model.unembed(o[k]).argmax(-1) != b.step_y[k][m]
            wrong[:, k].index_add_(0, ids.cpu(), miss.float().cpu())
    exact = wrong == 0
    return {L: exact[levels == L, :L].float().mean(0).tolist() for L in sorted(set(levels.tolist()))}


def level_table(reading):
    """level_reading's result (its keys ints or strings) as lines of a table."""
    long = next(iter(reading.values()))["long"]
    head = ("level", "n", "step 1", "K'=L", f"K'={long}", "exit", "steps")
    lines = ["{:>14}{:>6}{:>8}{:>8}{:>8}{:>8}{:>7}".format(*head)]
    for L, r in reading.items():
        cells = "".join(f"{r[k]:8.4f}" for k in ("step_1", "at_L", "at_long", "exit"))
        lines.append(f"{L:>14}{r['n']:>6}{cells}{r['exit_steps']:7.2f}")
    return lines


def hop_table(reading):
    """hop_reading's result as lines of a table: one row per level L, step k's exact match for k = 1..L."""
    top = max(reading)
    lines = [f"{'level':>14}" + "".join(f"{'k=' + str(k):>8}" for k in range(1, top + 1))]
    return lines + [f"{L:>14}" + "".join(f"{v:8.4f}" for v in em) for L, em in reading.items()]

# -----------------------------------------------------------------------------
# train.py's eval sets and eval records


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
    """An eval record's metrics, from eval_sets: fluency_loss, readout_scale, answer_exact_match,
    answer_token_acc (per step), step_K_beats_1, task_exact_match ({task: per step}) and, where examples have
    levels, level_exact_match ({level: level_reading's}), those of the sets there are."""
    rec = {}
    if fluency_val is not None:
        rec.update(evaluate_fluency(model, fluency_val, n_steps, world))
    if reasoning_val is not None:
        r = evaluate_reasoning(model, reasoning_val, n_steps, n_examples, world)
        r["task_exact_match"] = per_task(r.pop("per_example_exact").cpu(), tags)
        reading = level_reading(model, reasoning_val, tags, LONG_STEPS if n_steps else 0, world=world)
        rec.update(r, **({"level_exact_match": {str(L): v for L, v in reading.items()}} if reading else {}))
    return rec


def format_eval(rec):
    """An eval record as a table: one column per step k."""
    K = len(rec.get("fluency_loss") or rec.get("answer_exact_match"))
    lines = [f"eval @ iter {rec['iter']} ({rec['tokens'] / 1e6:.2f}M tokens)",
             f"{'':>14}" + "".join(f"{'k=' + str(k + 1):>8}" for k in range(K))]
    for key, label in (("fluency_loss", "fluency loss"), ("readout_scale", "‖W_out z‖/‖h‖"),
                       ("answer_exact_match", "answer EM"), ("answer_token_acc", "answer tok acc")):
        if key in rec:
            lines.append(f"{label:>14}" + "".join(f"{v:8.4f}" for v in rec[key]))
    for tag, em in rec.get("task_exact_match", {}).items():
        lines.append(f"{'EM ' + tag:>14}" + "".join(f"{v:8.4f}" for v in em))
    if "step_K_beats_1" in rec:
        lines.append(f"step K beats step 1 on {100 * rec['step_K_beats_1']:.1f}% of answer tokens")
    if rec.get("level_exact_match"):
        lines += ["exact match per level: at step 1, at K' = L, at one large K', at adaptive exit (steps):",
                  *level_table(rec["level_exact_match"])]
    return "\n".join(lines)


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
