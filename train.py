"""
RLRP training on one CPU, one GPU, or many GPUs.

  python train.py config/train_cpu.py                     # a laptop CPU, a few minutes
  python train.py --batch_size=8 --compile=False          # the default run on one GPU, with overrides
  torchrun --standalone --nproc_per_node=8 train.py config/train_gpt2_owt.py          # one 8-GPU node
  torchrun --nnodes=2 --node_rank=0 --master_addr=HOST --master_port=29500 --nproc_per_node=8 train.py \
      config/train_gpt2_owt.py --gradient_accumulation_steps=48                  # 16 GPUs: divisible by 16

Each optimizer step is a fluency or a reasoning step (schedules.Router, routing (ii)), the same on every
rank. Micro-batches are drawn by global index (schedules.micro_batch_index) and are pure functions of it, K
is drawn from (seed, iter) and dropout's RNG reseeded from (seed, global micro-batch index): the same config
trains on the same examples with the same masks on 1 process or on W, and a resumed run continues exactly
where the checkpoint left it.
"""

import importlib.util
import math
import os
import re
import signal
import sys
from contextlib import nullcontext
from time import perf_counter

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import checkpoint
import data
from checkpoint import build_model
from configurator import ConfigError, catch_stop_signals, configure, precision, setup_system
from evaluate import Records, TrainWindow, all_reduce_sum, eval_metrics, eval_sets, format_eval
from latent_head import HEAD_ATTN, READOUT_GRAD
from losses import (BEYOND_CHAIN, LEVEL_STEPS, WEIGHT_SCHEDULES, loss_counts, rlrp_loss, step_supervision,
                    step_weights)
from schedules import (Curriculum, Router, get_lr, max_n_steps, micro_batches, n_steps_at,
                       progressive_steps, seed_micro_batch)

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
    tokenizer="gpt2",          # 'gpt2' | 'byte'
    tokenizer_file="",         # a local gpt2.tiktoken, offline (or env NANORLRP_TOKENIZER_FILE)
    fluency_data="data/openwebtext",  # a folder from `data/prepare.py fluency`, 'pydoc' (embedded), '' = none
    reasoning_data="synthetic",       # 'synthetic' (built-in suite) or a .jsonl file; '' = none
    reasoning_eval_data="",    # a .jsonl file; '' = the held-out hash slice of reasoning_data
    reasoning_tasks=data.DEFAULT_TASKS,  # the synthetic suite: family:level, comma-separated (README "Data")
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
    dropout=0.0,               # dropout in the trunk (masks seeded by the global micro-batch index)
    bias=False,                # biases in Linears and LayerNorms (GPT-2 has them)
    n_steps=4,                 # K, refinement steps of the latent head (0 = plain GPT baseline)
    n_latent=0,                # D, latent width (0 = n_embd)
    head_attn="none",          # what a step reads besides h_t: none | trunk | latent (latent_head.py)
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
    n_steps_dist="fixed",      # K per optimizer step (recurrent-depth style): 'fixed' | 'uniform': U{1..2K−1}
                               # | 'lognormal': Huginn's log-normal Poisson: mean K, a heavy tail, capped
    n_steps_max=0,             # the cap of 'lognormal' draws, >= n_steps (0 = 4K: ~0.1% of draws clipped)
    grad_steps=0,              # backprop through only the last grad_steps refinement steps (0 = all)
    progressive_alpha=0.0,     # α of the progressive loss (1 − α)·L_K + α·L_{n+k}: a second head pass runs
                               # n ~ U{0..K−1} steps without gradient, then k ~ U{1..K−n}; 0 = off; needs
                               # λ_imp = 0
    # what each step is trained on (losses.step_supervision; README "Steps that earn their keep")
    step_targets="final",      # 'final': the answer at every step (the paper's) | 'chain': per-step answers
                               # a_1..a_S (JSONL "step_answers"; hop/hopo/iter: f^k(x)); needs lambda_imp=0
    chain_length=0,            # synthetic chains: 0 = f^1..f^L to the example's level L (steps past L keep
                               # f^L) | N = f^1..f^N for every example (no stop: level L is read at step L)
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
    threads=0,                 # CPU threads per process; 0 = torch's, or cores / processes under torchrun
    gpu_peak_tflops=989.0,     # for MFU: H100/H200 bf16 dense; A100 is 312
    seed=1337,                 # model init, data order, K draws and dropout all follow from it
)

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


