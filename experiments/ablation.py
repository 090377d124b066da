"""
Does latent thinking help? Trains the ablation of README "Results" and writes results/ablation.md + plots.

    python experiments/ablation.py                # 7 variants x 3 seeds on config/train_cpu.py
                                                  # (83 min, 2 CPU cores)
    python experiments/ablation.py --quick=True   # 1 seed, a quarter of the steps (~8 min),
                                                  # into results/quick
    python experiments/ablation.py --sweep=True   # the preset with one default changed, 1 seed: sweep.md
                                                  # (18 min)

All variants share the trunk, the data mixture, the tokens seen, the seeds and the evaluation (the fixed
held-out synthetic eval set, never trained on: tasks.is_eval_prompt); only the overrides below change.
Runs go to <out>/runs/<variant>-s<seed>/; a finished run with the same configuration is reused, so an
interrupted ablation resumes.
"""

import json
import os
import platform
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # the project root: train.py, model.py, ... import from here

import train  # noqa: E402 (after the root is on sys.path)
from checkpoint import saved_config
from configurator import ConfigError, configure
from evaluate import exact_match_curve
from records import pyplot, read_metrics
from sample import load_checkpoint

DEFAULTS = dict(
    quick=False,                   # 1 seed, a quarter of the steps, into results/quick
    sweep=False,                   # 1 seed of the preset with one default changed (SWEEP): sweep.md, not
                                   # ablation.md
    out="",                        # '' = results, or results/quick with quick=True
    preset="config/train_cpu.py",  # the config every variant overrides
    jobs=2,                        # runs in parallel, one thread each
    variants="",                   # comma-separated names; '' = the ablation's 7 (ABLATION), or SWEEP with
                                   # sweep=True
    iters=0,                       # steps per run; 0 = the preset's max_iters (a quarter with quick=True)
)

TRAIN = os.path.join(ROOT, "train.py")
CONFIG = "config.json"   # a run's config beside its metrics.jsonl: reports it without weights (run_config)
FIXED_K = "--n_steps_dist=fixed"  # the preset trains with random K (README "Results"); the ablation does not
VARIANTS = {  # name: (what it is, overrides of the preset)
    "gpt": ("GPT baseline: K=0, plain CE, same mixture", [FIXED_K, "--n_steps=0", "--lambda_rl=0.0"]),
    "gpt_deeper": ("GPT +1 layer: extra compute in the trunk",
                   [FIXED_K, "--n_steps=0", "--lambda_rl=0.0", "--n_layer=5"]),
    "head_ds": ("+ latent head, deep supervision only (mixed batches)",
                [FIXED_K, "--routing=mixed", "--lambda_rl=0.0", "--lambda_imp=0.0"]),
    "routing": ("+ data-aware routing", [FIXED_K, "--lambda_rl=0.0", "--lambda_imp=0.0"]),
    "soft_rl": ("+ soft RL on answer spans", [FIXED_K, "--lambda_imp=0.0"]),
    "rlrp": ("+ improvement penalty (full RLRP)", [FIXED_K]),
    "rlrp_randk": ("full RLRP, K ~ U{1..2K-1} while training (the preset)", ["--n_steps_dist=uniform"]),
    # --sweep: the preset with one default changed, the evidence for the defaults (README "Results")
    "rlrp_k2": ("preset, K=2", ["--n_steps=2"]),
    "rlrp_k8": ("preset, K=8", ["--n_steps=8"]),
    "rlrp_d128": ("preset, head width D=128", ["--n_latent=128"]),
    "rlrp_w_uniform": ("preset, uniform step weights", ["--weight_schedule=uniform"]),
    "rlrp_rho75": ("preset, ρ=0.75", ["--reasoning_fraction=0.75"]),
    # sampled deep supervision against the preset it estimates (README "Performance"): run them by name
    "rlrp_sampled": ("preset, sampled deep supervision",
                     ["--n_steps_dist=uniform", "--sampled_supervision=True"]),
}
ABLATION = ["gpt", "gpt_deeper", "head_ds", "routing", "soft_rl", "rlrp", "rlrp_randk"]
SWEEP = ["rlrp_randk", "rlrp_k2", "rlrp_k8", "rlrp_w_uniform", "rlrp_rho75"]  # rlrp_d128: run it by name


