"""
The depth experiment: does step K beat step 1 where the trunk runs out of layers, and does thinking longer
at test time (K' > K) help? Trains every variant x 3 seeds, writes results/<suite>/<suite>.md and plots
(README "Results").

    python experiments/depth.py                 # 9 variants x 3 seeds on config/train_depth.py
                                                # (README: the time)
    python experiments/depth.py --quick=True    # 1 seed, a quarter of the steps (results/depth-quick):
                                                # a pipeline check
    python experiments/depth.py --suite=steps   # steps that earn their keep:
                                                # objective x head on config/train_steps.py

Every run sees the same data for the same steps (the depth preset: in-context lookups hopo:1-3 and the
fixed-map control iter:2; the steps preset: hopo:1-3); only the overrides of the variants change (the
curriculum arms draw the same examples of fewer levels early on: CURRICULUM). Then every
checkpoint is evaluated on the suite's eval tasks, the held-out prompts of the trained tasks and of counts
never trained on (depth: hopo:4, iter:1, iter:3; steps: hopo:4..7):
  - exact match at every test-time step K' = 0..3K: step k's logits do not depend on how many steps follow,
    so one pass with 3K steps gives the whole curve, and K' = 0 is the trunk alone;
  - necessity: the same checkpoint with the latent state's path to the logits cut at the readout,
    o_k = h_t + W_out·z̃_k with z̃_k = 0 (zero) or z_k of a random other position of the row (shuffle).
An answer is read at step K (depth) or at K' = its level L (steps: one step per hop, read_step).
The two plain GPTs get the extra FLOPs of the costliest head in the trunk: more layers, or a wider trunk,
whichever count or width matches best (matched_gpts). Runs are reused like ablation.py's.
"""

import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # the project root: train.py, model.py, ... import from here

import data  # noqa: E402 (after the root is on sys.path)
from checkpoint import build_model, saved_config
from configurator import ConfigError, configure
from evaluate import evaluate_reasoning, exact_match_curve, per_task
from records import pyplot
from ablation import (FIXED_K, cached, fmt, machine, mean_std, parse_seeds, pick_variants, run_config,
                      run_dir, run_records, task_table, train_config, train_run, wall_time)
from sample import load_checkpoint
from tasks import answer_step, parse_tasks

DEFAULTS = dict(
    suite="depth",                   # 'depth' (the depth experiment) | 'steps' (SUITES: steps that earn their
                                     # keep, README "Steps that earn their keep")
    quick=False,                     # 1 seed, a quarter of the steps, into results/<suite>-quick
    out="",                          # '' = results/<suite>, or results/<suite>-quick with quick=True
    preset="",                       # the config every variant overrides; '' = the suite's
    jobs=2,                          # runs in parallel, one thread each
    variants="",                     # comma-separated names; '' = all of the suite's variants
    seeds="0,1,2",                   # comma-separated seeds (quick=True: 0)
    report="",                       # the report's file name in out; '' = <suite>.md
    iters=0,                         # steps per run; 0 = the preset's max_iters (a quarter with quick=True)
    eval_per_task=400,               # held-out examples per task of the suite's eval tasks
)

