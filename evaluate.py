"""
Evaluation, per refinement step k, in one teacher-forced pass, summed over DDP ranks: fluency val loss,
and on held-out reasoning answers exact match, token accuracy and how often step K beats step 1. train.py
runs it every eval_interval; experiments.py reuses evaluate_reasoning (sample.py decodes greedily instead).
"""

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
        o = model.transformer.ln_f(model.refine(model.trunk(b.x), n_steps))   # (K', B, T, C)
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