def run_dir(root, name, seed):
    return os.path.join(root, "runs", f"{name}-s{seed}")


def parse_seeds(text):
    """'0,1,2' -> [0, 1, 2]; anything else: ConfigError."""
    try:
        seeds = [int(s) for s in str(text).split(",")]
    except ValueError:
        seeds = []
    if not seeds or len(set(seeds)) < len(seeds):   # a seed twice: two jobs would write one run folder
        raise ConfigError(f"seeds must be distinct comma-separated integers, got {text!r}")
    return seeds


def pick_variants(spec, valid, default):
    """The comma-separated names of spec ('' = default), each one of valid, none twice; else ConfigError."""
    names = spec.split(",") if spec else list(default)
    unknown = [n for n in names if n not in valid]
    if unknown:
        raise ConfigError(f"unknown variant(s) {unknown}; valid: {', '.join(valid)}")
    if len(set(names)) < len(names):
        raise ConfigError(f"variants={spec!r} names a variant twice")
    return names


def machine():
    """What a report names the machine by."""
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"


def run_records(out_dir):
    """(train records, eval records) of a run's metrics.jsonl."""
    recs = read_metrics(os.path.join(out_dir, "metrics.jsonl"))
    return [r for r in recs if r["type"] == "train"], [r for r in recs if r["type"] == "eval"]


def run_args(out_dir, preset, overrides, seed, max_iters):
    """train.py's arguments for one run: the preset, the variant's overrides, the seed and the step budget."""
    return [preset, *overrides, f"--seed={seed}", f"--out_dir={out_dir}", f"--max_iters={max_iters}",
            f"--lr_decay_iters={max_iters}", f"--eval_interval={max(1, max_iters // 6)}"]


def train_config(args):
    """train.py's checked config for these arguments (never a resume: an ablation run starts from scratch)."""
    return train.load_config(args)[0]


def run_config(out_dir):
    """(config, checkpoint) of a run: the config it trained with, as saved (checkpoint.saved_config turns it
    into today's keys), from its checkpoint, else from CONFIG, the record of a folder kept without its
    weights; (None, None) when it holds neither. A checkpoint's config is written to CONFIG as well, so that
    a run folder copied without its *.pt files (results/compose/runs/, committed) still reports."""
    try:
        ckpt = torch.load(os.path.join(out_dir, "ckpt.pt"), map_location="cpu", weights_only=False)
    except FileNotFoundError:
        path = os.path.join(out_dir, CONFIG)
        if not os.path.exists(path):
            return None, None
        with open(path) as f:
            return json.load(f), None
    with open(os.path.join(out_dir, CONFIG), "w") as f:
        json.dump(ckpt["config"], f, indent=1)
    return ckpt["config"], ckpt


def run_state(out_dir, args):
    """'done' when out_dir holds a completed run of exactly the configuration asked for now (its checkpoint,
    or its records without it: run_config); 'stopped' when it holds one stopped before its end (a signal or a
    crash: its last checkpoint goes on with init_from=resume, which is exact); None when it holds nothing of
    that configuration. Records kept without weights (results/compose/runs/) of another configuration:
    ConfigError, since training this one into out_dir would overwrite the only copy of them."""
    saved, ckpt = run_config(out_dir)
    if saved is None:
        return None
    # a key added to train.py after the run was written: the run trained with its default, or with what every
    # run did before the key came (checkpoint.saved_config: gelu='tanh'; chain_length -> step_targets)
    ran, asked = {**train.DEFAULTS, **saved_config(saved)}, train_config(args)
    if ran["init_from"] == "resume":   # a resumed run is the run it resumed (ablation runs start afresh)
        ran["init_from"] = asked["init_from"]
    ran["out_dir"] = asked["out_dir"]  # a run folder moved or copied (results/compose/runs/) is the same run
    if ran != asked:
        if ckpt is None:
            differ = sorted(k for k in {**ran, **asked} if ran.get(k) != asked.get(k))
            raise ConfigError(f"{out_dir} holds the records, without weights, of a run with other values "
                              f"of {', '.join(differ)}: ask for that run, or move the folder away")
        return None
    evals = run_records(out_dir)[1]
    if evals and evals[-1]["iter"] == saved["max_iters"]:
        return "done"
    return "stopped" if ckpt and ckpt["iter_num"] < saved["max_iters"] else None