# config/train_steps.py trains random K (compose.py's winner); its suite and compose.py run on its old fixed K
FIXED_BASE = [FIXED_K, "--beyond_chain=stay"]
# suite: (preset, eval tasks, overrides before each variant's); never trained: hopo:4, iter:1/3; hopo:4..7
SUITES = {
    "depth": ("config/train_depth.py", "hopo:1,hopo:2,hopo:3,hopo:4,iter:1,iter:2,iter:3", []),
    "steps": ("config/train_steps.py", "hopo:1,hopo:2,hopo:3,hopo:4,hopo:5,hopo:6,hopo:7", FIXED_BASE),
}
EVAL_TASKS = SUITES["depth"][1]
RANDOM_K = "--n_steps_dist=uniform"  # recurrent-depth training: K ~ U{1..2K-1} per optimizer step, mean K
HEADS = {  # name: (what it is, overrides of the preset); the preset trains a fixed K
    "none": ("position-wise head (the method as written), fixed K", ["--head_attn=none"]),
    "trunk": ("head attends to the trunk's h, fixed K", ["--head_attn=trunk"]),
    "latent": ("head attends to the latents z_{k-1}, fixed K", ["--head_attn=latent"]),
    "none_rk": ("position-wise head, random K", ["--head_attn=none", RANDOM_K]),
    "trunk_rk": ("head attends to h, random K", ["--head_attn=trunk", RANDOM_K]),
    "latent_rk": ("head attends to z_{k-1}, random K", ["--head_attn=latent", RANDOM_K]),
}
GPT_ONLY = ["--n_steps=0", "--lambda_rl=0.0", "--lambda_imp=0.0"]
# the steps suite: objective x head on config/train_steps.py's fixed-K base (per-step targets f^1..f^3, no
# stop, no soft RL)
PAPER = ["--step_targets=final", "--lambda_rl=0.5", "--lambda_imp=0.1"]   # the paper's recipe
# the curriculum over levels L_1 < ... < L_n: L_1 alone, then L_j joins at (j − 1)·3/16 of the run (hopo:2 at
# 3,000 and hopo:3 at 6,000 of the steps preset's 16,000 iterations); main fills in curriculum_stages'
CURRICULUM = "--curriculum_iters={stages}"


