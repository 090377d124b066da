"""
train.py's keys: every key's default and meaning (DEFAULTS: `python train.py --help` prints these comments),
the keys that are gone (RENAMED), what the values must satisfy (CONSTRAINTS, then NEEDS: a key set where it
does nothing), checked in order by train.load_config before anything heavy, and what the reasoning data must
satisfy given them (check_reasoning).
A preset (config/train_*.py) or --key=value overrides DEFAULTS; a resumed run starts from its checkpoint's.
"""

import os
import re

from configurator import ConfigError
from hf_trunk import is_hf_folder
from latent_head import GELU, HEAD_ATTN, READOUT_GRAD
from losses import BEYOND_CHAIN, LEVEL_STEPS, WEIGHT_SCHEDULES
from tasks import CHAINS, DEFAULT_TASKS, chain_steps

DEFAULTS_FILE = os.path.abspath(__file__)   # `--help` reads the keys' meanings from DEFAULTS' comments here

DEFAULTS = dict(
    # I/O
    out_dir="out",             # ckpt.pt (and ckpt.prev.pt, the one before) and metrics.jsonl go here
    init_from="scratch",       # scratch | resume (out_dir/ckpt.pt) | gpt2, gpt2-medium, ... | a local HF dir
    eval_interval=1000,        # evaluate and write out_dir/ckpt.pt every eval_interval steps and at the end
    checkpoint_interval=0,     # also write ckpt.pt every this many steps (0 = only with evals)
    checkpoint_minutes=30.0,   # ... and when this many minutes passed since the last one (0 = off)
    log_interval=10,           # a train record every log_interval steps: means over the steps since the last
    eval_iters=50,             # fluency val micro-batches per eval, over all ranks
    eval_examples=500,         # held-out reasoning examples per eval
    eval_only=False,           # evaluate once (with init_from=resume: the checkpoint, untouched) and exit
    wandb_log=False,           # also log every record to Weights & Biases (pip install wandb)
    wandb_project="nanorlrp",  # wandb's project
    wandb_run_name="rlrp",     # wandb's run name
    # data (data.py)
    tokenizer="auto",          # 'gpt2' | 'byte' | 'hf' (a Hugging Face folder's tokenizer.json) | 'auto':
                               # 'hf' for init_from = a local HF folder (not GPT-2's), else 'gpt2'
    tokenizer_file="",         # a local gpt2.tiktoken, offline (or env NANORLRP_TOKENIZER_FILE); with 'hf':
                               # the folder (default: init_from's)
    fluency_data="data/openwebtext",  # a folder from `data/prepare.py fluency`, 'pydoc' (embedded), '' = none
    reasoning_data="synthetic",       # 'synthetic' (built-in suite) or a .jsonl file; '' = none
    reasoning_eval_data="",    # a .jsonl file, the eval set (beside 'synthetic' too: its prompts are then
                               # never drawn for training); '' = the held-out hash slice of reasoning_data
    reasoning_tasks=DEFAULT_TASKS,  # the synthetic suite: family:level, comma-separated (README "Data")
    eval_tasks="",             # the synthetic tasks of the held-out set, e.g. 'hopo:1-7': levels beyond the
                               # trained ones, the same split; '' = reasoning_tasks
    reasoning_fraction=0.5,    # ρ: the fraction of optimizer steps that are reasoning steps
    routing="step",            # 'step': each optimizer step is all fluency or all reasoning (routing (ii));
                               # 'mixed': every micro-batch holds a ρ share of reasoning rows
                               # (the no-routing ablation)
    gsm8k_answer="final",      # 'final' (text after ####) | 'solution' (the whole worked solution)
    gradient_accumulation_steps=40,  # micro-batches per optimizer step over ALL ranks (divided among them)
    batch_size=12,             # micro-batch size (rows)
    block_size=1024,           # context length in tokens
    # model
    n_layer=12,                # trunk blocks
    n_head=12,                 # attention heads per block
    n_embd=768,                # C, the trunk's width
    dropout=0.0,               # dropout in the trunk (masks seeded by the global micro-batch index); an HF
                               # trunk's every dropout too, whatever its config.json says
    bias=False,                # biases in Linears and LayerNorms (GPT-2 has them)
    n_steps=4,                 # K, refinement steps of the latent head (0 = plain GPT baseline)
    n_latent=0,                # D, latent width (0 = n_embd)
    head_attn="none",          # what a step reads besides h_t: none | trunk | latent (latent_head.py)
    gelu="exact",              # the MLPs' GELU, trunk and head: 'exact' (nanoGPT's, faster) | 'tanh'
                               # (GPT-2's); init_from=gpt2 or a HF dir: GPT-2's tanh, like its n_layer,
                               # n_embd, bias
    # the RLRP objective (losses.py)
    weight_schedule="linear",  # step weights w: uniform | linear | exp | last
    weight_gamma=0.5,          # γ of the exp schedule
    weight_skip=0,             # w_k = 0 for k <= weight_skip, the rest renormalised (< n_steps; a step
                               # whose K is <= weight_skip, with random K, supervises its last step only)
    lambda_rl=0.5,             # λ_rl, soft RL on reasoning steps
    lambda_imp=0.1,            # λ_imp, improvement penalty
    imp_margin=0.0,            # margin of the improvement penalty: later steps must beat step 1 by this much
    rl_answer_only=True,       # soft RL on answer spans only
    rl_q=1.0,                  # soft-RL exponent q > 0: L_RL = (1 − p^q)/q; 1 = the paper's 1 − p, → 0 = CE
    sampled_supervision=False, # unbiased estimates of L_DS, L_RL, L_IMP from ℓ at one drawn step k_t ~ W per
                               # token: ~1 + 2·imp_fraction unembeddings per token instead of K (losses.py)
    imp_fraction=0.125,        # f, in (0, 1]: the share of positions L_IMP is estimated on when sampled
    n_steps_dist="fixed",      # K per optimizer step (recurrent-depth style): 'fixed' | 'uniform': U{1..2K−1}
                               # | 'lognormal': Huginn's log-normal Poisson: mean K, a heavy tail, capped
    n_steps_max=0,             # the cap of 'lognormal' draws, >= n_steps (0 = 4K: ~0.1% of draws clipped)
    grad_steps=0,              # backprop through only the last grad_steps refinement steps (0 = all)
    progressive_alpha=0.0,     # α of the progressive loss (1 − α)·L_K + α·L_{n+k}: a second head pass runs
                               # n ~ U{0..K−1} steps without gradient, then k ~ U{1..K−n}; 0 = off; needs
                               # λ_imp = 0
    # what each step is trained on (losses.step_supervision; README "Steps that earn their keep")
    step_targets="final",      # 'final': the answer at every step (the paper's) | 'chain': each example's own
                               # chain a_1..a_S (JSONL "step_answers"; hop/hopo/iter: f^1(x)..f^L(x) to its
                               # level L, steps past L keep f^L) | 'chain:N': as 'chain', but the chain
                               # families get f^1..f^N at every level (no stop: level L is read at step L),
                               # a JSONL row its chain cut at N; both need lambda_imp=0
    beyond_chain="stay",       # steps past a chain's a_S: 'stay' (trained on a_S) | 'none' (no loss there)
    level_steps="all",         # an answer of level L is supervised at: 'all' steps (w) | 'at' step L only
                               # | 'from' the steps >= L (w renormalised); K < L: step K
    answer_weight=1.0,         # ω: answer tokens' weight in L_DS, relative to the other tokens' 1
    readout_grad="all",        # which steps' losses reach the trunk through the readout's residual h_t: 'all'
                               # (the method) | 'first' (step 1's: o_k = sg(h_t) + W_out·z_k for k >= 2)
    curriculum_iters="",       # a curriculum over the reasoning levels L_1 < ... < L_n: 'i_1,...,i_{n-1}',
                               # the iterations where the next level joins (levels <= L_1 first); per-step
                               # chains are cut at the stage's highest level; '' = off
    curriculum_threshold=0.0,  # > 0 (instead of curriculum_iters): the next level joins when the exact match
                               # of the highest level so far, on a fixed training-side slice of it (never the
                               # held-out set), reaches this; the switch iterations go into the checkpoint
    curriculum_interval=250,   # ... checked every this many iterations
    # AdamW with warmup + cosine decay
    learning_rate=6e-4,        # peak learning rate, after warmup
    max_iters=50000,           # optimizer steps in all
    weight_decay=0.1,          # AdamW's, on matrices and embeddings only
    beta1=0.9,                 # AdamW's β1
    beta2=0.95,                # AdamW's β2
    grad_clip=1.0,             # 0 = off
    decay_lr=True,             # False = constant learning_rate
    warmup_iters=2000,         # linear warmup steps
    lr_decay_iters=50000,      # the cosine reaches min_lr here (~ max_iters, per Chinchilla)
    min_lr=6e-5,               # the learning rate's floor, <= learning_rate
    # system
    device=None,               # None = best available: cuda, then mps, then cpu
    dtype=None,                # None = the device's best: bfloat16, float16 (with a GradScaler), float32
    compile=None,              # None = on for cuda, off elsewhere
    gradient_checkpointing=False,  # an HF trunk recomputes each layer in backward: less memory, more time
    threads=0,                 # CPU threads per process; 0 = torch's, or cores / processes under torchrun
    gpu_peak_tflops=989.0,     # for MFU: H100/H200 bf16 dense; A100 is 312
    seed=1337,                 # model init, data order, K draws and dropout all follow from it
)