CONSTRAINTS = [
    *at_least(0, "n_steps", "n_latent"),
    (lambda c: 0 <= c["reasoning_fraction"] <= 1,
     "reasoning_fraction must be in [0, 1], got {reasoning_fraction}"),
    *at_least(0, "lambda_rl", "lambda_imp", "imp_margin", "weight_decay", "grad_clip", "dropout",
              "grad_steps", "weight_skip", "n_steps_max"),
    one_of("weight_schedule", WEIGHT_SCHEDULES, f"one of {', '.join(WEIGHT_SCHEDULES)}"),
    *at_least(1, "batch_size", "block_size", "gradient_accumulation_steps", "eval_interval", "log_interval",
              "curriculum_interval",
              "n_layer", "n_head", "n_embd", "eval_iters"),
    *at_least(0, "max_iters", "eval_examples", "checkpoint_interval", "checkpoint_minutes", "threads"),
    (lambda c: c["rl_q"] > 0, "rl_q must be > 0 (1 = the paper's soft RL, small = close to CE), got {rl_q}"),
    (lambda c: c["weight_gamma"] > 0, "weight_gamma must be > 0, got {weight_gamma}"),
    (lambda c: c["learning_rate"] > 0, "learning_rate must be > 0, got {learning_rate}"),
    (lambda c: 0 <= c["min_lr"] <= c["learning_rate"],
     "min_lr must be in [0, learning_rate={learning_rate}], got {min_lr}"),
    (lambda c: c["n_embd"] % c["n_head"] == 0, "n_embd ({n_embd}) must be divisible by n_head ({n_head})"),
    one_of("tokenizer", ("gpt2", "byte"), "'gpt2' or 'byte'"),
    one_of("head_attn", HEAD_ATTN, f"one of {', '.join(HEAD_ATTN)}"),
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
    one_of("step_targets", ("final", "chain"), "'final' or 'chain'"),
    *at_least(0, "chain_length"),
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
     "step_targets='chain' needs lambda_imp=0: the improvement penalty compares ℓ_k with ℓ_1 of the same "
     "label, and per-step labels differ (got lambda_imp={lambda_imp})"),
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


def load_config(argv):
    """(config, checkpoint): with init_from=resume the checkpoint's config is the base that argv overrides
    (checkpoint.resume_config), else DEFAULTS; checkpoint is None unless resuming."""
    c, ckpt = configure(DEFAULTS, argv, doc=__file__), None
    if c["init_from"] == "resume":
        ckpt = checkpoint.load(os.path.join(c["out_dir"], "ckpt.pt"))
        c = checkpoint.resume_config(DEFAULTS, ckpt["config"], argv)
    for holds, message in CONSTRAINTS:
        if not holds(c):
            raise ConfigError(message.format(**c))
    if c["wandb_log"] and importlib.util.find_spec("wandb") is None:
        raise ConfigError("wandb_log=True needs wandb: pip install wandb")
    return c, ckpt

# -----------------------------------------------------------------------------
# the data, and one micro-batch's forward and objective


def load_data(c):
    """(tokenizer, FluencyData | None, ReasoningData | None), light to build; a bad path or file: one line."""
    try:
        tok = data.get_tokenizer(c["tokenizer"], c["tokenizer_file"])
        fluency = data.FluencyData(c["fluency_data"], tok, c["block_size"], c["seed"]) \
            if c["fluency_data"] else None
        reasoning = data.ReasoningData(c["reasoning_data"], tok, c["block_size"], c["seed"],
                                       c["reasoning_eval_data"], c["reasoning_tasks"],
                                       c["gsm8k_answer"], chain_length(c)) if c["reasoning_data"] else None
    except (ValueError, FileNotFoundError) as e:
        raise ConfigError(str(e)) from e
    return tok, fluency, reasoning


def chain_length(c):
    """ReasoningData's chain_length: None for final-answer targets."""
    return c["chain_length"] if c["step_targets"] == "chain" else None


def step_counts(batches, c, device, world):
    """(Σ m_valid, Σ m_RL, Σ answer tokens) over every micro-batch of this optimizer step on every rank: the
    denominators that make accumulated micro-batches (and DDP) equal one large batch, token for token."""
    counts = torch.zeros(3, dtype=torch.int64)   # integers: exact, and every device has them (no float64)
    for b in batches:
        counts += loss_counts(b.y, b.answer_mask, c["rl_answer_only"], b.rl_rows)
    return all_reduce_sum(counts.to(device), world).float()


