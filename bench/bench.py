"""
Benchmarks of RLRP training steps: speed, memory, FLOPs and MFU per K (README "Performance").
Forward + backward + AdamW on the real loss, on random tokens: ms/iter, tokens/s, peak memory, analytic FLOPs
per token split trunk / head / unembed, and MFU on a GPU. Every ratio is measured side by side in one
process, repetitions interleaved, medians.

    python bench/bench.py                                      # one row for the config below
    python bench/bench.py --sweep=True --vocab=gpt2            # K in {0,1,2,4,8}: time and FLOP ratios to K=0
    python bench/bench.py --reference=True                     # our K=0 trunk vs a plain nanoGPT-style GPT,
                                                               # each GELU (exact, tanh) side by side
    python bench/bench.py --compare_compile=True               # compile time and graphs: whole vs
                                                               # compile_parts
    python bench/bench.py --device=cuda --compile=True --vocab=gpt2 --n_layer=12 --n_head=12 --n_embd=768 \\
        --block_size=1024 --batch_size=12 --n_steps=4   # GPT-2 small shape, bf16: MFU
    python bench/gpu_check.py --device=cuda --tokenizer_file=gpt2.tiktoken   # the GPU check (its docstring)

MF columns: analytic MFLOPs per token, 6 per multiply-add (model.flops_per_token). Not counted: where the
logits exceed one tile, the fused NLL recomputes them in backward, running 8·C·V per step where 6·C·V are
counted. CPU peak memory is the process's peak RSS, a high-water mark that never goes down, so a sweep
measures each K's memory in a fresh subprocess. train_mem_mb = peak minus the mark before the first training
step. compile_s is the first compiled step at K, k2_compile_s the first at a second K (K - 1): compiling
the objective whole unrolls the K-step loop, so each new K compiles again; GPT.compile_parts compiles the
trunk and one step, which every K reuses (with --compile=True a row's compile_s is its first step). graphs
counts the graphs dynamo compiled. TORCHINDUCTOR_FORCE_DISABLE_CACHES=1 makes compiles cold. On cores shared
with other jobs use --threads=1: a 2-thread op stalls whenever one of its cores is taken.

bench/gpu_check.py, with these keys, checks a GPU machine in one command of <= 8 minutes (speed, MFU, memory,
compile, bf16 vs fp32, 20 steps of train.py), each result printed as it is measured; with --device=cpu the
same sections at a tiny shape (tests/test_bench.py runs it).
"""

import json as json_lib
import os
import resource
import statistics
import subprocess
import sys
import time
from contextlib import nullcontext

import torch
import torch.nn as nn
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # the project root: train.py, model.py, ... import from here

from config.defaults import check
from configurator import ConfigError, configure
from data import Batch
from losses import ObjectiveConfig, sampled_unembeds, supervise
from train import Objective
from model import GPT, GPTConfig

DEFAULTS = dict(
    vocab="byte",             # byte (256) | gpt2 (50257) | char (65, shakespeare_char) | an int
    # the model: nanoGPT's shakespeare_char CPU shape
    n_steps=4,                # K, refinement steps of the latent head (0 = plain GPT)
    batch_size=12,
    block_size=64,
    n_layer=4,
    n_head=4,
    n_embd=128,
    n_latent=0,               # D, latent width (0 = n_embd)
    head_attn="none",         # what a refinement step may read besides h_t: none | trunk | latent
    gelu="exact",             # the MLPs' GELU: exact (nanoGPT's, train.py's default) | tanh (GPT-2's);
                              # --reference=True runs both
    sampled_supervision=False,  # ℓ at one drawn step per token (train.py's key): ~1 + 2f unembeddings, not K
    imp_fraction=0.125,       # f, the share of positions the sampled improvement penalty is estimated on
    # system
    device="cpu",             # cpu | cuda: named, not guessed, so a result says what it measured
    compile=False,            # True: GPT.compile_parts (the trunk and one head step, reused by every K)
    dtype="bfloat16",         # autocast dtype on cuda; CPU runs float32
    gpu_peak_tflops=989.0,    # for MFU: H100/H200 bf16 dense; A100 is 312
    threads=0,                # torch threads, 0 = torch's default (1 on cores shared with other jobs)
    # timing
    warmup=3,                 # untimed steps of each variant first
    iters=10,                 # timed steps of each variant, interleaved; the median is reported
    seed=1337,
    # what to run (none: one row for the config above)
    sweep=False,              # K in {0,1,2,4,8}: time and FLOP ratios to K=0, memory from a subprocess per K
    reference=False,          # our K=0 trunk vs a plain nanoGPT-style GPT, with each GELU (exact, tanh)
    compare_compile=False,    # compile time, graphs and speed: forward compiled whole vs compile_parts vs
                              # eager
    tokenizer_file="",        # bench/gpu_check.py's train.py run: GPT-2's gpt2.tiktoken (or env
                              # NANORLRP_TOKENIZER_FILE); none: the byte tokenizer
    json=False,               # one JSON object per row instead of the table
)
VOCABS = {"byte": 256, "gpt2": 50257, "char": 65}
SWEEP_STEPS = (0, 1, 2, 4, 8)