# keys that are gone: a run that still sets one stops with its line, which names what to set instead
RENAMED = {
    "chain_length": "chain_length was folded into step_targets: use step_targets='chain:N' (f^1..f^N for "
                    "every example) or 'chain' (each example's own level)",
}

# -----------------------------------------------------------------------------
# what the values must satisfy: (holds(config), the one-line error, formatted with the config), checked in
# this order before anything heavy


def at_least(low, *keys):
    return [(lambda c, k=k: c[k] >= low, f"{k} must be >= {low}, got {{{k}}}") for k in keys]


def one_of(key, values, words):
    return lambda c: c[key] in values, f"{key} must be {words}, got {{{key}!r}}"


def ascending_iters(text):
    """Whether text is '' or comma-separated ascending iterations >= 1 ('4000,8000')."""
    if not re.fullmatch(r"(\d+(,\d+)*)?", text):
        return False
    iters = [int(i) for i in text.split(",") if i]
    return iters == sorted(set(iters)) and 0 not in iters


def valid_step_targets(text):
    """Whether text is 'final', 'chain' or 'chain:N' with N >= 1 (tasks.chain_steps reads it)."""
    return re.fullmatch(r"final|chain(:[1-9][0-9]*)?", text) is not None


CONSTRAINTS = [
    *at_least(0, "n_steps", "n_latent"),
    (lambda c: 0 <= c["reasoning_fraction"] <= 1,
     "reasoning_fraction must be in [0, 1], got {reasoning_fraction}"),
    *at_least(0, "lambda_rl", "lambda_imp", "imp_margin", "weight_decay", "grad_clip", "grad_steps",
              "weight_skip", "n_steps_max", "warmup_iters", "lr_decay_iters"),
    *[(lambda c, k=k: 0 <= c[k] < 1, f"{k} must be in [0, 1), got {{{k}}}") for k in ("dropout", "beta1",
                                                                                        "beta2")],
    one_of("weight_schedule", WEIGHT_SCHEDULES, f"one of {', '.join(WEIGHT_SCHEDULES)}"),
    *at_least(1, "batch_size", "block_size", "gradient_accumulation_steps", "eval_interval", "log_interval",
              "curriculum_interval",
              "n_layer", "n_head", "n_embd", "eval_iters"),
    *at_least(0, "max_iters", "eval_examples", "checkpoint_interval", "checkpoint_minutes", "threads"),
    (lambda c: c["rl_q"] > 0, "rl_q must be > 0 (1 = the paper's soft RL, small = close to CE), got {rl_q}"),
    (lambda c: c["weight_gamma"] > 0, "weight_gamma must be > 0, got {weight_gamma}"),
    (lambda c: 0 < c["imp_fraction"] <= 1, "imp_fraction must be in (0, 1] (0 would switch the improvement "
     "penalty off: set lambda_imp=0 for that), got {imp_fraction}"),
    (lambda c: c["learning_rate"] > 0, "learning_rate must be > 0, got {learning_rate}"),
    (lambda c: c["gpu_peak_tflops"] > 0, "gpu_peak_tflops must be > 0, got {gpu_peak_tflops}"),
    (lambda c: 0 <= c["min_lr"] <= c["learning_rate"],
     "min_lr must be in [0, learning_rate={learning_rate}], got {min_lr}"),
    (lambda c: c["n_embd"] % c["n_head"] == 0, "n_embd ({n_embd}) must be divisible by n_head ({n_head})"),
    one_of("tokenizer", ("auto", "gpt2", "byte", "hf"), "'gpt2', 'byte', 'hf' or 'auto'"),
    (lambda c: c["tokenizer"] != "hf" or c["tokenizer_file"],
     "tokenizer='hf' reads a Hugging Face folder's tokenizer.json: set tokenizer_file=DIR (or init_from=DIR)"
     ),
    one_of("head_attn", HEAD_ATTN, f"one of {', '.join(HEAD_ATTN)}"),
    one_of("gelu", GELU, f"one of {', '.join(GELU)}"),
    one_of("readout_grad", READOUT_GRAD, f"one of {', '.join(READOUT_GRAD)}"),
    one_of("routing", ("step", "mixed"), "'step' or 'mixed'"),
    (lambda c: c["routing"] == "step" or (0 < c["reasoning_fraction"] < 1 and c["batch_size"] >= 2),
     "routing='mixed' needs 0 < reasoning_fraction < 1 and batch_size >= 2"),
    one_of("n_steps_dist", ("fixed", "uniform", "lognormal"), "fixed, uniform or lognormal"),
    (lambda c: c["n_steps_max"] == 0 or c["n_steps_max"] >= c["n_steps"],
     "n_steps_max must be 0 (= 4·n_steps) or >= n_steps={n_steps}, got {n_steps_max}"),
    (lambda c: c["weight_skip"] == 0 or c["weight_skip"] < c["n_steps"],
     "weight_skip must be < n_steps={n_steps} (steps 1..weight_skip get no weight, so nothing would be "
     "supervised), got {weight_skip}"),
    one_of("gsm8k_answer", ("final", "solution"), "'final' or 'solution'"),
    (lambda c: valid_step_targets(c["step_targets"]),
     "step_targets must be 'final', 'chain' or 'chain:N' (N >= 1), got {step_targets!r}"),
    one_of("beyond_chain", BEYOND_CHAIN, f"one of {', '.join(BEYOND_CHAIN)}"),
    one_of("level_steps", LEVEL_STEPS, f"one of {', '.join(LEVEL_STEPS)}"),
    (lambda c: c["answer_weight"] > 0, "answer_weight must be > 0, got {answer_weight}"),
    (lambda c: ascending_iters(c["curriculum_iters"]),
     "curriculum_iters must be ascending iterations >= 1, comma-separated (e.g. '4000,8000'), got "
     "{curriculum_iters!r}"),
    (lambda c: 0 <= c["curriculum_threshold"] <= 1, "curriculum_threshold must be in [0, 1], got "
     "{curriculum_threshold}"),
    (lambda c: not (c["curriculum_iters"] and c["curriculum_threshold"]),
     "curriculum_iters and curriculum_threshold both set when the next level joins: use one"),
    (lambda c: not (c["curriculum_iters"] or c["curriculum_threshold"]) or c["reasoning_fraction"] > 0,
     "a curriculum needs reasoning steps (reasoning_fraction > 0)"),
    (lambda c: c["step_targets"] == "final" or c["lambda_imp"] == 0,
     "step_targets={step_targets!r} needs lambda_imp=0: the improvement penalty compares ℓ_k with ℓ_1 of the "
     "same label, and per-step labels differ (got lambda_imp={lambda_imp})"),
    (lambda c: 0 <= c["progressive_alpha"] <= 1,
     "progressive_alpha must be in [0, 1], got {progressive_alpha}"),
    (lambda c: c["progressive_alpha"] == 0 or c["lambda_imp"] == 0,
     "progressive_alpha > 0 needs lambda_imp=0: the improvement penalty would reach the steps run without "
     "gradient (got lambda_imp={lambda_imp})"),
    (lambda c: c["beyond_chain"] == "stay" or c["level_steps"] == "all",
     "beyond_chain='none' and level_steps={level_steps!r} both choose the supervised steps: use one"),
    one_of("dtype", (None, "float32", "bfloat16", "float16"), "float32, bfloat16 or float16"),
    one_of("compile", (None, True, False), "True or False"),
    (lambda c: c["reasoning_fraction"] == 0 or c["reasoning_data"],
     "reasoning_fraction > 0 needs reasoning_data"),
    (lambda c: c["reasoning_fraction"] == 1 or c["fluency_data"],
     "reasoning_fraction < 1 needs fluency_data"),
    (lambda c: c["init_from"] in ("scratch", "resume") or c["init_from"].startswith("gpt2")
     or os.path.isdir(c["init_from"]),
     "init_from must be scratch, resume, a GPT-2 name (gpt2, gpt2-medium, ...) or a local model folder, "
     "got {init_from!r}"),
]