def micro_step_loss(model, b, kind, K, weights, counts, progressive, c, device):
    """Forward and the RLRP objective of one micro-batch -> (loss, logged): the loss is this micro-batch's
    share of the optimizer step's global mean (counts: step_counts); logged holds the detached loss, ds, rl,
    imp and nll_k (ℓ_1..ℓ_K). progressive: this step's (n, k) (schedules.progressive_steps) or None."""
    targets, step_w = step_supervision(b.y, K, weights, b.step_y, b.chain_len, b.level, c["beyond_chain"],
                                       c["level_steps"])         # Y, W: (K', B, T) on the CPU
    if progressive:                                              # step n+k's targets for its second pass
        targets = torch.cat([targets, targets[sum(progressive) - 1:sum(progressive)]])
    b, step_w = b.to(device), step_w.to(device)
    # the paper's targets are y at every step: a view of the batch's y, not a K-fold copy to move
    targets = targets.to(device) if b.step_y is not None else b.y.expand(len(targets), *b.y.shape)
    _, nll = model(b.x, targets, n_steps=K, grad_steps=c["grad_steps"] or None, progressive=progressive,
                   readout_grad=c["readout_grad"])
    objective = lambda rows, w: rlrp_loss(rows, b.y, b.answer_mask, kind, w, c["lambda_rl"], c["lambda_imp"],
                                          c["rl_answer_only"], c["imp_margin"], c["rl_q"], c["answer_weight"],
                                          counts=counts, rl_rows=b.rl_rows)
    K1, alpha = max(K, 1), c["progressive_alpha"]
    loss, parts = objective(nll[:K1].float(), step_w)
    if progressive:  # L = (1 − α)·L_K + α·L_{n+k}, L_{n+k} the objective on the second pass's last step
        loss = (1 - alpha) * loss + alpha * objective(nll[K1:].float(), torch.ones(1))[0]
    return loss, {"loss": loss.detach(), **parts}


LOGGED = ("loss", "ds", "rl", "imp")   # what every step logs besides nll_k, the per-step ℓ_1..ℓ_K


def all_reduce_logged(logged, stop, world):
    """(logged, ranks asked to stop): an optimizer step's logged sums over every rank, as floats (nll_k a
    list), and how many ranks got a stop signal, in one all-reduce: all ranks stop at the same step."""
    flat = torch.cat([torch.stack([logged[k] for k in LOGGED]), logged["nll_k"],
                      logged["loss"].new_tensor([float(bool(stop))])])
    values = all_reduce_sum(flat, world).tolist()
    return {**dict(zip(LOGGED, values)), "nll_k": values[len(LOGGED):-1]}, values[-1]

# -----------------------------------------------------------------------------
# the run


