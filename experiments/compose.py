"""
The next experiment of README "Steps that earn their keep": do latent steps compose from final answers only,
can they run until done (stop by themselves), and does extrapolation hold in every seed? Trains every arm on
one task's levels 1-3, reads it on levels 1-7 (4-7 never trained) and writes results/compose/<task>.md with
two plots.

    python experiments/compose.py --task=hopo       # every arm, seed 0 -> results/compose/hopo.md + 2 plots
    python experiments/compose.py --task=root --variants=level_at,steps --seeds=0,1,2 --report=seeds.md

The tasks (TASKS): hopo, pointer chasing on an 8-cycle (f has no fixed point: a step past the answer takes
another hop), and root, the root of a node in a forest (the root is a fixed point: running on is harmless).
Every arm is config/train_steps.py (2 x 64 trunk, the trunk-attending head, K = 3, 32,000 iterations) on its
fixed-K base (FIXED_BASE: the preset trains random K, this experiment's winner) with the task's overrides and
the arm's (ARMS), and the preset's curriculum at the same fractions of any budget (levels 2 and 3 join at 3/16
and 6/16 of the run: depth.curriculum_stages). Each checkpoint is read on the held-out
prompts, eval_per_level of each level:
  - per level (evaluate.level_reading): exact match at step 1, at K' = L, at K' = 21 and at adaptive exit (a
    token stops once KL(p_k || p_{k-1}) < 0.01, at most 21 steps) with its mean steps; a GPT at K' = 0;
  - the curve over K' = 0..21, and necessity: K' = L with the latent readout zeroed (depth.cut_latent);
  - does step k take hop k: on the highest level read, step k's exact match against f^k(x), the k-th element
    of the chain (evaluate.hop_reading), which the final-answer arms are never trained on;
  - root: two shortcuts' exact match on the same prompts (tasks.root_shortcuts), beside the arms.
Every cell is mean ± std over seeds and the minimum over seeds: the targets hold "in every seed". The arms are
ranked on a validation draw, val_per_level of each level read, from the held-out side of the split (never
trained) and apart from the prompts the report gives (tasks.validation_set): never on what is reported. The
iterations until 0.9 on level 3 are train.py's own evals. Runs go to <out>/runs/<task>-<arm>-s<seed>/ and
are reused like depth.py's, with their evaluations (compose_eval.json, compose_hops.json next to the
checkpoint); a run stopped before its end (Ctrl-C, a signal, a crash) goes on from its last checkpoint.
results/compose/runs/ is committed without the weights: its records (metrics.jsonl, the two evaluations,
config.json) rebuild the reports in a minute, with no training (ablation.run_config).
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
from ablation import (cached, fmt, machine, mean_std, parse_seeds, pick_variants, run_dir, task_table,
                      train_config, train_run, wall_time)
from configurator import ConfigError, configure
from depth import (CURRICULUM, FIXED_BASE, PAPER, RANDOM_K, curriculum_stages, curve_and_cuts, curve_table,
                   held_out, panels, plot_test_k, style, summarize, variants)
from evaluate import EXIT_THRESHOLD, LONG_STEPS, chain_batches, hop_reading, level_reading
from records import pyplot
from sample import load_checkpoint
from tasks import parse_tasks, root_shortcuts, tag_level, validation_set

DEFAULTS = dict(
    task="hopo",                     # 'hopo' | 'root' (TASKS)
    variants="",                     # comma-separated arms; '' = DEFAULT_ARMS (all but the final-answer arms
                                     # with random K: run the best one by name)
    seeds="0",                       # comma-separated seeds
    out="",                          # '' = results/compose
    report="",                       # the report's file name in out; '' = <task>.md
    preset="config/train_steps.py",  # the config every arm overrides
    jobs=2,                          # runs in parallel, one thread each
    iters=0,                         # iterations per run; 0 = the preset's max_iters (the curriculum scales)
    eval_per_level=1000,             # held-out examples per level read (1..7)
    val_per_level=400,               # validation examples per level read (held-out side, not the reported
                                     # ones): the arms are ranked on them
)

TASKS = {  # task: (levels trained, levels read, beyond_chain of per-step random K, overrides for every arm)
    "hopo": ("1-3", "1-7", "none", []),                  # no fixed point: no target past f^3
    "root": ("1-3", "1-7", "stay", ["config/root.py"]),  # the root, a fixed point: f^3 stays; root's sizing
}                                                         # (answer weight, heads) for every arm, GPTs too
FINAL = "--step_targets=final"   # no per-step targets: the answer at every step it is supervised at
ARMS = {  # name: (what it is, overrides of the preset after the task's); {beyond}: the task's beyond_chain
    "paper": ("the paper's recipe: the final answer at every step, soft RL, improvement penalty", PAPER),
    "level_at": ("final answers, level-matched: an answer of level L at step L only (config/train_levels.py)",
                 [FINAL, "--level_steps=at"]),
    "level_from": ("final answers at the steps >= L", [FINAL, "--level_steps=from"]),
    "progressive": ("final answers at the steps >= L and Bansal et al.'s progressive loss, α = 0.5 (its "
                    "second pass trains step n + k on the answer where n + k >= L: train.Objective)",
                    [FINAL, "--level_steps=from", "--progressive_alpha=0.5"]),
    "steps": ("per-step targets f^1..f^3 at every level, no stop, fixed K", []),
    "steps_rk": ("per-step targets, random K ~ U{1..2K-1}; past f^3 the task's beyond_chain (the preset)",
                 [RANDOM_K, "--beyond_chain={beyond}"]),
}
FINAL_ARMS = ("level_at", "level_from", "progressive")
ARMS |= {f"{n}_rk": (f"{ARMS[n][0]}; random K ~ U{{1..2K-1}}", [*ARMS[n][1], RANDOM_K]) for n in FINAL_ARMS}
GPTS = ("gpt", "gpt_deep", "gpt_wide")   # depth.variants': the plain GPT and the two FLOP-matched ones
DEFAULT_ARMS = [*GPTS, "paper", *FINAL_ARMS, "steps", "steps_rk"]
HOPS_FILE = "compose_hops.json"   # evaluate_hops' cache, next to compose_eval.json
TARGET = 0.9   # "iterations until": the first in-run eval with this exact match on the highest trained level


def task_args(task):
    """The overrides every arm of task gets: the levels trained and read, and the task's own (a preset's path
    from the project root, so the command runs from anywhere)."""
    trained, read, _, more = TASKS[task]
    more = [os.path.join(ROOT, o) if o.endswith(".py") else o for o in more]
    return [f"--reasoning_tasks={task}:{trained}", f"--eval_tasks={task}:{read}", *more]


def arm_args(task, overrides, stages):
    """train.py's overrides for an arm of task: the preset's fixed-K base (FIXED_BASE), the task's, the arm's,
    and the curriculum at stages."""
    return [*FIXED_BASE, *task_args(task), *(o.format(beyond=TASKS[task][2]) for o in overrides),
            CURRICULUM.format(stages=stages)]

# -----------------------------------------------------------------------------
# one checkpoint's readings (cached in compose_eval.json by depth.summarize)


@torch.no_grad()
def evaluate_run(out_dir, eval_tasks, eval_per_level, val_per_level):
    """depth.curve_and_cuts at K' = 0..21 (the curve per level, the cut readouts) and level_reading on the
    held-out set ('levels') and on the validation draw ('validation'), each {level: its reading}."""
    model, cfg, tok = load_checkpoint(out_dir, "cpu")
    batches, tags = held_out(cfg, tok, eval_per_level, eval_tasks)
    long = LONG_STEPS if model.config.n_steps else 0                # a GPT: K' = 0 only
    val_batches, val_tags = validation(cfg, tok, eval_tasks, eval_per_level, val_per_level)
    return curve_and_cuts(model, batches, tags, long) | {"levels": level_reading(model, batches, tags, long),
                                                         "validation": level_reading(model, val_batches,
                                                                                     val_tags, long)}


@torch.no_grad()
def evaluate_hops(out_dir, eval_tasks, eval_per_level, val_per_level):
    """{'hops': evaluate.hop_reading on the held-out set} ({} for a GPT): per level L, does step k give
    f^k(x), k = 1..L. Cached apart from evaluate_run's readings (HOPS_FILE): added after runs had those;
    the settings are the same (val_per_level unused)."""
    model, cfg, tok = load_checkpoint(out_dir, "cpu")
    if not model.config.n_steps:
        return {"hops": {}}
    suite = data.ReasoningData("synthetic", tok, cfg["block_size"], tasks=eval_tasks)
    n = eval_per_level * len(suite.eval_tasks)
    tags = suite.eval_tags(n)
    batches = chain_batches(tok, cfg["block_size"], suite.eval_examples(n), tags, cfg["batch_size"])
    return {"hops": hop_reading(model, batches, tags)}


def validation(cfg, tok, eval_tasks, eval_per_level, val_per_level):
    """(batches, tags): the validation draw, val_per_level examples of each level read, from the held-out
    side of the split (never trained) and sharing no prompt with the eval_per_level of each level the report
    gives (tasks.validation_set): the arms are ranked on it, never on what is reported."""
    suite = data.ReasoningData("synthetic", tok, cfg["block_size"], tasks=eval_tasks)
    n = len(suite.eval_tasks)
    reported = {prompt for prompt, _ in suite.eval_examples(eval_per_level * n)}
    examples = validation_set(suite.eval_tasks, val_per_level * n, reported)
    return suite.batches_of(examples, cfg["batch_size"]), suite.eval_tags(val_per_level * n)


def shortcuts(cfg, n_per_level):
    """{shortcut: {tag: exact match}} of tasks.root_shortcuts on the held-out prompts the arms are read on."""
    tok = data.get_tokenizer(cfg["tokenizer"], cfg["tokenizer_file"])
    suite = data.ReasoningData("synthetic", tok, cfg["block_size"], tasks=cfg["eval_tasks"])
    n = n_per_level * len(suite.eval_tasks)
    examples, tags = suite.eval_examples(n), suite.eval_tags(n)
    hits = [{name: guess == answer for name, guess in root_shortcuts(prompt).items()}
            for prompt, answer in examples]
    return {name: {t: float(np.mean([h[name] for h, tag in zip(hits, tags) if tag == t]))
                   for t in dict.fromkeys(tags)} for name in hits[0]}

# -----------------------------------------------------------------------------
# the report


def in_every_seed(values):
    """A cell: mean ± std over the seeds, then the minimum over them."""
    return f"{fmt(values)} (min {min(values):.3f})"


def at_level(key):
    """value(run, tag) for ablation.task_table: level_reading's key at the tag's level (held-out set)."""
    return lambda r, t: r["levels"][str(tag_level(t))][key]


def header(c, arms, summaries, argv):
    """The report's title, its command and settings, and the arms with their exact overrides and cost."""
    cfg, base = c["cfg"], summaries["gpt"][0]["flops"] if "gpt" in summaries else None
    lines = [f"# RLRP: do latent steps compose? ({c['task']})\n",
             f"`python {' '.join(['experiments/compose.py', *argv])}` · {c['preset']} with "
             f"`{' '.join(arm_args(c['task'], [], c['stages'])).replace(ROOT + os.sep, '')}` · "
             f"{c['max_iters']} iterations · seeds "
             f"{c['seeds']} · {machine()} · {c['wall']} · {c['eval_per_level']} "
             f"held-out examples per level · {c['val_per_level']} validation examples per level\n",
             "Exact match (EM), teacher-forced (identical to greedy decoding), on held-out prompts; trained "
             f"on {cfg['reasoning_tasks']}, read on {cfg['eval_tasks']} (the levels above: never trained). "
             "Cells: mean ± std over seeds, then the minimum over seeds.\n",
             "| arm | what | overrides | FLOPs/token | vs gpt | tokens/s |",
             "| --- | --- | --- | --- | --- | --- |"]
    for name, runs in summaries.items():
        ratio = f"{runs[0]['flops'] / base:.2f}×" if base else ""
        overrides = " ".join(o.format(beyond=TASKS[c["task"]][2]) for o in arms[name][1])
        lines.append(f"| {name} | {arms[name][0]} | `{overrides}` | {runs[0]['flops'] / 1e6:.2f}M | {ratio} "
                     f"| {mean_std([r['tokens_per_s'] for r in runs])[0]:.0f} |")
    return lines