def train_run(out, preset, overrides, seed, max_iters, threads=1):
    """One training run in its own process (train.py exactly as a user runs it) into out; reused when already
    done with the same configuration, resumed from its checkpoint when it was stopped before its end. Returns
    whether it trained (False: reused)."""
    args = run_args(out, preset, overrides, seed, max_iters)
    state = run_state(out, args)
    if state == "done":
        return False
    os.makedirs(out, exist_ok=True)
    if state == "stopped":
        args = ["--init_from=resume", f"--out_dir={out}"]
    with open(os.path.join(out, "log.txt"), "a" if state else "w") as log:
        subprocess.run([sys.executable, TRAIN, *args], check=True, stdout=log, stderr=subprocess.STDOUT,
                       env=dict(os.environ, OMP_NUM_THREADS=str(threads)))
    return True


def wall_time(t0, trained, runs):
    """The report's cost line: this command's wall time since t0, and how many of its runs it trained (a
    report written again from finished runs costs minutes, not the hours its runs took)."""
    minutes = (time.time() - t0) / 60
    return f"wall time {minutes:.1f} min ({trained} of {runs} runs trained by it, the rest reused)"


def cached(out_dir, name, settings, evaluate):
    """evaluate(out_dir, **settings) with its settings, kept in out_dir/name (JSON) next to the run's
    checkpoint: evaluated again only when the checkpoint is newer or the settings differ. A run kept without
    its checkpoint (run_config) is read from name alone; with other settings: ConfigError."""
    path, ckpt, res = os.path.join(out_dir, name), os.path.join(out_dir, "ckpt.pt"), None
    if os.path.exists(path) and (not os.path.exists(ckpt) or os.path.getmtime(path) > os.path.getmtime(ckpt)):
        with open(path) as f:
            res = json.load(f)
    if res is None or res.get("settings") != settings:
        if not os.path.exists(ckpt):
            raise ConfigError(f"{out_dir} holds a run's records without its weights (ckpt.pt), evaluated "
                              f"with {res and res.get('settings')}, not {settings}: ask for those settings, "
                              "or delete the folder to train the run again")
        # through JSON: a fresh evaluation reads as a cached one does (string keys, lists)
        res = json.loads(json.dumps(evaluate(out_dir, **settings) | {"settings": settings}))
        with open(path, "w") as f:
            json.dump(res, f)
    return res


def summarize_run(out_dir):
    """One run's figures for the report, and its test-time curve: teacher-forced exact match (= greedy
    decoding's) for every K' = 0..2K on the run's own held-out eval set."""
    train_recs, evals = run_records(out_dir)
    model, cfg, _ = load_checkpoint(out_dir, "cpu")
    batches = train.load_data(cfg)[2].eval_batches(cfg["batch_size"], cfg["eval_examples"])
    last = evals[-1]
    return {
        "params": model.get_num_params(),
        "flops_per_token": model.flops_per_token(seq_len=cfg["block_size"])["total"],
        "tokens_per_s": float(np.median([r["tokens_per_s"] for r in train_recs])),
        "fluency_loss": last["fluency_loss"][-1],
        "em_first": last["answer_exact_match"][0],
        "em_last": last["answer_exact_match"][-1],
        "task_em": {t: v[-1] for t, v in last["task_exact_match"].items()},
        "task_em_first": {t: v[0] for t, v in last["task_exact_match"].items()},
        "curve": exact_match_curve(model, batches, 2 * model.config.n_steps)[0],
        "evals": evals,
    }