def parse_args(argv, script=__file__):
    """bench's keys from argv (--help: script's usage); a bad value exits with one line naming script."""
    name = f"bench/{os.path.basename(script)}"
    try:
        cfg = configure(DEFAULTS, argv, doc=script, keys_doc=__file__)
        check(cfg, partial=True)   # train.py's rules (config/defaults.py) on the keys bench shares with it
        if not (cfg["vocab"] in VOCABS or cfg["vocab"].isdigit() and int(cfg["vocab"]) > 0):
            raise ConfigError(f"vocab must be {', '.join(VOCABS)} or a size >= 1, got {cfg['vocab']!r}")
        if cfg["warmup"] < 0 or cfg["iters"] < 1:
            raise ConfigError(f"warmup must be >= 0 and iters >= 1, got {cfg['warmup']} and {cfg['iters']}")
    except ConfigError as e:
        sys.exit(f"{name}: {e}")
    if cfg["threads"]:
        torch.set_num_threads(cfg["threads"])
    return cfg


def vocab_size(cfg):
    return VOCABS[cfg["vocab"]] if cfg["vocab"] in VOCABS else int(cfg["vocab"])


class PlainGPT(nn.Module):
    """A plain nanoGPT-style GPT, independent of model.py: full logits and F.cross_entropy, the reference.
    gelu="exact" is nanoGPT's nn.GELU(); "tanh" is GPT-2's approximation."""

    def __init__(self, vocab_size, block_size, n_layer, n_head, n_embd, gelu="exact"):
        super().__init__()
        C = n_embd
        self.n_head, self.approximate = n_head, {"exact": "none", "tanh": "tanh"}[gelu]
        self.wte, self.wpe = nn.Embedding(vocab_size, C), nn.Embedding(block_size, C)
        self.h = nn.ModuleList(nn.ModuleDict(dict(
            ln_1=nn.LayerNorm(C), c_attn=nn.Linear(C, 3 * C), c_proj=nn.Linear(C, C),
            ln_2=nn.LayerNorm(C), c_fc=nn.Linear(C, 4 * C), mlp_proj=nn.Linear(4 * C, C)))
            for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(C)
        self.lm_head = nn.Linear(C, vocab_size, bias=False)
        self.wte.weight = self.lm_head.weight

    def forward(self, idx, targets):
        B, T = idx.shape
        x = self.wte(idx) + self.wpe(torch.arange(T, device=idx.device))
        for b in self.h:
            qkv = b.c_attn(b.ln_1(x)).chunk(3, dim=2)
            q, k, v = (t.view(B, T, self.n_head, -1).transpose(1, 2) for t in qkv)
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T, -1)
            x = x + b.c_proj(y)
            x = x + b.mlp_proj(F.gelu(b.c_fc(b.ln_2(x)), approximate=self.approximate))
        logits = self.lm_head(self.ln_f(x))
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1)