def ranking(summaries, task):
    """The validation table, best first by the mean over seeds of EM at K' = L averaged over the levels
    read, trained and never trained (a GPT at K' = 0)."""
    levels = list(next(iter(summaries.values()))[0]["validation"])
    tags = [f"{task}:{L}" for L in levels]
    score = lambda r: float(np.mean([r["validation"][L]["at_L"] for L in levels]))
    order = sorted(summaries, key=lambda n: -np.mean([score(r) for r in summaries[n]]))
    value = lambda r, t: score(r) if t == "mean" else r["validation"][str(tag_level(t))]["at_L"]
    title = "Validation ranking: EM at K' = L on the validation draw, not the reported prompts (best first)"
    return task_table(title, {n: summaries[n] for n in order}, [*tags, "mean"], value, in_every_seed)


def iterations_table(summaries, seeds, task, top):
    """The first in-run eval's iteration with EM >= TARGET at K' = L on level top (the highest trained), per
    seed, and in every seed (the last of them; '—': a seed never reached it)."""
    first = lambda evals: next((str(e["iter"]) for e in evals
                                if e["level_exact_match"][top]["at_L"] >= TARGET), "—")
    lines = [f"\n## Iterations until {TARGET} on {task}:{top} (train.py's evals: held-out set, K' = L)\n",
             "| arm | " + " | ".join(f"seed {s}" for s in seeds) + " | every seed |",
             "| --- |" + " --- |" * (len(seeds) + 1)]
    for name, runs in summaries.items():
        its = [first(r["evals"]) for r in runs]
        worst = "—" if "—" in its else str(max(map(int, its)))
        lines.append(f"| {name} | " + " | ".join(its) + f" | {worst} |")
    return lines