def mean_std(values):
    v = np.array(values, dtype=float)
    return v.mean(), (v.std(ddof=1) if len(v) > 1 else 0.0)


def fmt(values, digits=3):
    m, s = mean_std(values)
    return f"{m:.{digits}f} ± {s:.{digits}f}"


def mean_curve(runs):
    """The test-time curve averaged over a variant's seeds."""
    return np.mean([r["curve"] for r in runs], axis=0)


def task_table(title, summaries, tasks, value, cell=fmt):
    """Markdown lines: one row per variant, one column per task of cell (`mean ± std`) of value(run summary,
    task) over the variant's runs."""
    lines = [f"\n## {title}\n", "| variant | " + " | ".join(tasks) + " |", "| --- |" + " --- |" * len(tasks)]
    for name, runs in summaries.items():
        lines.append(f"| {name} | " + " | ".join(cell([value(r, t) for r in runs]) for t in tasks) + " |")
    return lines


COLUMNS = ("variant", "what", "params", "FLOPs/token", "tokens/s", "fluency val loss", "EM step 1",
           "EM step K")  # the report's main table


def write_report(path, preset, summaries, seeds, wall, max_iters, argv=None):
    """The main table, exact match per task, and the test-time curve, as markdown; argv: the command's
    arguments (None = this process's)."""
    argv = sys.argv[1:] if argv is None else argv
    tasks = list(next(iter(summaries.values()))[0]["task_em"])
    lines = [f"# RLRP {os.path.splitext(os.path.basename(path))[0]}\n",
             f"`python {' '.join(['experiments/ablation.py', *argv])}` · {preset} · {max_iters} steps · "
             f"seeds {seeds} · {machine()} · "
             f"{wall} · mean ± std over seeds\n",
             "Exact match (EM) is on the held-out synthetic eval set, teacher-forced (identical to greedy "
             "decoding).\n",
             "| " + " | ".join(COLUMNS) + " |", "|" + " --- |" * len(COLUMNS)]
    for name, runs in summaries.items():
        r0, mean = runs[0], lambda key: fmt([r[key] for r in runs])
        tokens_per_s = mean_std([r["tokens_per_s"] for r in runs])[0]
        lines.append(f"| {name} | {VARIANTS[name][0]} | {r0['params'] / 1e6:.3f}M | "
                     f"{r0['flops_per_token'] / 1e6:.2f}M | {tokens_per_s:.0f} | {mean('fluency_loss')} | "
                     f"{mean('em_first')} | {mean('em_last')} |")
    lines += task_table("Exact match at step K, per task", summaries, tasks, lambda r, t: r["task_em"][t])
    lines += task_table("Step K minus step 1, per task (exact match; 0 for K=0)", summaries, tasks,
                        lambda r, t: r["task_em"][t] - r["task_em_first"][t])
    lines += ["\n## Test-time steps K' (exact match at the last step)\n"]
    width = max(len(runs[0]["curve"]) for runs in summaries.values())
    lines += ["| variant | " + " | ".join(f"K'={k}" for k in range(width)) + " |",
              "| --- |" + " --- |" * width]
    for name, runs in summaries.items():
        lines.append(f"| {name} | " + " | ".join(f"{v:.3f}" for v in mean_curve(runs)) + " |")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def plot(root, summaries):
    """Four PNGs; skipped with a note when matplotlib (optional) is missing."""
    plt = pyplot()
    if plt is None:
        print("matplotlib is not installed: no plots (pip install matplotlib)")
        return

    def save(fig, png):
        fig.tight_layout()
        fig.savefig(os.path.join(root, png), dpi=110)

    def one_line_per_variant(png, lines, marker=None, **labels):  # lines: {variant: (xs, ys)}
        fig, ax = plt.subplots(figsize=(6, 4))
        for name, (xs, ys) in lines.items():
            ax.plot(xs, ys, marker=marker, label=name)
        ax.set(**labels)
        ax.legend(fontsize=8)
        save(fig, png)

    shown = "rlrp" if "rlrp" in summaries else list(summaries)[-1]
    evals = summaries[shown][0]["evals"]
    its = [e["iter"] for e in evals]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for k in range(len(evals[0]["fluency_loss"])):
        axes[0].plot(its, [e["fluency_loss"][k] for e in evals], label=f"step {k + 1}")
        axes[1].plot(its, [e["answer_token_acc"][k] for e in evals], label=f"step {k + 1}")
    axes[0].set(title=f"{shown}: fluency val loss per step", xlabel="iter")
    axes[1].set(title=f"{shown}: answer-token accuracy per step", xlabel="iter")
    axes[0].legend()
    save(fig, "loss_per_step.png")
    curves = {name: mean_curve(runs) for name, runs in summaries.items()}
    one_line_per_variant("em_vs_test_k.png", {n: (range(len(c)), c) for n, c in curves.items()}, marker="o",
                         title="exact match vs test-time steps K'", xlabel="K'", ylabel="answer exact match")
    iters = lambda runs: [e["iter"] for e in runs[0]["evals"]]
    beats = {n: (iters(runs), [e["step_K_beats_1"] for e in runs[0]["evals"]])
             for n, runs in summaries.items() if len(runs[0]["curve"]) > 1}      # models with a head
    one_line_per_variant("step_k_beats_1.png", beats, title="answer tokens where step K beats step 1",
                         xlabel="iter", ylabel="fraction")
    # mean over seeds: the tasks are learned in sudden jumps
    em_last = lambda runs: np.mean([[e["answer_exact_match"][-1] for e in r["evals"]] for r in runs], axis=0)
    over_training = {n: (iters(runs), em_last(runs)) for n, runs in summaries.items()}
    one_line_per_variant("em_over_training.png", over_training, xlabel="iter", ylabel="answer exact match",
                         title="held-out exact match (last step) over training")