def optimizer(model, device):
    """nanoGPT's AdamW: decay on matrices only, fused on CUDA."""
    ps = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in ps if p.dim() >= 2], "weight_decay": 0.1},
              {"params": [p for p in ps if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=6e-4, betas=(0.9, 0.95), fused=device == "cuda")


def build_model(cfg, K, plain=None, gelu=None):
    """Our GPT at K refinement steps with its GELU (None: cfg's), or (plain: its GELU) PlainGPT, at cfg's
    shape, on cfg's device."""
    torch.manual_seed(cfg["seed"])
    V, T, dev = vocab_size(cfg), cfg["block_size"], cfg["device"]
    if plain is not None:
        return PlainGPT(V, T, cfg["n_layer"], cfg["n_head"], cfg["n_embd"], gelu=plain).to(dev)
    return GPT(GPTConfig(block_size=T, vocab_size=V, n_layer=cfg["n_layer"], n_head=cfg["n_head"],
                         n_embd=cfg["n_embd"], n_steps=K, n_latent=cfg["n_latent"],
                         head_attn=cfg["head_attn"], gelu=gelu or cfg["gelu"], dropout=0.0)).to(dev)


def random_batch(cfg):
    """A reasoning Batch of random tokens, half of its targets answer tokens: speed and memory do not depend
    on what the tokens are."""
    V, B, T, dev = vocab_size(cfg), cfg["batch_size"], cfg["block_size"], cfg["device"]
    x, y = (torch.randint(V, (B, T), device=dev) for _ in range(2))
    answer = torch.rand(B, T, device=dev) < 0.5
    return Batch(x=x, y=y, kind="reasoning", answer_mask=answer, answer_id=torch.where(answer, 0, -1))


OBJECTIVE = ObjectiveConfig(lambda_rl=1.0, lambda_imp=0.1)   # every term on


def train_loss(run, batch, k, plain=None, sampling=None):
    """The loss one training step backpropagates: PlainGPT's cross-entropy, or ours (run: a losses.Objective
    with OBJECTIVE, as a reasoning batch); sampling: (generator, f) for sampled deep supervision (train.py's),
    None = all K ℓ."""
    if plain is not None:
        return run(batch.x, batch.y)
    if sampling is None:
        sup = supervise(batch, k, OBJECTIVE)
    else:
        generator, f = sampling
        sampled = OBJECTIVE._replace(sampled_supervision=True, imp_fraction=f)
        sup = supervise(batch, k, sampled, generator=generator)
    return run(batch, sup.to(batch.y.device), "reasoning", None)[0]


def make_step(cfg, K=None, plain=None, compile=None, gelu=None):
    """A closure step(k=K) running one training step (real loss, backward, AdamW) with k refinement steps, and
    the model it trains. plain: None for our GPT, else PlainGPT with that GELU. compile: False, True
    (GPT.compile_parts; PlainGPT whole) or 'whole' (our objective compiled whole, its K-step loop unrolled:
    new graphs for every K, for comparison). gelu: our GPT's GELU (None: cfg's)."""
    K = cfg["n_steps"] if K is None else K
    dev = cfg["device"]
    model = build_model(cfg, K, plain, gelu)
    opt = optimizer(model, dev)
    mode = cfg["compile"] if compile is None else compile
    run = model if plain is not None else Objective(model.compile_parts() if mode is True else model,
                                                    OBJECTIVE)
    if mode and (plain is not None or mode == "whole"):   # PlainGPT whole, or our objective whole
        run = torch.compile(run, fullgraph=plain is not None)
    batch = random_batch(cfg)
    ctx = torch.autocast(dev, dtype=getattr(torch, cfg["dtype"])) if dev == "cuda" else nullcontext()
    sampling = (torch.Generator().manual_seed(cfg["seed"]), cfg["imp_fraction"]) \
        if cfg["sampled_supervision"] and plain is None else None

    def step(k=K):
        with ctx:
            loss = train_loss(run, batch, k, plain, sampling)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if dev == "cuda":
            torch.cuda.synchronize()
    return step, model


def time_interleaved(steps, warmup, iters):
    """Median seconds per step for each named step; one repetition of each in turn, so drift hits all
    alike."""
    for step in steps.values():
        for _ in range(warmup):
            step()
    times = {name: [] for name in steps}
    for _ in range(iters):
        for name, step in steps.items():
            t0 = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) for name, t in times.items()}


def peak_mem_mb(device):
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    try:  # Linux's VmHWM: this process's own peak RSS (ru_maxrss also counts the parent's RSS at fork)
        with open("/proc/self/status") as f:
            return next(int(l.split()[1]) for l in f if l.startswith("VmHWM:")) / 2**10
    except OSError:
        kib_or_bytes = 20 if sys.platform == "darwin" else 10   # ru_maxrss: bytes on macOS, KiB on Linux
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** kib_or_bytes


