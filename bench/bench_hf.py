"""
A Hugging Face trunk's training speed (hf_trunk.py): our step on an HF causal LM against the same HF model's
own forward + backward, side by side in one process, repetitions interleaved, medians (bench.py's way).

    python bench/bench_hf.py --threads=1                               # SmolLM2-135M's shape, block 256
    python bench/bench_hf.py --init_from=data/smollm2-135m --threads=1  # a folder's own config and weights

Rows, each one training step (forward, backward, AdamW) on the same random tokens: HF's own (model(x,
labels=x).loss, its causal-LM loss), then ours with that model as the trunk on the real RLRP loss (bench.py's
objective, every term on) at K = 0, at K = n_steps, and at K = n_steps with sampled deep supervision. t/HF: a
row's time over HF's own; t/t0: over ours at K = 0. Weights do not change the speed: without init_from the
model is SmolLM2-135M's configuration with random weights (nothing to download).
"""

import os
import sys
import tempfile

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import hf_trunk
from bench import OBJECTIVE, optimizer, random_batch, time_interleaved, train_loss
from configurator import configure
from train import Objective

DEFAULTS = dict(
    init_from="",          # a local Hugging Face folder; '' = SmolLM2-135M's shape (SMOLLM2), random
                           # weights
    n_steps=4,             # K of the rows after K = 0
    batch_size=4,
    block_size=256,
    imp_fraction=0.125,    # f of the sampled row
    threads=0,             # torch threads, 0 = torch's default (1 on cores shared with other jobs)
    warmup=2,              # untimed steps of each row first
    iters=5,               # timed steps of each row, interleaved; the median is reported
    seed=1337,
)
SMOLLM2 = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
               num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
               rope_theta=100000.0, rms_norm_eps=1e-5, tie_word_embeddings=True, bos_token_id=1,
               eos_token_id=2)


def model_folder(cfg, tmp):
    """init_from, or SmolLM2's configuration with random weights saved into tmp."""
    if cfg["init_from"]:
        return cfg["init_from"]
    import transformers
    torch.manual_seed(cfg["seed"])
    config = transformers.AutoConfig.for_model("llama", **SMOLLM2)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(tmp)
    return tmp


def steps(cfg, folder):
    """{row name: one training step}, and our model (for its FLOPs)."""
    import transformers
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).train()
    ours = hf_trunk.from_folder(folder, n_steps=cfg["n_steps"]).train()
    cfg = dict(cfg, vocab=ours.config.vocab_size, device="cpu")
    batch, run = random_batch(cfg), Objective(ours, OBJECTIVE)
    hf_opt, opt = optimizer(hf, "cpu"), optimizer(ours, "cpu")
    draws = torch.Generator().manual_seed(cfg["seed"])

    def train_step(loss, o):
        loss.backward()
        o.step()
        o.zero_grad(set_to_none=True)

    K = cfg["n_steps"]
    rows = {
        "HF's own": lambda: train_step(hf(input_ids=batch.x, labels=batch.x).loss, hf_opt),
        "ours, K = 0": lambda: train_step(train_loss(run, batch, 0), opt),
        f"ours, K = {K}": lambda: train_step(train_loss(run, batch, K), opt),
        f"ours, K = {K}, sampled": lambda: train_step(train_loss(run, batch, K, sampling=(
            draws, cfg["imp_fraction"])), opt),
    }
    return rows, ours


def main(argv):
    cfg = configure(DEFAULTS, argv, doc=__file__)
    if cfg["threads"]:
        torch.set_num_threads(cfg["threads"])
    with tempfile.TemporaryDirectory() as tmp:
        rows, model = steps(cfg, model_folder(cfg, tmp))
    times = time_interleaved(rows, cfg["warmup"], cfg["iters"])
    N, T, K = cfg["batch_size"] * cfg["block_size"], cfg["block_size"], cfg["n_steps"]
    print(f"{model.hf.config.model_type}, {model.get_num_params() / 1e6:.1f}M parameters with the head, "
          f"batch {cfg['batch_size']} x block {T}, {torch.get_num_threads()} thread(s), fp32 CPU")
    print(f"{'row':>22} {'ms/iter':>9} {'tok/s':>8} {'t/HF':>6} {'t/t0':>6}")
    t_hf, t0 = times["HF's own"], times["ours, K = 0"]
    for name, t in times.items():
        print(f"{name:>22} {1e3 * t:9.1f} {N / t:8.0f} {t / t_hf:6.3f} {t / t0:6.3f}")
    mf = [model.flops_per_token(k, T)["total"] / 1e6 for k in (0, K)]
    print(f"ours at K = 0 runs at {t_hf / t0:.3f}x HF's own speed (target >= 0.97); MFLOPs per token at "
          f"K = 0: {mf[0]:.1f}, at K = {K}: {mf[1]:.1f}")
    return times


if __name__ == "__main__":
    main(sys.argv[1:])
