"""
RLRP training on one CPU, one GPU, or many GPUs.

  python train.py config/train_cpu.py                     # a laptop CPU, a few minutes
  python train.py --batch_size=8 --compile=False          # the default run on one GPU, with overrides
  torchrun --standalone --nproc_per_node=8 train.py       # one 8-GPU node
  torchrun --nnodes=2 --node_rank=0 --master_addr=HOST --master_port=29500 --nproc_per_node=8 train.py

Each optimizer step is a fluency or a reasoning step (data.Router, routing (ii)), the same on every
rank. Micro-batches are drawn by global index (data.micro_batch_index) and are pure functions of it, K is
drawn from (seed, iter) and dropout's RNG reseeded from (seed, global micro-batch index): the same config
trains on the same examples with the same masks on 1 process or on W, and a resumed run continues exactly
where the checkpoint left it.
"""

import importlib.util
import json
import math
import os
import signal
import sys
from statistics import fmean
from time import perf_counter
from contextlib import nullcontext
from dataclasses import asdict

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import checkpoint
import data
from configurator import ConfigError, configure, default_device, default_dtype
from evaluate import all_reduce_sum, evaluate_fluency, evaluate_reasoning, format_eval, per_task
from latent_head import HEAD_ATTN
from losses import WEIGHT_SCHEDULES, loss_masks, rlrp_loss, step_weights
from model import GPT, GPTConfig

DEFAULTS = dict(
    # I/O
    out_dir="out",             # ckpt.pt (and ckpt.prev.pt, the one before) and metrics.jsonl go here
    init_from="scratch",       # 'scratch' | 'resume' (from out_dir/ckpt.pt) | 'gpt2', 'gpt2-medium', ... or a local HF dir
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
    tokenizer_file="",         # local gpt2.tiktoken for machines without internet (or env NANORLRP_TOKENIZER_FILE)
    fluency_data="data/openwebtext",  # a folder from `python data.py prepare`, or 'pydoc' (embedded); '' = none
    reasoning_data="synthetic",       # 'synthetic' (built-in suite) or a .jsonl file; '' = none
    reasoning_eval_data="",    # a .jsonl file; '' = the held-out hash slice of reasoning_data
    reasoning_tasks=data.DEFAULT_TASKS,  # the synthetic suite: family:level, comma-separated (README "Data")
    reasoning_fraction=0.5,    # ρ: the fraction of optimizer steps that are reasoning steps
    routing="step",            # 'step': each optimizer step is all fluency or all reasoning (routing (ii));
                               # 'mixed': every micro-batch holds a ρ share of reasoning rows (the no-routing ablation)
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
    head_attn="none",          # what a refinement step may read besides h_t: none | trunk | latent (latent_head.py)
    # the RLRP objective (losses.py)
    weight_schedule="linear",  # step weights w: uniform | linear | exp | last
    weight_gamma=0.5,          # γ of the exp schedule
    weight_skip=0,             # w_k = 0 for k <= weight_skip, the rest renormalised (< n_steps; a step whose K is
                               # <= weight_skip, with random K, supervises its last step only)
    lambda_rl=0.5,             # λ_rl, soft RL on reasoning steps
    lambda_imp=0.1,            # λ_imp, improvement penalty
    imp_margin=0.0,            # margin of the improvement penalty: later steps must beat step 1 by this much
    rl_answer_only=True,       # soft RL on answer spans only
    rl_q=1.0,                  # soft-RL exponent q > 0: L_RL = (1 − p^q)/q; 1 = the paper's 1 − p, → 0 = CE
    n_steps_dist="fixed",      # K per optimizer step (recurrent-depth style): 'fixed' | 'uniform': U{1..2K−1} |
                               # 'lognormal': Huginn's log-normal Poisson, mean K, heavy right tail, <= n_steps_max
    n_steps_max=0,             # the cap of 'lognormal' draws, >= n_steps (0 = 4K: ~0.1% of draws clipped)
    grad_steps=0,              # backprop through only the last grad_steps refinement steps (0 = all)
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
    dtype=None,                # None = best the device supports: bfloat16, float16 (with a GradScaler), float32
    compile=None,              # None = on for cuda, off elsewhere
    threads=0,                 # CPU threads per process; 0 = torch's default, or cores / processes under torchrun
    gpu_peak_tflops=989.0,     # for MFU: H100/H200 bf16 dense; A100 is 312
    seed=1337,                 # model init, data order, K draws and dropout all follow from it
)
ARCH_KEYS = ("block_size", "vocab_size", "n_layer", "n_head", "n_embd", "bias", "n_steps", "n_latent", "head_attn")