def hops_table(heads, tag):
    """Step k against f^k(x), k = 1..L, on the highest level read: does each step take one hop?"""
    L = tag_level(tag)
    title = (f"Does step k take hop k? EM of step k against f^k(x) on {tag}, teacher-forced (the "
             "final-answer arms are never trained on it)")
    return task_table(title, heads, [f"step {k}" for k in range(1, L + 1)],
                      lambda r, col: r["hops"][str(L)][int(col.split()[1]) - 1], in_every_seed)


def write_report(path, c, arms, summaries, argv):
    """The report: the header, the held-out tables per level (root: the shortcuts beside the arms), step k
    against hop k, the validation ranking, the iterations until TARGET and the test-time curve."""
    tags = list(next(iter(summaries.values()))[0]["curve"])
    heads = {n: runs for n, runs in summaries.items() if runs[0]["K"] > 0}
    lines = header(c, arms, summaries, argv)
    lines += task_table("EM at K' = L, the level (K' = 0 for the GPTs)", summaries, tags, at_level("at_L"),
                        in_every_seed)
    for name, em in (shortcuts(c["cfg"], c["eval_per_level"]) if c["task"] == "root" else {}).items():
        lines.append(f"| {name} (shortcut) | " + " | ".join(f"{em[t]:.3f}" for t in tags) + " |")
    if heads:
        lines += task_table("EM at step 1", heads, tags, at_level("step_1"), in_every_seed)
        lines += task_table(f"EM at K' = {LONG_STEPS}", heads, tags, at_level("at_long"), in_every_seed)
        lines += task_table(f"EM at adaptive exit (KL(p_k ‖ p_k−1) < {EXIT_THRESHOLD}, at most {LONG_STEPS} "
                            "steps)", heads, tags, at_level("exit"), in_every_seed)
        lines += task_table("Mean steps at adaptive exit", heads, tags, at_level("exit_steps"))
        lines += task_table("Necessity: EM at K' = L with the latent readout zeroed (z = 0)", heads, tags,
                            lambda r, t: r["zero"][t][tag_level(t) - 1], in_every_seed)
        lines += hops_table(heads, tags[-1])
    lines += ranking(summaries, c["task"])
    top = str(max(level for _, level in parse_tasks(c["cfg"]["reasoning_tasks"])))
    lines += iterations_table(summaries, c["seeds"], c["task"], top)
    if heads:
        lines += curve_table(heads, tags)
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")