def curriculum_stages(cfg, max_iters):
    """CURRICULUM's iterations for cfg's reasoning levels and a budget of max_iters: 'i_1,...,i_{n-1}'."""
    levels = sorted({level for _, level in parse_tasks(cfg["reasoning_tasks"])})
    return ",".join(str(3 * j * max_iters // 16) for j in range(1, len(levels)))


STEP_ARMS = {
    "chain_trunk": ("per-step targets f^k, no stop, head attends to h", ["--head_attn=trunk"]),
    "chain_trunk_w100": ("per-step targets f^k, no stop, answer weight ω = 100 (the answer ~84% of L_DS), "
                         "attends to h", ["--head_attn=trunk", "--answer_weight=100.0"]),
    "chain_latent": ("per-step targets f^k, no stop, head attends to z_{k-1}", ["--head_attn=latent"]),
    "chain_none": ("per-step targets f^k, no stop, position-wise head", ["--head_attn=none"]),
    "stop_trunk": ("per-step targets f^1..f^L, then f^L (a stop at the level), attends to h",
                   ["--head_attn=trunk", "--step_targets=chain"]),
    "curric_trunk": ("per-step targets f^k, no stop, the curriculum over levels (chains cut at the stage's "
                     "highest level), attends to h", ["--head_attn=trunk", CURRICULUM]),
    "stop_curric_trunk": ("per-step targets f^1..f^L, then f^L (a stop at the level), the curriculum, "
                          "attends to h", ["--head_attn=trunk", "--step_targets=chain", CURRICULUM]),
    "curric_sg_trunk": ("per-step targets f^k, no stop, the curriculum, steps 2..K's losses kept out of "
                        "the trunk at the readout (readout_grad=first), attends to h",
                        ["--head_attn=trunk", CURRICULUM, "--readout_grad=first"]),
    "curric_latent": ("per-step targets f^k, no stop, the curriculum, attends to z_{k-1}",
                      ["--head_attn=latent", CURRICULUM]),
    "curric_none": ("per-step targets f^k, no stop, the curriculum, position-wise",
                    ["--head_attn=none", CURRICULUM]),
    "paper_curric_trunk": ("the paper's recipe with the curriculum, attends to h",
                           ["--head_attn=trunk", *PAPER, CURRICULUM]),
    "gpt_curric": ("plain GPT, K = 0, the curriculum", [*GPT_ONLY, CURRICULUM]),
    "paper_trunk": ("the paper's recipe (answer at every step, soft RL, improvement penalty), attends to h",
                    ["--head_attn=trunk", *PAPER]),
    "paper_latent": ("the paper's recipe, head attends to z_{k-1}", ["--head_attn=latent", *PAPER]),
    "paper_none": ("the paper's recipe, position-wise head", ["--head_attn=none", *PAPER]),
    "final_trunk": ("answer at every step, deep supervision only, attends to h",
                    ["--head_attn=trunk", "--step_targets=final"]),
    "level_trunk": ("difficulty-matched: the answer at step L only, attends to h",
                    ["--head_attn=trunk", "--step_targets=final", "--level_steps=at"]),
}


def model_flops(cfg, **changes):
    """Training FLOPs per token of cfg's model with some keys changed (built from scratch on the meta device:
    a resumed run's saved config says init_from='resume' and names no checkpoint to build from)."""
    c = cfg | {"init_from": "scratch"} | changes
    with torch.device("meta"):
        model = build_model(c, data.get_tokenizer(c["tokenizer"], c["tokenizer_file"]), None)
    return model.flops_per_token(seq_len=c["block_size"])["total"]


def matched_gpts(cfg):
    """The two FLOP-matched plain GPTs: {'gpt_deep': n_layer, 'gpt_wide': n_embd} whose K = 0 FLOPs/token are
    closest (in ratio) to the costliest head variant's, the target."""
    target = max(model_flops(cfg, head_attn=a) for a in ("none", "trunk", "latent"))
    off = lambda f: abs(np.log(f / target))
    layers = min(range(cfg["n_layer"] + 1, 4 * cfg["n_layer"] + 1),
                 key=lambda n: off(model_flops(cfg, n_steps=0, n_layer=n)))
    step = 16 * cfg["n_head"] // np.gcd(16, cfg["n_head"])  # widths divisible by n_head and by 16
    widths = range(cfg["n_embd"] + step, 4 * cfg["n_embd"] + 1, step)
    width = min(widths, key=lambda w: off(model_flops(cfg, n_steps=0, n_embd=w)))
    return {"gpt_deep": layers, "gpt_wide": width}, target


def variants(cfg, suite="depth"):
    """{name: (what it is, overrides)}: the plain GPT, the two FLOP-matched GPTs, and HEADS (the depth suite)
    or STEP_ARMS (the steps suite)."""
    match, _ = matched_gpts(cfg)
    return {
        "gpt": ("plain GPT, K = 0", GPT_ONLY),
        "gpt_deep": (f"GPT, {match['gpt_deep']} layers (FLOP-matched)",
                     [*GPT_ONLY, f"--n_layer={match['gpt_deep']}"]),
        "gpt_wide": (f"GPT, {match['gpt_wide']} wide (FLOP-matched)",
                     [*GPT_ONLY, f"--n_embd={match['gpt_wide']}"]),
        **(HEADS if suite == "depth" else STEP_ARMS),
    }


def cut_latent(model, how, seed=0):
    """The necessity check: model.head_outputs with the latent state's path to the logits cut at the readout,
    o_k = h_t + W_out·z̃_k, z̃_k = 0 ('zero') or z_k of a random other position of the row ('shuffle')."""
    head, gen = model.latent_head, torch.Generator().manual_seed(seed)

    def head_outputs(h, K, grad_steps=None):
        _, z = head(h, K, return_latents=True)                      # z_0..z_K, (K+1, B, T, D)
        z = z[1:]
        z = torch.zeros_like(z) if how == "zero" else z[:, :, torch.randperm(z.size(2), generator=gen)]
        return head.readout(h, z)                                   # o_1..o_K, (K, B, T, C)
    return head_outputs


def held_out(cfg, tok, n_per_task, eval_tasks):
    """(batches, tags): n_per_task held-out examples of each of eval_tasks, one per row, for cfg's run."""
    suite = data.ReasoningData("synthetic", tok, cfg["block_size"], tasks=eval_tasks)
    n = n_per_task * len(suite.tasks)
    return suite.eval_batches(cfg["batch_size"], n), suite.eval_tags(n)


@torch.no_grad()
def curve_and_cuts(model, batches, tags, n_steps):
    """{'curve': {task: exact match at K' = 0..n_steps}, 'zero'/'shuffle': {task: exact match at K' =
    1..n_steps with the readout cut}, 'beats': the step_K_beats_1 rate at K}; a GPT (K = 0): K' = 0 only."""
    K = model.config.n_steps
    res = {"K": K, "curve": exact_match_curve(model, batches, n_steps if K else 0, tags)[1]}
    if K == 0:
        return res
    res["beats"] = evaluate_reasoning(model, batches, K)["step_K_beats_1"]
    for how in ("zero", "shuffle"):
        model.head_outputs = cut_latent(model, how)     # an instance attribute shadows GPT.head_outputs ...
        res[how] = per_task(evaluate_reasoning(model, batches, n_steps)["per_example_exact"], tags)
        del model.head_outputs                          # ... until deleted
    return res


def evaluate_run(out_dir, n_per_task, eval_tasks=EVAL_TASKS):
    """curve_and_cuts at K' = 0..3K of out_dir's checkpoint on eval_tasks' held-out examples."""
    model, cfg, tok = load_checkpoint(out_dir, "cpu")
    return curve_and_cuts(model, *held_out(cfg, tok, n_per_task, eval_tasks), 3 * model.config.n_steps)


def read_step(suite, task, K):
    """The test-time step K' an answer of task ('hopo:3', as the data tags it) is read at: K for the depth
    suite (and 0 for a GPT); for the steps suite its level (one step per hop), at most 3K."""
    (_, level), = parse_tasks(task)
    return answer_step(level, 3 * K) if suite == "steps" and K else K


def summarize(out_dir, settings, evaluate=evaluate_run, name="depth_eval.json"):
    """One run: evaluate(out_dir, **settings), cached in name next to the checkpoint (ablation.cached), and
    its cost."""
    res = cached(out_dir, name, settings, evaluate)
    train_recs, evals = run_records(out_dir)
    cfg = saved_config(run_config(out_dir)[0])   # in today's keys; a run from before a key: what it ran
                                                 # (gelu='tanh')
    tokens_per_s = float(np.median([r["tokens_per_s"] for r in train_recs]))
    return res | {"flops": model_flops(cfg), "tokens_per_s": tokens_per_s, "evals": evals}


def write_report(path, cfg, names, summaries, seeds, wall, argv):
    suite, tasks = cfg["suite"], SUITES[cfg["suite"]][1].split(",")
    heads = {n: runs for n, runs in summaries.items() if runs[0]["K"] > 0}
    K = next(iter(heads.values()))[0]["K"] if heads else 0
    base = summaries["gpt"][0]["flops"] if "gpt" in summaries else None
    n_per_task = next(iter(summaries.values()))[0]["settings"]["n_per_task"]
    trained = train_config([cfg["preset"]])["reasoning_tasks"].split(",")
    step = lambda r, t: read_step(suite, t, r["K"])                  # the K' an answer is read at
    title = "RLRP depth experiment" if suite == "depth" else "RLRP: steps that earn their keep"
    lines = [f"# {title}\n",
             f"`python {' '.join(['experiments/depth.py', *argv])}` · "
             f"{' '.join([cfg['preset'], *SUITES[suite][2]])} · "
             f"{cfg['max_iters']} steps · seeds {seeds} · {machine()} · "
             f"{wall} · mean ± std over seeds · {n_per_task} held-out examples "
             "per task\n",
             "Exact match (EM), teacher-forced (identical to greedy decoding). Never trained on: "
             f"{', '.join(t for t in tasks if t not in trained)}.\n",
             "| variant | what | FLOPs/token | vs gpt | tokens/s (2 jobs) |",
             "| --- | --- | --- | --- | --- |"]
    for name, runs in summaries.items():
        ratio = f"{runs[0]['flops'] / base:.2f}×" if base else ""
        lines.append(f"| {name} | {names[name][0]} | {runs[0]['flops'] / 1e6:.2f}M | {ratio} "
                     f"| {mean_std([r['tokens_per_s'] for r in runs])[0]:.0f} |")
    if suite == "steps":
        lines += task_table("Exact match at the answer step K' = L, the level (K' = 0 for the GPTs)",
                            summaries, tasks, lambda r, t: r["curve"][t][step(r, t)])
    lines += task_table("Exact match at step K (K' = 0 for the GPTs)", summaries, tasks,
                        lambda r, t: r["curve"][t][r["K"]])
    if heads:
        lines += task_table("Exact match at step 1", heads, tasks, lambda r, t: r["curve"][t][1])
        lines += task_table("Step K minus step 1", heads, tasks,
                            lambda r, t: r["curve"][t][K] - r["curve"][t][1])
        if suite == "steps":
            lines += task_table("Best test-time K' = 1..3K (chosen on the held-out set: an upper bound)",
                                heads, tasks, lambda r, t: max(r["curve"][t][1:]))
        lines += ["\n## step_K_beats_1: answer tokens where ℓ_K < ℓ_1\n", "| variant | rate |",
                  "| --- | --- |"]
        lines += [f"| {n} | {fmt([r['beats'] for r in runs])} |" for n, runs in heads.items()]
        lines += necessity_table(heads, tasks, step)
        lines += curve_table(heads, tasks)
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def necessity_table(heads, tasks, step):
    """EM at the read step K' = step(run, task) as trained, with the latent readout zeroed or shuffled, and
    K' = 0 (the trunk alone)."""
    lines = ["\n## Necessity: the same checkpoints at the read step, latent readout cut\n",
             "| variant | test | " + " | ".join(tasks) + " |", "| --- | --- |" + " --- |" * len(tasks)]
    tests = {"as trained": lambda r, t: r["curve"][t][step(r, t)],
             "z zeroed": lambda r, t: r["zero"][t][step(r, t) - 1],
             "z shuffled": lambda r, t: r["shuffle"][t][step(r, t) - 1],
             "K' = 0": lambda r, t: r["curve"][t][0]}
    for name, runs in heads.items():
        for test, value in tests.items():
            lines.append(f"| {name} | {test} | " + " | ".join(f"{np.mean([value(r, t) for r in runs]):.3f}"
                                                         for t in tasks) + " |")
    return lines


def curve_table(heads, tasks):
    """Mean exact match at each test-time K' of the runs' curves, one row per variant and task."""
    width = len(next(iter(heads.values()))[0]["curve"][tasks[0]])
    lines = ["\n## Test-time steps K' (mean over seeds)\n", "| variant | task | " +
             " | ".join(f"K'={k}" for k in range(width)) + " |", "| --- | --- |" + " --- |" * width]
    for name, runs in heads.items():
        for t in tasks:
            curve = np.mean([r["curve"][t] for r in runs], axis=0)
            lines.append(f"| {name} | {t} | " + " | ".join(f"{v:.2f}" for v in curve) + " |")
    return lines


def plot(root, summaries, suite="depth"):
    """<suite>_vs_test_k.png (the main figure) and <suite>_over_training.png; skipped without matplotlib."""
    plt = pyplot()
    if plt is None:
        print("matplotlib is not installed: no plots (pip install matplotlib)")
        return
    plot_test_k(plt, os.path.join(root, f"{suite}_vs_test_k.png"), summaries, SUITES[suite][1].split(","))
    plot_training(plt, root, summaries, suite)


def style(name, i):
    """One colour per variant; random-K heads and the paper's recipe dashed."""
    return dict(color=f"C{i % 10}", ls="--" if name.endswith("_rk") or name.startswith("paper") else "-",
                label=name)


def panels(plt, n):
    """(figure, axes (2, cols)): n panels of held-out exact match on two rows, the spare ones hidden."""
    cols = -(-n // 2)
    fig, axes = plt.subplots(2, cols, figsize=(3.2 * cols, 6.4), sharey=True, squeeze=False)
    for ax in axes[:, 0]:
        ax.set(ylabel="held-out exact match")
    for ax in axes.flat[n:]:
        ax.axis("off")
    return fig, axes


def plot_test_k(plt, png, summaries, tasks):
    """Exact match vs test-time K', one panel per task, into png; the GPTs as dotted levels."""
    fig, axes = panels(plt, len(tasks))
    for ax, t in zip(axes.flat, tasks):
        for i, (name, runs) in enumerate(summaries.items()):
            curve = np.mean([r["curve"][t] for r in runs], axis=0)
            if runs[0]["K"] == 0:   # a GPT: one value, drawn as a level
                ax.axhline(curve[0], **(style(name, i) | dict(ls=":")))
            else:
                ax.plot(range(len(curve)), curve, marker=".", **style(name, i))
        ax.set(title=t, xlabel="test-time steps K'")
    axes[0, -1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(png, dpi=110)


def plot_training(plt, root, summaries, suite):
    """Exact match at the read step over training, one panel per trained task (train.py's periodic
    evaluations: K' <= K)."""
    trained = list(next(iter(summaries.values()))[0]["evals"][-1]["task_exact_match"])
    fig, axes = plt.subplots(1, len(trained), figsize=(3.2 * len(trained), 3.4), sharey=True)
    for ax, t in zip(np.atleast_1d(axes), trained):
        for i, (name, runs) in enumerate(summaries.items()):
            its = [e["iter"] for e in runs[0]["evals"]]
            k = max(read_step(suite, t, runs[0]["K"]), 1) - 1           # the read step's index in the record
            em = np.mean([[e["task_exact_match"][t][k] for e in r["evals"]] for r in runs], axis=0)
            ax.plot(its, em, **style(name, i))
        ax.set(title=f"{t} ({'step K' if suite == 'depth' else 'its answer step'})", xlabel="training step")
    np.atleast_1d(axes)[0].set(ylabel="held-out exact match")
    np.atleast_1d(axes)[-1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(root, f"{suite}_over_training.png"), dpi=110)


def parse_args(argv):
    """(config, {name: (what, overrides)}) from DEFAULTS and argv (--key=value), with the suite's preset
    when preset=''; bad values: ConfigError."""
    c = configure(DEFAULTS, argv, doc=__file__)
    if c["suite"] not in SUITES:
        raise ConfigError(f"suite must be one of {', '.join(SUITES)}, got {c['suite']!r}")
    if c["jobs"] < 1 or c["iters"] < 0 or c["eval_per_task"] < 1:
        raise ConfigError(f"jobs and eval_per_task must be >= 1 and iters >= 0, got jobs={c['jobs']}, "
                          f"iters={c['iters']}, eval_per_task={c['eval_per_task']}")
    c["seeds"] = [0] if c["quick"] else parse_seeds(c["seeds"])
    c["preset"] = c["preset"] or SUITES[c["suite"]][0]
    all_variants = variants(train_config([c["preset"]]), c["suite"])
    names = pick_variants(c["variants"], all_variants, all_variants)
    return c, {n: all_variants[n] for n in names}


def main(argv):
    c, names = parse_args(argv)
    suite, seeds, eval_tasks = c["suite"], c["seeds"], SUITES[c["suite"]][1]
    out = c["out"] or f"results/{suite}" + ("-quick" if c["quick"] else "")
    preset = train_config([c["preset"]])
    c["max_iters"] = c["iters"] or (preset["max_iters"] // 4 if c["quick"] else preset["max_iters"])
    t0 = time.time()
    torch.set_num_threads(1)  # the evaluations run c["jobs"] at a time, like the training runs
    with ThreadPoolExecutor(c["jobs"]) as pool:  # the slowest (the heads) first: the jobs end together
        jobs = [(n, s) for s in seeds for n in reversed(names)]
        stages = curriculum_stages(preset, c["max_iters"])
        trained = sum(future.result() for future in [
            pool.submit(train_run, run_dir(out, n, s), c["preset"],
                        [*SUITES[suite][2], *(o.format(stages=stages) for o in names[n][1])], s,
                        c["max_iters"]) for n, s in jobs])
        settings = dict(n_per_task=c["eval_per_task"], eval_tasks=eval_tasks)
        summaries = dict(zip(names, pool.map(
            lambda n: [summarize(run_dir(out, n, s), settings) for s in seeds], names)))
    report = os.path.join(out, c["report"] or f"{suite}.md")
    write_report(report, c, names, summaries, seeds, wall_time(t0, trained, len(jobs)), argv)
    plot(out, summaries, suite)
    print(open(report).read())


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except ConfigError as e:
        sys.exit(f"experiments/depth.py: {e}")