def resolve_tokenizer(c):
    """A new run's tokenizer='auto' made what the checkpoint records: 'hf' (tokenizer_file = the folder,
    unless set) for init_from = a local Hugging Face folder that is not GPT-2's, else 'gpt2'."""
    if c["tokenizer"] == "auto":
        c["tokenizer"] = "hf" if is_hf_folder(c["init_from"]) else "gpt2"
    if c["tokenizer"] == "hf" and not c["tokenizer_file"] and is_hf_folder(c["init_from"]):
        c["tokenizer_file"] = c["init_from"]


def check(c, partial=False):
    """ConfigError with the line of the first CONSTRAINT c breaks. partial: c holds only some of train.py's
    keys (bench/bench.py's), and the constraints on keys it lacks are skipped."""
    for holds, message in CONSTRAINTS:
        try:
            ok = holds(c)
        except KeyError:
            if not partial:
                raise
            continue
        if not ok:
            raise ConfigError(message.format(**c))

# -----------------------------------------------------------------------------
# keys set where they do nothing: a new run that sets one (to other than its default) stops, since it asked
# for something it would not get; at n_steps=0 the latent steps' keys are inert, and a warning says so (the
# FLOP-matched GPT baselines share their arms' presets). Not the synthetic suite's keys (reasoning_tasks,
# eval_tasks): a preset sets them, and --reasoning_data=X.jsonl over it means the file instead.