def parse_args(argv):
    """(config, variant names) from DEFAULTS and argv (--key=value, like train.py); bad values:
    ConfigError."""
    c = configure(DEFAULTS, argv, doc=__file__)
    if c["jobs"] < 1 or c["iters"] < 0:
        raise ConfigError(f"jobs must be >= 1 and iters >= 0, got jobs={c['jobs']}, iters={c['iters']}")
    return c, pick_variants(c["variants"], VARIANTS, SWEEP if c["sweep"] else ABLATION)


def main(argv):
    c, names = parse_args(argv)
    out = c["out"] or ("results/quick" if c["quick"] else "results")
    preset_iters = train_config([c["preset"]])["max_iters"]
    max_iters = c["iters"] or (preset_iters // 4 if c["quick"] else preset_iters)
    seeds = [0] if c["quick"] or c["sweep"] else [0, 1, 2]
    t0 = time.time()
    jobs = [(n, s) for s in seeds for n in names]
    with ThreadPoolExecutor(c["jobs"]) as pool:
        runs = [pool.submit(train_run, run_dir(out, n, s), c["preset"], VARIANTS[n][1], s, max_iters)
                for n, s in jobs]
        trained = sum(future.result() for future in runs)
    summaries = {n: [summarize_run(run_dir(out, n, s)) for s in seeds] for n in names}
    report = "sweep.md" if c["sweep"] else "ablation.md"
    write_report(os.path.join(out, report), c["preset"], summaries, seeds, wall_time(t0, trained, len(runs)),
                 max_iters, argv)
    if not c["sweep"]:
        plot(out, summaries)
    print(open(os.path.join(out, report)).read())


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except ConfigError as e:
        sys.exit(f"experiments/ablation.py: {e}")