def row(cfg, K, model, dt, mem=None):
    B, T = cfg["batch_size"], cfg["block_size"]
    unembeds = sampled_unembeds(K, B * T, cfg["imp_fraction"]) if cfg["sampled_supervision"] else None
    f = model.flops_per_token(K, T, unembeds=unembeds)
    r = dict(n_steps=K, gelu=model.config.gelu, vocab_size=vocab_size(cfg), ms_per_iter=1e3 * dt,
             tokens_per_s=B * T / dt,
             flops_per_token=f["total"], trunk_flops=f["trunk"], head_flops=f["head"],
             unembed_flops=f["unembed"])
    if mem:
        r.update(mem)
    if cfg["device"] == "cuda":
        r["mfu"] = f["total"] * B * T / dt / (cfg["gpu_peak_tflops"] * 1e12)
    return r


def run_one(cfg):
    """One K in this process: its own peak memory is honest here."""
    step, model = make_step(cfg)
    base = peak_mem_mb(cfg["device"]) if cfg["device"] != "cuda" else torch.cuda.memory_allocated() / 2**20
    compiled = {"compile_s": first_step_s(step)} if cfg["compile"] else {}  # its first step compiles
    dt = time_interleaved({"run": step}, cfg["warmup"], cfg["iters"])["run"]
    peak = peak_mem_mb(cfg["device"])
    mem = {"peak_mem_mb": peak, "train_mem_mb": peak - base}
    return [row(cfg, cfg["n_steps"], model, dt, {**mem, **compiled})]


def memory_in_subprocess(cfg, K):
    """Peak memory of K alone, from a fresh process (the RSS high-water mark cannot be reset)."""
    # str(v), not repr: a str-valued key takes the text after '=' as it is (configurator.py)
    args = [f"--{k}={v}" for k, v in cfg.items() if k not in ("sweep", "json", "iters", "warmup", "n_steps")]
    out = subprocess.run([sys.executable, os.path.abspath(__file__), *args, f"--n_steps={K}", "--iters=2",
                          "--warmup=1", "--json=True"], capture_output=True, text=True, check=True).stdout
    r = json_lib.loads(out.splitlines()[-1])
    return {k: r[k] for k in ("peak_mem_mb", "train_mem_mb")}


def run_sweep(cfg):
    runs = {K: make_step(cfg, K) for K in SWEEP_STEPS}
    dts = time_interleaved({K: s for K, (s, _) in runs.items()}, cfg["warmup"], cfg["iters"])
    rows = [row(cfg, K, runs[K][1], dts[K], memory_in_subprocess(cfg, K)) for K in SWEEP_STEPS]
    for r in rows:
        r["time_ratio"] = r["ms_per_iter"] / rows[0]["ms_per_iter"]
        r["flop_ratio"] = r["flops_per_token"] / rows[0]["flops_per_token"]
        r["quotient"] = r["time_ratio"] / r["flop_ratio"]  # 1.00 = costs exactly what the arithmetic says
    return rows


def run_reference(cfg):
    """Our K=0 model on its training loss vs PlainGPT on plain cross-entropy, same shape, interleaved: a row
    per GELU of ours (exact, tanh), each against nanoGPT as it is (exact GELU, 'vs ref') and with GPT-2's tanh
    GELU ('vs ref(tanh)'), and its speed relative to ours with the exact GELU ('vs exact'). Like with like:
    the exact row's 'vs ref', the tanh row's 'vs ref(tanh)'."""
    ours = {g: make_step(cfg, K=0, gelu=g) for g in ("exact", "tanh")}
    steps = {**{("ours", g): s for g, (s, _) in ours.items()},
             **{("ref", g): make_step(cfg, plain=g)[0] for g in ("exact", "tanh")}}
    dts = time_interleaved(steps, cfg["warmup"], cfg["iters"])
    rows = []
    for g, (_, model) in ours.items():
        dt = dts[("ours", g)]
        r = row(cfg, 0, model, dt)
        r.update(reference_tokens_per_s=r["tokens_per_s"] * dt / dts[("ref", "exact")],
                 speed_vs_reference=dts[("ref", "exact")] / dt,
                 speed_vs_reference_tanh=dts[("ref", "tanh")] / dt,
                 speed_vs_exact=dts[("ours", "exact")] / dt)
        rows.append(r)
    return rows