NEEDS = {   # key: (where it acts, in words)
    "n_steps_max": (lambda c: c["n_steps_dist"] == "lognormal", "n_steps_dist='lognormal' (it caps those)"),
    "weight_gamma": (lambda c: c["weight_schedule"] == "exp", "weight_schedule='exp'"),
    "imp_fraction": (lambda c: c["sampled_supervision"], "sampled_supervision=True"),
    "imp_margin": (lambda c: c["lambda_imp"] > 0, "lambda_imp > 0"),
    "rl_q": (lambda c: c["lambda_rl"] > 0, "lambda_rl > 0"),
    "curriculum_interval": (lambda c: c["curriculum_threshold"] > 0, "curriculum_threshold > 0"),
    "beyond_chain": (lambda c: c["step_targets"] != "final", "per-step targets (step_targets='chain...')"),
    "gradient_checkpointing": (lambda c: is_hf_folder(c["init_from"]), "init_from = a local Hugging Face "
                               "folder (an HF trunk: GPT-2's native trunk has no checkpointing)"),
}
LATENT_KEYS = ("n_latent", "head_attn", "weight_schedule", "weight_gamma", "weight_skip", "lambda_imp",
               "imp_margin", "sampled_supervision", "imp_fraction", "n_steps_dist", "n_steps_max",
               "grad_steps", "progressive_alpha", "step_targets", "beyond_chain", "level_steps",
               "readout_grad")