class Run:
    """One training run: the model (compiled, DDP-wrapped), its optimizer and loss scaler, the data and the
    fixed eval sets, and what rank 0 writes to out_dir: metrics.jsonl (and wandb) and checkpoints."""

    def __init__(self, argv):
        c, ckpt = load_config(argv)
        self.c, self.resumed = c, ckpt is not None
        self.rank, local_rank, self.world, self.device = setup_system(c)
        self.master, device_type = self.rank == 0, self.device.split(":")[0]
        self.ctx, self.scaler = precision(c, device_type)
        torch.manual_seed(c["seed"])
        tok, self.fluency, self.reasoning = load_data(c)
        self.curriculum = Curriculum(c, self.reasoning and self.reasoning.levels, (ckpt or {}).get(
            "curriculum_switches", ()))
        self.router = Router(c["reasoning_fraction"])
        self.raw_model = build_model(c, tok, ckpt).to(self.device)
        self.optimizer = self.raw_model.configure_optimizers(c["weight_decay"], c["learning_rate"],
                                                             (c["beta1"], c["beta2"]), device_type)
        self.start_iter = checkpoint.restore(ckpt, self.optimizer, self.scaler)
        del ckpt  # free the memory
        if c["compile"] if c["compile"] is not None else device_type == "cuda":
            self.raw_model.compile_parts()   # the trunk and one refinement step: any K reuses the same graphs
        self.model = self.raw_model
        if self.world > 1:
            # truncated backward: when K > grad_steps, z_0 is detached and W_in gets no gradient in that step
            self.model = DDP(self.raw_model, device_ids=[local_rank] if device_type == "cuda" else None,
                             find_unused_parameters=0 < c["grad_steps"] < max_n_steps(c))
        self.eval_sets = eval_sets(self.fluency, self.reasoning, c, self.rank, self.world, self.device)
        self.tokens_per_iter = c["gradient_accumulation_steps"] * c["batch_size"] * c["block_size"]
        self.peak_tflops = c["gpu_peak_tflops"] if device_type == "cuda" else None   # for MFU
        self.ckpt_path = os.path.join(c["out_dir"], "ckpt.pt")
        self.records = Records(os.path.join(c["out_dir"], "metrics.jsonl"))
        if self.master:
            self.start_records()
        self.saved_at = perf_counter()

    def start_records(self):
        """Rank 0's records: metrics.jsonl (a fresh run starts a fresh one) and wandb; and what runs."""
        c = self.c
        os.makedirs(c["out_dir"], exist_ok=True)
        if not c["eval_only"]:
            self.records.start(self.start_iter if self.resumed else None)
        print(f"{self.raw_model.get_num_params() / 1e6:.2f}M parameters | K={c['n_steps']} | {self.world} "
              f"process(es) on {self.device} | {self.tokens_per_iter:,} tokens per iter | "
              f"writing {c['out_dir']}/")
        if c["wandb_log"]:
            import wandb
            wandb.init(project=c["wandb_project"], name=c["wandb_run_name"], config=c, resume="allow")
            self.records.wandb = wandb

    def record(self, rec):
        if self.master:
            self.records.write(rec)

    def evaluate(self, it):
        """The eval record at iteration `it`, printed by rank 0."""
        self.raw_model.eval()
        with self.ctx:
            metrics = eval_metrics(self.raw_model, *self.eval_sets, self.c["n_steps"],
                                   self.c["eval_examples"], self.world)
        self.raw_model.train()
        rec = {"type": "eval", "iter": it, "tokens": it * self.tokens_per_iter, **metrics}
        if self.master:
            tqdm.write(format_eval(rec))
        return rec

    def save(self, it):
        if self.master:   # rank 0 alone writes, so its own clock may decide when: no collective
            state = checkpoint.state(self.raw_model, self.optimizer, self.scaler, it, self.c,
                                     self.curriculum.switches)
            checkpoint.save(self.ckpt_path, state)
        self.saved_at = perf_counter()

    def eval_due(self, it):
        return it % self.c["eval_interval"] == 0 or it == self.c["max_iters"]

    def checkpoint_due(self, it):
        """Between evals (which save anyway): every checkpoint_interval steps, and checkpoint_minutes after
        the last checkpoint."""
        c = self.c
        by_steps = c["checkpoint_interval"] and it % c["checkpoint_interval"] == 0
        by_time = c["checkpoint_minutes"] and perf_counter() - self.saved_at > 60 * c["checkpoint_minutes"]
        return not self.eval_due(it) and (by_steps or by_time)

    def check_curriculum(self, it):
        """The threshold curriculum after iteration `it` (schedules.Curriculum.check), in eval mode."""
        self.raw_model.eval()
        with self.ctx:
            joined = self.curriculum.check(it, self.raw_model, self.reasoning, self.rank, self.world,
                                           self.device)
        self.raw_model.train()
        if joined and self.master:
            tqdm.write(joined)

    def flops_per_token(self, it, K):
        """Training FLOPs per token of step `it`: the model's at K, plus the progressive loss's second head
        pass and its one unembedding when it is on."""
        c = self.c
        flops = self.raw_model.flops_per_token(K, c["block_size"], c["grad_steps"])["total"]
        progressive = progressive_steps(it, c, K)
        if progressive:
            steps = sum(progressive)                                      # n + k
            second = self.raw_model.flops_per_token(steps, c["block_size"], progressive[1])
            flops += second["head"] + second["unembed"] / steps
        return flops

    def train(self):
        """The training loop. Per optimizer step: evaluate and save when due; the step's kind, K, learning
        rate and micro-batches, functions of (seed, it); forward + backward per micro-batch; clip and step;
        log; the threshold curriculum; a stop signal or a checkpoint when due."""
        c, stop = self.c, catch_stop_signals()
        pbar = tqdm(total=c["max_iters"], initial=self.start_iter, disable=not self.master,
                    dynamic_ncols=True)
        window = TrainWindow(self.tokens_per_iter)
        for it in range(self.start_iter, c["max_iters"] + 1):
            if self.eval_due(it) and not (self.resumed and it == self.start_iter):
                self.record(self.evaluate(it))
                if it > self.start_iter:
                    self.save(it)
            if it == c["max_iters"]:
                break
            t_step = perf_counter()
            # what step `it` trains on: the same on every rank, and on resume
            kind = "reasoning" if c["routing"] == "mixed" else self.router.kind(it)   # mixed: rl_rows decide
            K, lr = n_steps_at(it, c), get_lr(it, c)
            progressive = progressive_steps(it, c, K)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            micro = micro_batches(it, kind, c, self.fluency, self.reasoning, self.rank, self.world,
                                  self.curriculum.level(it))
            counts = step_counts([b for _, b in micro], c, self.device, self.world)
            weights = step_weights(max(K, 1), c["weight_schedule"], c["weight_gamma"], c["weight_skip"])
            logged = {}
            for m, (index, b) in enumerate(micro):
                seed_micro_batch(c, index)                            # dropout's masks: (seed, index)
                last = m == len(micro) - 1
                # DDP all-reduces the gradients once, after the last micro-batch
                with self.model.no_sync() if self.world > 1 and not last else nullcontext():
                    with self.ctx:
                        loss, parts = micro_step_loss(self.model, b, kind, K, weights, counts, progressive, c,
                                                      self.device)
                    # DDP averages gradients over ranks; the loss is already a global mean, so undo the 1/W
                    self.scaler.scale(loss * self.world).backward()
                logged = {k: logged.get(k, 0) + v for k, v in parts.items()}
            logged, stopping = all_reduce_logged(logged, stop, self.world)
            if not math.isfinite(logged["loss"]):
                raise FloatingPointError(f"non-finite loss at iter {it} ({kind} step); parameters not "
                                         f"updated, the last good checkpoint is {self.ckpt_path}; lower "
                                         "learning_rate or check the data")
            if c["grad_clip"] > 0:
                self.scaler.unscale_(self.optimizer)
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), c["grad_clip"])
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.optimizer.zero_grad(set_to_none=True)
            pbar.update(1)
            window.add(kind, K, logged, self.flops_per_token(it, K), perf_counter() - t_step)
            if (it + 1) % c["log_interval"] == 0:
                rec = window.record(it + 1, lr, self.world, self.peak_tflops)
                if self.curriculum.level(it):   # a curriculum: the highest level this step trained
                    rec["curriculum_level"] = self.curriculum.level(it)
                self.record(rec)
                window = TrainWindow(self.tokens_per_iter)
                pbar.set_postfix(loss=f"{rec['loss']:.4f}", tok_s=f"{rec['tokens_per_s']:.0f}", refresh=False)
            if c["curriculum_threshold"] and (it + 1) % c["curriculum_interval"] == 0:
                self.check_curriculum(it + 1)
            if stopping:  # SIGINT / SIGTERM: this step is done; save it and leave
                self.save(it + 1)
                pbar.close()
                self.exit(f"train.py: stopped by a signal after iter {it + 1}; checkpoint written to "
                          f"{self.ckpt_path} (continue with --init_from=resume)",
                          128 + (stop or [signal.SIGTERM])[0])
            if self.checkpoint_due(it + 1):
                self.save(it + 1)
        pbar.close()
        self.exit(f"done: metrics in {self.records.path}, checkpoint in {self.ckpt_path}")

    def exit(self, message=None, code=None):
        """Rank 0 prints the message (to stderr with an exit code); the process group ends; then the exit."""
        if self.master and message:
            print(message, file=sys.stderr if code else sys.stdout)
        if self.world > 1:
            dist.barrier()  # every rank done with its collectives before any tears down (a gloo exit race)
            dist.destroy_process_group()
        if code:
            sys.exit(code)


def main(argv):
    run = Run(argv)
    if run.c["eval_only"]:  # evaluate the model as loaded, once; the checkpoint is left untouched
        run.record(dict(run.evaluate(run.start_iter), type="eval_only"))
        run.exit()
    else:
        run.train()


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except (ConfigError, FloatingPointError) as e:
        # under torchrun every rank raises the same error: rank 0 says it, the others exit quietly
        sys.exit(f"train.py: {e}" if int(os.environ.get("RANK", 0)) == 0 else 1)