# -----------------------------------------------------------------------------
# the plots, and the command


def plot(report, task, summaries):
    """<report>_vs_test_k.png (EM vs K' per level) and <report>_over_training.png, named after the report
    (hopo.md: hopo_vs_test_k.png) so that each report keeps its own; skipped without matplotlib."""
    plt = pyplot()
    if plt is None:
        print("matplotlib is not installed: no plots (pip install matplotlib)")
        return
    tags = list(next(iter(summaries.values()))[0]["curve"])
    stem = os.path.splitext(report)[0]
    plot_test_k(plt, f"{stem}_vs_test_k.png", summaries, tags)
    levels = list(next(iter(summaries.values()))[0]["evals"][-1]["level_exact_match"])
    fig, axes = panels(plt, len(levels))
    for ax, L in zip(axes.flat, levels):
        for i, (name, runs) in enumerate(summaries.items()):
            its = [e["iter"] for e in runs[0]["evals"]]
            em = np.mean([[e["level_exact_match"][L]["at_L"] for e in r["evals"]] for r in runs], axis=0)
            ax.plot(its, em, **style(name, i))
        ax.set(title=f"{task}:{L} at K' = L", xlabel="training step")
    axes[0, -1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(f"{stem}_over_training.png", dpi=110)


def parse_args(argv):
    """(config, {arm: (what, overrides)}) from DEFAULTS and argv (--key=value); bad values: ConfigError."""
    c = configure(DEFAULTS, argv, doc=__file__)
    if c["task"] not in TASKS:
        raise ConfigError(f"task must be one of {', '.join(TASKS)}, got {c['task']!r}")
    if c["jobs"] < 1 or c["iters"] < 0 or min(c["eval_per_level"], c["val_per_level"]) < 1:
        raise ConfigError(f"jobs, eval_per_level and val_per_level must be >= 1 and iters >= 0, got "
                          f"jobs={c['jobs']}, iters={c['iters']}, eval_per_level={c['eval_per_level']}, "
                          f"val_per_level={c['val_per_level']}")
    c["seeds"] = parse_seeds(c["seeds"])
    c["cfg"] = train_config([c["preset"], *task_args(c["task"])])    # what every arm starts from
    c["max_iters"] = c["iters"] or c["cfg"]["max_iters"]
    c["stages"] = curriculum_stages(c["cfg"], c["max_iters"])
    if "0" in c["stages"].split(","):
        raise ConfigError(f"iters={c['iters']} is too few for the curriculum (levels 2, 3 join at 3/16, 6/16 "
                          "of the run)")
    all_arms = {n: v for n, v in variants(c["cfg"], "steps").items() if n in GPTS} | ARMS
    return c, {n: all_arms[n] for n in pick_variants(c["variants"], all_arms, DEFAULT_ARMS)}


def main(argv):
    c, arms = parse_args(argv)
    task, seeds, out = c["task"], c["seeds"], c["out"] or "results/compose"
    run = lambda n, s: run_dir(out, f"{task}-{n}", s)
    settings = dict(eval_tasks=c["cfg"]["eval_tasks"], eval_per_level=c["eval_per_level"],
                    val_per_level=c["val_per_level"])
    t0 = time.time()
    torch.set_num_threads(1)  # the evaluations run c["jobs"] at a time, like the training runs
    with ThreadPoolExecutor(c["jobs"]) as pool:  # DEFAULT_ARMS reversed: the GPTs, the quickest, last
        trained = sum(future.result() for future in [
            pool.submit(train_run, run(n, s), c["preset"], arm_args(task, arms[n][1], c["stages"]), s,
                        c["max_iters"]) for s in seeds for n in reversed(arms)])
        summarized = lambda n: [summarize(run(n, s), settings, evaluate_run, "compose_eval.json")
                                | cached(run(n, s), HOPS_FILE, settings, evaluate_hops) for s in seeds]
        summaries = dict(zip(arms, pool.map(summarized, arms)))
    c["wall"] = wall_time(t0, trained, len(seeds) * len(arms))
    report = os.path.join(out, c["report"] or f"{task}.md")
    write_report(report, c, arms, summaries, argv)
    plot(report, task, summaries)
    print(open(report).read())


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except ConfigError as e:
        sys.exit(f"experiments/compose.py: {e}")