OFF = {"lambda_imp": 0.0}   # a value that switches a latent key off: no warning at n_steps=0


def check_needs(c):
    """ConfigError for the first key of NEEDS set to other than its default where it does nothing."""
    for key, (acts, where) in NEEDS.items():
        if c[key] != DEFAULTS[key] and not acts(c):
            raise ConfigError(f"{key}={c[key]!r} does nothing without {where}: set that too, or leave {key} "
                              "unset")


def latent_keys_warning(c):
    """[the warning line] when n_steps=0 (the plain GPT) and keys of the latent steps are set, else []."""
    inert = [k for k in LATENT_KEYS if c[k] not in (DEFAULTS[k], OFF.get(k))]
    if c["n_steps"] or not inert:
        return []
    keys = ", ".join(f"{k}={c[k]!r}" for k in inert)
    return [f"n_steps=0 is the plain GPT: {keys} act on the latent steps and have no effect"]


def training_rows(reasoning):
    """(where, level L, chain length S) of each synthetic task or JSONL training row of a data.ReasoningData:
    what check_reasoning checks."""
    if reasoning.tasks:
        return [(f"{family}:{L}", L, chain_steps(reasoning.step_targets, L) if family in CHAINS else 0)
                for family, L in reasoning.tasks]
    return [(where, ex.level, len(ex.steps)) for where, ex in zip(reasoning.where, reasoning.train)]