# -----------------------------------------------------------------------------
# configuration: every bad value stops here with one line, before anything heavy


def check_config(c):
    def need(ok, msg):
        if not ok:
            raise ConfigError(msg)
    need(c["n_steps"] >= 0, f"n_steps must be >= 0, got {c['n_steps']}")
    need(c["n_latent"] >= 0, f"n_latent must be >= 0, got {c['n_latent']}")
    need(0 <= c["reasoning_fraction"] <= 1, f"reasoning_fraction must be in [0, 1], got {c['reasoning_fraction']}")
    for key in ("lambda_rl", "lambda_imp", "imp_margin", "weight_decay", "grad_clip", "dropout", "grad_steps",
                "weight_skip", "n_steps_max"):
        need(c[key] >= 0, f"{key} must be >= 0, got {c[key]}")
    need(c["weight_schedule"] in WEIGHT_SCHEDULES,
         f"weight_schedule must be one of {', '.join(WEIGHT_SCHEDULES)}, got {c['weight_schedule']!r}")
    for key in ("batch_size", "block_size", "gradient_accumulation_steps", "eval_interval", "log_interval",
                "n_layer", "n_head", "n_embd", "eval_iters"):
        need(c[key] >= 1, f"{key} must be >= 1, got {c[key]}")
    for key in ("max_iters", "eval_examples", "checkpoint_interval", "checkpoint_minutes", "threads"):
        need(c[key] >= 0, f"{key} must be >= 0, got {c[key]}")
    need(c["rl_q"] > 0, f"rl_q must be > 0 (1 = the paper's soft RL, small = close to CE), got {c['rl_q']}")
    need(c["weight_gamma"] > 0, f"weight_gamma must be > 0, got {c['weight_gamma']}")
    need(0 <= c["min_lr"] <= c["learning_rate"],
         f"min_lr must be in [0, learning_rate={c['learning_rate']}], got {c['min_lr']}")
    need(c["n_embd"] % c["n_head"] == 0, f"n_embd ({c['n_embd']}) must be divisible by n_head ({c['n_head']})")
    need(c["tokenizer"] in ("gpt2", "byte"), f"tokenizer must be 'gpt2' or 'byte', got {c['tokenizer']!r}")
    need(c["head_attn"] in HEAD_ATTN, f"head_attn must be one of {', '.join(HEAD_ATTN)}, got {c['head_attn']!r}")
    need(c["routing"] in ("step", "mixed"), f"routing must be 'step' or 'mixed', got {c['routing']!r}")
    need(c["routing"] == "step" or (0 < c["reasoning_fraction"] < 1 and c["batch_size"] >= 2),
         "routing='mixed' needs 0 < reasoning_fraction < 1 and batch_size >= 2")
    need(c["n_steps_dist"] in ("fixed", "uniform", "lognormal"),
         f"n_steps_dist must be fixed, uniform or lognormal, got {c['n_steps_dist']!r}")
    need(c["n_steps_max"] == 0 or c["n_steps_max"] >= c["n_steps"],
         f"n_steps_max must be 0 (= 4·n_steps) or >= n_steps={c['n_steps']}, got {c['n_steps_max']}")
    need(c["weight_skip"] == 0 or c["weight_skip"] < c["n_steps"],
         f"weight_skip must be < n_steps={c['n_steps']} (steps 1..weight_skip get no weight, so nothing would be "
         f"supervised), got {c['weight_skip']}")
    need(c["gsm8k_answer"] in ("final", "solution"), f"gsm8k_answer must be 'final' or 'solution', got {c['gsm8k_answer']!r}")
    need(c["dtype"] in (None, "float32", "bfloat16", "float16"),
         f"dtype must be float32, bfloat16 or float16, got {c['dtype']!r}")
    need(c["compile"] in (None, True, False), f"compile must be True or False, got {c['compile']!r}")
    need(c["reasoning_fraction"] == 0 or c["reasoning_data"], "reasoning_fraction > 0 needs reasoning_data")
    need(c["reasoning_fraction"] == 1 or c["fluency_data"], "reasoning_fraction < 1 needs fluency_data")
    need(c["init_from"] in ("scratch", "resume") or c["init_from"].startswith("gpt2") or os.path.isdir(c["init_from"]),
         f"init_from must be scratch, resume, a GPT-2 name (gpt2, gpt2-medium, ...) or a local model folder, "
         f"got {c['init_from']!r}")