def first_step_s(step, *k):
    t0 = time.perf_counter()
    step(*k)  # a first step compiles forward and backward
    return time.perf_counter() - t0


def run_compile(cfg):
    """Compile cost and speed of our objective compiled whole vs GPT.compile_parts, side by side with
    eager."""
    from torch._dynamo.utils import counters
    K = cfg["n_steps"]
    eager, model = make_step(cfg, compile=False)
    steps, rows = {"eager": eager}, []
    for mode, name in ((True, "parts"), ("whole", "whole")):
        counters.clear()
        steps[name] = make_step(cfg, compile=mode)[0]
        compile_s = first_step_s(steps[name])
        k2_compile_s = first_step_s(steps[name], max(K - 1, 1))
        rows.append(dict(compile=name, compile_s=compile_s, k2_compile_s=k2_compile_s,
                         graphs=counters["stats"]["unique_graphs"]))
    dts = time_interleaved(steps, cfg["warmup"], cfg["iters"])
    for r in rows:
        r.update(row(cfg, K, model, dts[r["compile"]]),
                 eager_tokens_per_s=cfg["batch_size"] * cfg["block_size"] / dts["eager"],
                 speedup_vs_eager=dts["eager"] / dts[r["compile"]])
    return rows


COLUMNS = [  # (key, header, width, format); MF = MFLOPs per token
    ("compile", "compile", 8, "s"), ("n_steps", "K", 3, "d"), ("gelu", "gelu", 5, "s"),
    ("ms_per_iter", "ms/iter", 9, ".1f"),
    ("tokens_per_s", "tok/s", 8, ".0f"), ("trunk_flops", "trunk MF", 9, ".2f"),
    ("head_flops", "head MF", 8, ".2f"), ("unembed_flops", "unemb MF", 9, ".2f"),
    ("time_ratio", "t/t0", 6, ".2f"), ("flop_ratio", "F/F0", 6, ".2f"), ("quotient", "quot", 6, ".2f"),
    ("peak_mem_mb", "peak MB", 8, ".0f"), ("train_mem_mb", "train MB", 9, ".0f"), ("mfu", "MFU", 6, ".1%"),
    ("reference_tokens_per_s", "ref tok/s", 10, ".0f"), ("speed_vs_reference", "vs ref", 7, ".2f"),
    ("speed_vs_reference_tanh", "vs ref(tanh)", 13, ".2f"), ("speed_vs_exact", "vs exact", 9, ".2f"),
    ("eager_tokens_per_s", "eager tok/s", 12, ".0f"), ("speedup_vs_eager", "speedup", 8, ".2f"),
    ("compile_s", "compile s", 10, ".1f"), ("k2_compile_s", "2nd K s", 8, ".1f"),
    ("graphs", "graphs", 7, "d"),
]


def print_table(cfg, rows):
    cols = [c for c in COLUMNS if c[0] in rows[0]]
    print(f"# {cfg['device']} vocab={vocab_size(cfg)} B={cfg['batch_size']} T={cfg['block_size']} "
          f"L={cfg['n_layer']} H={cfg['n_head']} C={cfg['n_embd']} compile={cfg['compile']} "
          f"sampled_supervision={cfg['sampled_supervision']} "
          f"threads={torch.get_num_threads()}")
    print(" ".join(f"{h:>{w}}" for _, h, w, _ in cols))
    for r in rows:
        print(" ".join(f"{r[k] * (1e-6 if k.endswith('_flops') else 1):>{w}{f}}" for k, _, w, f in cols))


def main(argv):
    cfg = parse_args(argv)
    mode = run_sweep if cfg["sweep"] else run_reference if cfg["reference"] else \
        run_compile if cfg["compare_compile"] else run_one
    rows = mode(cfg)
    if cfg["json"]:
        for r in rows:
            print(json_lib.dumps(r))
    else:
        print_table(cfg, rows)


if __name__ == "__main__":
    main(sys.argv[1:])