def check_reasoning(c, rows, max_k):
    """The reasoning data against the keys that supervise it: data they cannot train is a ConfigError.
    rows: (where, level L (0 = unknown), chain length S (0 = none)) of every synthetic task or JSONL training
    row (training_rows); max_k: the largest K this run draws."""
    targets, level_steps = c["step_targets"], c["level_steps"]
    if targets != "final" and not any(S for _, _, S in rows):
        raise ConfigError(f"step_targets={targets!r}, but no reasoning example has a chain (the synthetic "
                          "hop, hopo and iter tasks have one, a JSONL row its \"step_answers\"): set "
                          "step_targets='final', or give the data chains")
    if level_steps != "all" and not any(L for _, L, _ in rows):
        raise ConfigError(f"level_steps={level_steps!r}, but no reasoning row has a level (a JSONL row's "
                          "\"level\", or its \"step_answers\"' length): set level_steps='all', or add levels")
    if max_k == 0:
        return
    # Y_k = a_min(k, S), and the answer is a JSONL row's a_min(L, S) (tasks.read_jsonl_examples checks it), a
    # synthetic task's f^L(x): in its chain f^1..f^S only if L <= S. It is a target from that step on, unless
    # 'chain:N' cuts the chain before it.
    synthetic, N = c["reasoning_data"] == "synthetic", chain_steps(targets, 0)
    for where, L, S in rows:
        at = min(L, S) if L <= S or not synthetic else None
        if S and (at is None or N and at > N):
            raise ConfigError(f"{where}: the answer (level {L}) is in no step of the chain step_targets="
                              f"{targets!r} trains (f^1..f^{min(S, N or S)}): it is never a target; use "
                              "step_targets='chain', or leave out the level")
        if S and at > max_k:
            raise ConfigError(f"{where}: the answer (level {L}, chain of {S}) is its chain's step {at}, "
                              f"beyond the largest K this run draws ({max_k}): it is never a target; raise "
                              "n_steps (or draw K with n_steps_dist), or leave out the level")
    above = sorted({L for _, L, _ in rows if L > max_k})
    if level_steps != "all" and above:   # an answer above this step's K gets no loss (schedules.readable_at)
        raise ConfigError(f"level_steps={level_steps!r}: levels {', '.join(map(str, above))} are above the "
                          f"largest K this run draws ({max_k}), so no step reads them and they are never "
                          "trained; raise n_steps (or draw K with n_steps_dist), or leave them out")