def load_config(argv):
    """(config, checkpoint): with init_from=resume the checkpoint's config is the base that argv overrides
    (checkpoint.resume_config), else DEFAULTS; checkpoint is None unless resuming."""
    c, ckpt = configure(DEFAULTS, argv, doc=__file__), None
    if c["init_from"] == "resume":
        ckpt = checkpoint.load(os.path.join(c["out_dir"], "ckpt.pt"))
        c = checkpoint.resume_config(DEFAULTS, ckpt["config"], argv)
    check_config(c)
    if c["wandb_log"] and importlib.util.find_spec("wandb") is None:
        raise ConfigError("wandb_log=True needs wandb: pip install wandb")
    return c, ckpt

# -----------------------------------------------------------------------------
# system: ranks, device, precision


def setup_system(c):
    """Starts DDP under torchrun; returns (rank, local_rank, world_size, device)."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if c["gradient_accumulation_steps"] % world:
        raise ConfigError(f"gradient_accumulation_steps={c['gradient_accumulation_steps']} must be divisible by "
                          f"the number of processes ({world})")
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = c["device"] or default_device()
    threads = c["threads"] or (os.cpu_count() // int(os.environ.get("LOCAL_WORLD_SIZE", 1)) if world > 1 else 0)
    if device == "cpu" and threads:
        torch.set_num_threads(max(1, threads))   # several processes on one CPU must not oversubscribe its cores
    if device == "cuda" or device.startswith("cuda:"):
        device = f"cuda:{local_rank}" if world > 1 else device
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if world > 1:
        dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
    return rank, local_rank, world, device


def precision(c, device_type):
    """(autocast context, GradScaler): bf16 where supported, fp16 + loss scaling otherwise, float32 on CPU/MPS."""
    dtype = c["dtype"] or default_dtype(device_type)
    ctx = nullcontext() if dtype == "float32" else torch.autocast(device_type, dtype=getattr(torch, dtype))
    return ctx, torch.amp.GradScaler(device_type, enabled=(dtype == "float16"))

# -----------------------------------------------------------------------------
# model and checkpoints


def build_model(c, tok, ckpt):
    """The model for init_from; its block_size must cover the run's."""
    if c["init_from"] == "resume":
        model = GPT(GPTConfig(**{**ckpt["model_args"], "dropout": c["dropout"]}))
        model.load_state_dict(ckpt["model"])
    elif c["init_from"] == "scratch":
        V = tok.vocab_size if tok.vocab_size < 1024 else -(-tok.vocab_size // 64) * 64  # pad big vocabularies to ×64
        model = GPT(GPTConfig(vocab_size=V, dropout=c["dropout"], **{k: c[k] for k in ARCH_KEYS if k != "vocab_size"}))
    else:
        try:
            model = GPT.from_pretrained(c["init_from"], n_steps=c["n_steps"], n_latent=c["n_latent"],
                                        dropout=c["dropout"], head_attn=c["head_attn"])
        except (ImportError, OSError, ValueError) as e:
            raise ConfigError(str(e).splitlines()[0]) from e
    if c["block_size"] > model.config.block_size:
        raise ConfigError(f"block_size={c['block_size']} is larger than the model's {model.config.block_size}")
    if tok.vocab_size > model.config.vocab_size:
        raise ConfigError(f"tokenizer {tok.name!r} ({tok.vocab_size} tokens) does not fit the model's vocabulary "
                          f"({model.config.vocab_size})")
    if c["block_size"] < model.config.block_size:
        model.crop_block_size(c["block_size"])
    return model


# -----------------------------------------------------------------------------
# schedules: pure functions of the iteration, identical on every rank


def get_lr(it, c):
    """Linear warmup, cosine decay to min_lr at lr_decay_iters; no division by zero for any setting."""
    lr, min_lr, warmup, decay_end = c["learning_rate"], c["min_lr"], c["warmup_iters"], c["lr_decay_iters"]
    if not c["decay_lr"]:
        return lr
    if it < warmup:
        return lr * (it + 1) / (warmup + 1)
    if it >= decay_end:
        return min_lr
    ratio = (it - warmup) / max(1, decay_end - warmup)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (lr - min_lr)


def train_steps(it, c):
    """
    K for optimizer step `it`, a function of (seed, it) alone: the same on every rank and on resume.
      fixed:     K
      uniform:   K_it ~ U{1..2K−1}                                                    (mean K)
      lognormal: τ ~ N(log(K−1) − σ²/2, σ), K_it = min(Poisson(e^τ) + 1, n_steps_max)  (σ = 1/2)
    'lognormal' is Huginn's log-normal Poisson (Geiping et al. 2025) with r̄ = K − 1: E[e^τ] = r̄, so E[K_it] = K
    before the cap (Huginn's formula with r̄ = K has mean K + 1). Its median is <= K and its right tail is heavy.
    The cap (n_steps_max, 0 = 4K) clips ~0.1% of draws and lowers the mean by <0.1% for K = 2..32; a cap of 2K−1,
    uniform's largest K, would clip 5–10% of them and lower the mean 3–8%. K = 1 always draws 1.
    """
    K = c["n_steps"]
    if c["n_steps_dist"] == "fixed" or K == 0:
        return K
    rng = np.random.default_rng([c["seed"], it])
    if c["n_steps_dist"] == "uniform":
        return int(rng.integers(1, 2 * K))
    sigma = 0.5                                                          # Huginn's
    rate = (K - 1) * math.exp(sigma * rng.standard_normal() - sigma ** 2 / 2)   # e^τ, written without log(0) at K = 1
    return min(int(rng.poisson(rate)) + 1, max_train_steps(c))


def max_train_steps(c):
    """The largest K train_steps can draw: K, 2K−1 ('uniform') or the cap n_steps_max ('lognormal', 0 = 4K)."""
    K, dist = c["n_steps"], c["n_steps_dist"]
    if dist == "fixed" or K == 0:
        return K
    return 2 * K - 1 if dist == "uniform" else c["n_steps_max"] or 4 * K


def seed_micro_batch(c, index):
    """Dropout's RNG, a function of (seed, global micro-batch index): 1 process and W draw the same masks for
    the same micro-batch, and resume needs no saved RNG state."""
    torch.manual_seed(int(np.random.SeedSequence([c["seed"], index]).generate_state(1)[0]))

# -----------------------------------------------------------------------------
# the training step


def cat_batches(batches, kind):
    """Rows of several batches as one (answer ids stay per batch: training does not use them)."""
    return data.Batch(*(torch.cat([getattr(b, f) for b in batches]) for f in ("x", "y")), kind,
                      *(torch.cat([getattr(b, f) for b in batches]) for f in ("answer_mask", "answer_id")))


def micro_batches(it, kind, c, fluency, reasoning, rank, world):
    """This rank's micro-batches of optimizer step `it` as (global micro-batch index, Batch) pairs."""
    B, G = c["batch_size"], c["gradient_accumulation_steps"]
    indices = [data.micro_batch_index(it, m, rank, world, G) for m in range(G // world)]
    if c["routing"] == "mixed":
        r = min(B - 1, max(1, round(B * c["reasoning_fraction"])))   # reasoning rows per micro-batch
        return [(i, cat_batches([fluency.get_batch("train", i, B - r), reasoning.get_batch(i, r)], "reasoning"))
                for i in indices]
    if kind == "reasoning":
        return [(i, reasoning.get_batch(i, B)) for i in indices]
    return [(i, fluency.get_batch("train", i, B)) for i in indices]


def step_counts(batches, c, device, world):
    """(Σ m_valid, Σ m_RL) over every micro-batch of this optimizer step on every rank: the denominators that make
    accumulated micro-batches (and DDP) equal one large batch, token for token."""
    counts = torch.zeros(2, dtype=torch.int64)   # integers, exact, and a dtype every device has (MPS: no float64)
    for b in batches:
        m_valid, m_rl = loss_masks(b.y, b.answer_mask, c["rl_answer_only"])
        counts += torch.stack([m_valid.sum(), m_rl.sum()])
    return all_reduce_sum(counts.to(device), world).float()


def train_step(model, micro, kind, K, c, ctx, scaler, world, device):
    """Forward + backward over this rank's micro-batches, (global index, Batch) pairs; returns this rank's share
    of [loss, ds, rl, imp, ℓ_1..ℓ_K]."""
    counts = step_counts([b for _, b in micro], c, device, world)
    weights = step_weights(max(K, 1), c["weight_schedule"], c["weight_gamma"], c["weight_skip"])
    totals = 0
    for i, (index, b) in enumerate(micro):
        b = b.to(device)
        last = i == len(micro) - 1
        seed_micro_batch(c, index)
        with model.no_sync() if world > 1 and not last else nullcontext():  # all-reduce only on the last micro-step
            with ctx:
                _, nll = model(b.x, b.y, n_steps=K, grad_steps=c["grad_steps"] or None)
            loss, parts = rlrp_loss(nll.float(), b.y, b.answer_mask, kind, weights, c["lambda_rl"], c["lambda_imp"],
                                    c["rl_answer_only"], c["imp_margin"], c["rl_q"], counts=counts)
            # DDP averages gradients over ranks; the loss is already a global mean, so undo the 1/W
            scaler.scale(loss * world).backward()
        totals = totals + torch.cat([torch.stack([loss.detach(), parts["ds"], parts["rl"], parts["imp"]]), parts["nll_k"]])
    return totals

# -----------------------------------------------------------------------------


def load_data(c):
    """(tokenizer, FluencyData | None, ReasoningData | None); light to build, and a bad path or file is one line."""
    try:
        tok = data.get_tokenizer(c["tokenizer"], c["tokenizer_file"])
        fluency = data.FluencyData(c["fluency_data"], tok, c["block_size"], c["seed"]) if c["fluency_data"] else None
        reasoning = data.ReasoningData(c["reasoning_data"], tok, c["block_size"], c["seed"], c["reasoning_eval_data"],
                                       c["reasoning_tasks"], c["gsm8k_answer"]) if c["reasoning_data"] else None
    except (ValueError, FileNotFoundError) as e:
        raise ConfigError(str(e)) from e
    return tok, fluency, reasoning


def catch_stop_signals():
    """SIGINT (Ctrl-C) and SIGTERM (what a cluster scheduler sends before preemption) no longer kill the run: they
    are recorded in the returned list, and the loop finishes its step, writes a checkpoint and exits. The same
    signal again exits at once. (torchrun forwards Ctrl-C to its workers as SIGTERM, hence 'the same'.)"""
    caught = []

    def handler(signum, frame):
        if signum in caught:
            sys.exit(128 + signum)
        caught.append(signum)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, handler)
    return caught


def flat(rec, prefix=""):
    """A record as flat scalars for wandb: {'fluency_loss': [a, b]} -> {'fluency_loss/k1': a, 'fluency_loss/k2': b}."""
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


def window_means(steps):
    """The mean of each logged part over the steps of one kind since the last log; ℓ_k over the steps that ran
    step k (K varies with n_steps_dist='uniform'). steps: [loss, ds, rl, imp, ℓ_1..ℓ_K] lists."""
    rec = {"steps": len(steps), **{name: fmean(s[i] for s in steps) for i, name in enumerate(("loss", "ds", "rl", "imp"))}}
    K = max(len(s) for s in steps) - 4
    rec["nll_k"] = [fmean(s[4 + k] for s in steps if len(s) > 4 + k) for k in range(K)]
    return rec


def main(argv):
    c, ckpt = load_config(argv)
    rank, local_rank, world, device = setup_system(c)
    master, device_type = rank == 0, device.split(":")[0]
    ctx, scaler = precision(c, device_type)
    torch.manual_seed(c["seed"])

    tok, fluency, reasoning = load_data(c)
    router = data.Router(c["reasoning_fraction"])
    ckpt_path = os.path.join(c["out_dir"], "ckpt.pt")
    model = build_model(c, tok, ckpt).to(device)
    optimizer = model.configure_optimizers(c["weight_decay"], c["learning_rate"], (c["beta1"], c["beta2"]), device_type)
    start_iter, best_val, resumed = 0, float("inf"), ckpt is not None
    if resumed:
        optimizer.load_state_dict(ckpt["optimizer"])
        if ckpt.get("scaler"):                            # fp16's loss scale ({} when the scaler is off)
            scaler.load_state_dict(ckpt["scaler"])
        start_iter, best_val = ckpt["iter_num"], ckpt["best_val_loss"]
        ckpt = None  # free the memory
    raw_model = model
    if c["compile"] if c["compile"] is not None else device_type == "cuda":
        raw_model.compile_parts()   # the trunk and one refinement step: any K reuses the same graphs
    if world > 1:
        # truncated backward: when K > grad_steps, z_0 is detached and W_in gets no gradient in that step
        model = DDP(model, device_ids=[local_rank] if device_type == "cuda" else None,
                    find_unused_parameters=0 < c["grad_steps"] < max_train_steps(c))

    # eval sets: fixed, sharded over ranks. A rank may get none, but every rank runs every evaluation (they
    # all-reduce), so what is evaluated is decided by the config, never by a rank's own shard.
    fluency_val = [fluency.get_batch("val", i, c["batch_size"]).to(device)
                   for i in range(rank, c["eval_iters"], world)] if fluency else []
    eval_reasoning = reasoning is not None and c["eval_examples"] > 0
    reasoning_val = reasoning.eval_batches(c["batch_size"], c["eval_examples"]) if eval_reasoning else []
    reasoning_val = [b.to(device) for b in reasoning_val[rank::world]]
    tags = reasoning.eval_tags(c["eval_examples"]) if eval_reasoning else []

    tokens_per_iter = c["gradient_accumulation_steps"] * c["batch_size"] * c["block_size"]
    metrics_path = os.path.join(c["out_dir"], "metrics.jsonl")
    if master:
        os.makedirs(c["out_dir"], exist_ok=True)
        if resumed and not c["eval_only"]:
            checkpoint.keep_records_until(metrics_path, start_iter)
        elif not resumed and not c["eval_only"] and os.path.exists(metrics_path):
            os.remove(metrics_path)  # a fresh run starts a fresh record
        n_params = raw_model.get_num_params()
        print(f"{n_params / 1e6:.2f}M parameters | K={c['n_steps']} | {world} process(es) on {device} | "
              f"{tokens_per_iter:,} tokens per iter | writing {c['out_dir']}/")
    wandb = None
    if c["wandb_log"] and master:
        import wandb
        wandb.init(project=c["wandb_project"], name=c["wandb_run_name"], config=c, resume="allow")

    def record(rec):
        if master:
            with open(metrics_path, "a") as f:
                f.write(json.dumps(rec) + "\n")
            if wandb:
                wandb.log(flat(rec), step=rec["iter"])

    def run_eval(it):
        raw_model.eval()
        rec = {"type": "eval", "iter": it, "tokens": it * tokens_per_iter}
        with ctx:
            if fluency:
                rec["fluency_loss"] = evaluate_fluency(raw_model, fluency_val, c["n_steps"], world)
            if eval_reasoning:
                r = evaluate_reasoning(raw_model, reasoning_val, c["n_steps"], c["eval_examples"], world)
                r["task_exact_match"] = per_task(r.pop("per_example_exact").cpu(), tags)
                rec.update(r)
        raw_model.train()
        if master:
            tqdm.write(format_eval(rec))
        return rec

    saved_at = perf_counter()

    def save(it):
        nonlocal saved_at
        if master:
            checkpoint.save(ckpt_path, {"model_args": asdict(raw_model.config), "model": raw_model.state_dict(),
                                        "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
                                        "iter_num": it, "best_val_loss": best_val, "config": c})
        saved_at = perf_counter()

    if c["eval_only"]:  # evaluate the model as loaded, once; the checkpoint is left untouched
        record(dict(run_eval(start_iter), type="eval_only"))
        if world > 1:
            dist.destroy_process_group()
        return

    stop = catch_stop_signals()
    pbar = tqdm(total=c["max_iters"], initial=start_iter, disable=not master, dynamic_ncols=True)
    new_window = lambda: dict(tokens=0, flops=0, seconds=0.0, fluency=[], reasoning=[], n_steps=[])
    window = new_window()                                     # what the steps since the last log did, and took
    for it in range(start_iter, c["max_iters"] + 1):
        if (it % c["eval_interval"] == 0 or it == c["max_iters"]) and not (resumed and it == start_iter):
            rec = run_eval(it)
            record(rec)
            best_val = min(best_val, rec.get("fluency_loss", [float("inf")])[-1])
            if it > start_iter:
                save(it)
        if it == c["max_iters"]:
            break

        # one optimizer step: its kind, K and micro-batches are functions of (seed, it)
        t_step = perf_counter()
        kind = "reasoning" if c["routing"] == "mixed" else router.kind(it)
        K = train_steps(it, c)
        micro = micro_batches(it, kind, c, fluency, reasoning, rank, world)
        lr = get_lr(it, c)
        for group in optimizer.param_groups:
            group["lr"] = lr
        totals = train_step(model, micro, kind, K, c, ctx, scaler, world, device)
        # one all-reduce: the loss parts, and whether any rank was asked to stop (all ranks stop at the same step)
        totals = all_reduce_sum(torch.cat([totals, totals.new_tensor([float(bool(stop))])]), world).tolist()
        if not math.isfinite(totals[0]):
            raise FloatingPointError(f"non-finite loss at iter {it} ({kind} step); parameters not updated, the last "
                                     f"good checkpoint is {ckpt_path}; lower learning_rate or check the data")
        if c["grad_clip"] > 0:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), c["grad_clip"])
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        pbar.update(1)
        window[kind].append(totals[:-1])
        window["n_steps"].append(K)
        window["tokens"] += tokens_per_iter
        window["flops"] += raw_model.flops_per_token(K, c["block_size"], c["grad_steps"])["total"] * tokens_per_iter
        window["seconds"] += perf_counter() - t_step

        if (it + 1) % c["log_interval"] == 0:
            steps = window["fluency"] + window["reasoning"]
            tflops = window["flops"] / window["seconds"] / world / 1e12       # per process, FLOPs actually run
            rec = {"type": "train", "iter": it + 1, "tokens": (it + 1) * tokens_per_iter, "lr": lr,
                   "loss": sum(s[0] for s in steps) / len(steps), "n_steps": window["n_steps"],
                   **{k: window_means(window[k]) for k in ("fluency", "reasoning") if window[k]},
                   "tokens_per_s": window["tokens"] / window["seconds"], "tflops": tflops}
            if device_type == "cuda":
                rec["mfu"] = tflops / c["gpu_peak_tflops"]
            window = new_window()
            record(rec)
            pbar.set_postfix(loss=f"{rec['loss']:.4f}", tok_s=f"{rec['tokens_per_s']:.0f}", refresh=False)
        if totals[-1] > 0:  # SIGINT / SIGTERM: this step is done; save it and leave
            save(it + 1)
            pbar.close()
            if master:
                print(f"train.py: stopped by a signal after iter {it + 1}; checkpoint written to {ckpt_path} "
                      f"(continue with --init_from=resume)", file=sys.stderr)
            if world > 1:
                dist.destroy_process_group()
            sys.exit(128 + (stop[0] if stop else signal.SIGTERM))
        eval_next = (it + 1) % c["eval_interval"] == 0 or it + 1 == c["max_iters"]    # which saves anyway
        if not eval_next and (c["checkpoint_interval"] and (it + 1) % c["checkpoint_interval"] == 0 or
                              c["checkpoint_minutes"] and perf_counter() - saved_at > 60 * c["checkpoint_minutes"]):
            save(it + 1)   # rank 0 alone writes, so its own clock may decide: no collective
    pbar.close()
    if master:
        print(f"done: metrics in {metrics_path}, checkpoint in {ckpt_path}")
    if world > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except (ConfigError, FloatingPointError) as e:
        # under torchrun every rank raises the same error: rank 0 says it, the others exit quietly
        sys.exit(f"train.py: {e}" if int(os.environ.get("RANK", 0)) == 0 else 1)
