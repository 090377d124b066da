"""The 8-GPU presets: they load through train.py's own config path with 8 processes' constraints met, and the
figures in config/train_gpt2_owt.py's comments match an independent computation (meta device: nothing big
is allocated)."""

import ast
import math
import os
import re

import pytest
import torch

import data
import schedules
import train
from checkpoint import build_model
from losses import sampled_unembeds

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OWT = os.path.join(ROOT, "config", "train_gpt2_owt.py")
GSM8K = os.path.join(ROOT, "config", "train_gpt2_gsm8k.py")
GPUS = 8


def assignments(path):
    """{key: value} of a preset's top-level assignments, as written."""
    tree = ast.parse(open(path).read())
    return {node.targets[0].id: ast.literal_eval(node.value)
            for node in tree.body if isinstance(node, ast.Assign)}


def comments(path):
    """The preset's comment text, '#' stripped and whitespace collapsed into one line."""
    text = " ".join(line.strip().lstrip("#") for line in open(path) if line.strip().startswith("#"))
    return " ".join(text.split())


def stated(pattern, text):
    """The groups of the pattern's one match in text, as written (numbers keep their stated precision)."""
    found = re.findall(pattern, text)
    assert len(found) == 1, f"{pattern!r} found {len(found)} times in the comments"
    return found[0]


def near(written, value):
    """A figure written as '491,520', '0.263', '8.332e14' is value rounded to the digits written."""
    number = written.replace(",", "")
    mantissa, _, exponent = number.partition("e")
    decimals = len(mantissa.partition(".")[2])
    half_ulp = 0.5 * 10.0 ** (int(exponent or 0) - decimals)
    assert abs(value - float(number)) <= half_ulp * (1 + 1e-9), f"stated {written}, computed {value}"


def covers_every_micro_batch(c, world=GPUS, steps=3):
    """train.micro_batches' global indices over `world` ranks: each micro-batch of a step exactly once."""
    G = c["gradient_accumulation_steps"]
    assert G % world == 0   # setup_system's check, one line under torchrun
    for it in range(steps):
        got = sorted(schedules.micro_batch_index(it, m, r, world, G)
                     for r in range(world) for m in range(G // world))
        assert got == list(range(it * G, (it + 1) * G))


def flops(L, C, T, K, D, V):
    """Training FLOPs per token the straightforward way: 6 per multiply-add of every matrix, plus attention's
    scores and values (2·L·C·T multiply-adds per token, ×6)."""
    trunk = 6 * L * (3 * C * C + C * C + 2 * 4 * C * C) + 6 * 2 * L * C * T   # qkv, proj, MLP; attention
    H = 4 * D                                                                    # the head's MLP width
    # once per token: fc_h, W_in; every step: fc_z, proj, W_out
    head = 6 * (C * H + C * D) + K * 6 * (D * H + H * D + D * C) if K else 0
    unembed = 6 * C * V * max(K, 1)
    return {"trunk": trunk, "head": head, "unembed": unembed, "total": trunk + head + unembed}


@pytest.fixture(scope="module")
def owt():
    c, ckpt = train.load_config([OWT])
    assert ckpt is None
    return c


@pytest.fixture(scope="module")
def gpt2_tok(gpt2_tokenizer_file):
    return data.get_tokenizer("gpt2", gpt2_tokenizer_file)


@pytest.fixture(scope="module")
def owt_figures(owt, gpt2_tok):
    """The independent figures, and the model as train.py builds it (on the meta device)."""
    c = owt
    V = -(-gpt2_tok.vocab_size // 64) * 64                       # GPT-2's 50257 padded to a multiple of 64
    shape = c["n_layer"], c["n_embd"], c["block_size"], c["n_steps"], c["n_latent"] or c["n_embd"], V
    with torch.device("meta"):
        model = build_model(c, gpt2_tok, None)
    mfu = int(stated(r"ASSUMED (\d+)% MFU", comments(OWT))) / 100
    tokens = c["batch_size"] * c["block_size"] * c["gradient_accumulation_steps"]
    f = flops(*shape)
    return dict(c=c, model=model, V=V, shape=shape, f=f, f0=flops(*shape[:3], 0, *shape[4:]), tokens=tokens,
                rate=GPUS * c["gpu_peak_tflops"] * 1e12 * mfu, mfu=mfu)


@pytest.mark.parametrize("path", [OWT, GSM8K])
def test_preset_loads_for_8_processes_as_written(path):
    c, ckpt = train.load_config([path])     # DEFAULTS, the preset, every constraint: what train.py checks
    assert ckpt is None
    written = assignments(path)
    assert written and all(c[key] == value for key, value in written.items())
    covers_every_micro_batch(c)


def test_owt_preset_sets_the_run_explicitly(owt):
    written = assignments(OWT)
    assert {"out_dir", "fluency_data", "tokenizer", "batch_size", "block_size", "gradient_accumulation_steps",
            "n_layer", "n_head", "n_embd", "n_steps", "learning_rate", "warmup_iters", "lr_decay_iters",
            "min_lr", "max_iters", "eval_interval", "eval_iters", "eval_examples"} <= set(written)
    assert (owt["fluency_data"], owt["tokenizer"], owt["init_from"]) == \
        ("data/openwebtext", "gpt2", "scratch")
    assert (owt["n_layer"], owt["n_head"], owt["n_embd"], owt["n_steps"]) == (12, 12, 768, 4)
    assert owt["lr_decay_iters"] == owt["max_iters"]
    assert owt["eval_iters"] % GPUS == 0    # no rank idles through the fluency eval
    assert "python data/prepare.py fluency --hf_dataset=Skylion007/openwebtext --out_dir=data/openwebtext" \
        in open(OWT).read()


def test_gsm8k_preset_keeps_k_and_paths():
    c, _ = train.load_config([GSM8K])
    assert (c["init_from"], c["n_steps"], c["n_latent"]) == ("gpt2", 4, 384)
    assert (c["fluency_data"], c["reasoning_data"], c["reasoning_eval_data"]) == \
        ("data/openwebtext", "data/gsm8k/train.jsonl", "data/gsm8k/test.jsonl")
    assert c["gradient_accumulation_steps"] == GPUS * 4                         # "8 GPUs x 4"
    assert c["block_size"] <= 1024                                             # GPT-2's context


def test_owt_tokens_per_step_as_stated(owt_figures):
    c, text = owt_figures["c"], comments(OWT)
    B, T, G, total = stated(
        r"batch_size (\d+) x block_size (\d+) x gradient_accumulation_steps (\d+) = ([\d,]+)", text)
    assert (int(B), int(T), int(G)) == (c["batch_size"], c["block_size"], c["gradient_accumulation_steps"])
    near(total, owt_figures["tokens"])
    G, per_gpu, micro = stated(
        r"\((\d+) micro-batches = (\d+) per GPU; ([\d,]+) tokens per GPU per micro-step", text)
    assert int(G) == c["gradient_accumulation_steps"] and int(per_gpu) == int(G) // GPUS
    near(micro, c["batch_size"] * c["block_size"])


def test_owt_flops_per_token_as_stated(owt_figures):
    c, model, f, f0 = (owt_figures[k] for k in ("c", "model", "f", "f0"))
    text = comments(OWT)
    assert model.config.vocab_size == owt_figures["V"] == 50304
    assert model.flops_per_token(c["n_steps"], c["block_size"]) == f     # the repository's count agrees
    assert model.flops_per_token(0, c["block_size"]) == f0
    trunk, head, unembed, total, per_step = stated(
        r"trunk ([\d.]+)M \+ head ([\d.]+)M \+ unembed ([\d.]+)M = ([\d.]+)M; ([\d.e]+) FLOPs per step", text)
    for written, key in ((trunk, "trunk"), (head, "head"), (unembed, "unembed"), (total, "total")):
        near(written, f[key] / 1e6)
    near(per_step, f["total"] * owt_figures["tokens"])
    unembed_share, head_share, ratio, plain = stated(
        r"unembeddings are ([\d.]+)% of it, the head's matmuls ([\d.]+)%; ([\d.]+)x a plain GPT-2's "
        r"\(K = 0: ([\d.]+)M\)", text)
    near(unembed_share, 100 * f["unembed"] / f["total"])
    near(head_share, 100 * f["head"] / f["total"])
    near(ratio, f["total"] / f0["total"])
    near(plain, f0["total"] / 1e6)
    near(stated(r"kernels run ([\d.]+)x these FLOPs", text), (f["total"] + f["unembed"] / 3) / f["total"])


def test_owt_time_as_stated(owt_figures):
    c, text, rate = owt_figures["c"], comments(OWT), owt_figures["rate"]
    gpus, peak = stated(r"(\d+)x H100 SXM at (\d+) TFLOPS bf16 dense each", text)
    assert (int(gpus), float(peak)) == (GPUS, c["gpu_peak_tflops"]) and "not a measurement" in text
    assert math.isclose(owt_figures["mfu"], 0.40)          # the assumption the figures are stated at
    seconds = owt_figures["f"]["total"] * owt_figures["tokens"] / rate
    per_step, steps, hours, run_s, tokens = stated(
        r"([\d.]+) s per step; ([\d,]+) steps in ([\d.]+) h \(([\d,]+) s\), ([\d.]+)B tokens", text)
    near(per_step, seconds)
    assert int(steps.replace(",", "")) == c["max_iters"]
    near(hours, c["max_iters"] * seconds / 3600)
    near(run_s, c["max_iters"] * seconds)
    near(tokens, c["max_iters"] * owt_figures["tokens"] / 1e9)


def test_owt_sampled_figures_as_stated(owt_figures):
    c, model, f, f0 = (owt_figures[k] for k in ("c", "model", "f", "f0"))
    text, N = comments(OWT), c["batch_size"] * c["block_size"]
    fraction, per_token = stated(r"imp_fraction 1/(\d+): ℓ at ([\d.]+) steps per token", text)
    M = math.ceil(N / int(fraction))              # the penalty's positions: ℓ_1 and ℓ_j at each
    assert 1 / int(fraction) == c["imp_fraction"]
    near(per_token, (N + 2 * M) / N)
    unembed = f["unembed"] / c["n_steps"] * (N + 2 * M) / N
    total = f["trunk"] + f["head"] + unembed
    unembeds = sampled_unembeds(c["n_steps"], N, c["imp_fraction"])
    counted = model.flops_per_token(c["n_steps"], c["block_size"], unembeds=unembeds)
    assert math.isclose(counted["total"], total)  # what train.py logs with sampling on
    u, t, per_step, ratio, seconds = stated(
        r"unembed ([\d.]+)M, total ([\d.]+)M per token; ([\d.e]+) FLOPs per step, ([\d.]+)x a plain "
        r"GPT-2's; ([\d.]+) s per step at the assumed MFU", text)
    near(u, unembed / 1e6)
    near(t, total / 1e6)
    near(per_step, total * owt_figures["tokens"])
    near(ratio, total / f0["total"])
    near(seconds, total * owt_figures["tokens"] / owt_figures["rate"])


def test_owt_eval_cost_as_stated(owt_figures, gpt2_tok):
    c, model, f = (owt_figures[k] for k in ("c", "model", "f"))
    text, (L, C, _, K, D, V) = comments(OWT), owt_figures["shape"]
    per_gpu_rate = owt_figures["rate"] / GPUS
    every, k_eval, n_fluency, per_gpu = stated(
        r"eval \(every ([\d,]+) steps, at K = (\d+)\): fluency val loss on (\d+) micro-batches over all "
        r"ranks \((\d+) per GPU\)", text)
    assert (int(every.replace(",", "")), int(k_eval), int(n_fluency)) == \
        (c["eval_interval"], c["n_steps"], c["eval_iters"])
    batches_per_rank = [len(range(r, c["eval_iters"], GPUS)) for r in range(GPUS)]   # evaluate.eval_sets
    assert batches_per_rank == [int(per_gpu)] * GPUS
    forward = f["total"] / 3                                    # 2 FLOPs per multiply-add, at the eval's K
    fl_flops, fl_s = stated(
        r"1/3 of the training FLOPs per token: ([\d.e]+) FLOPs, ([\d.]+) s at the assumed", text)
    near(fl_flops, c["eval_iters"] * c["batch_size"] * c["block_size"] * forward)
    fluency_s = max(batches_per_rank) * c["batch_size"] * c["block_size"] * forward / per_gpu_rate
    near(fl_s, fluency_s)

    # reasoning: one example per row, batches trimmed to their longest row; trunk and head on every position,
    # lm_head on the answer tokens only, once per step (evaluate.evaluate_reasoning)
    suite = data.ReasoningData(c["reasoning_data"], gpt2_tok, c["block_size"], c["seed"],
                               c["reasoning_eval_data"], c["reasoning_tasks"])
    batches = suite.eval_batches(c["batch_size"], c["eval_examples"])
    cost = []
    for b in batches:
        g = flops(L, C, b.x.size(1), K, D, V)
        cost.append(b.x.numel() * (g["trunk"] + g["head"]) / 3 + int(b.answer_mask.sum()) * 2 * C * V * K)
    n_examples, n_batches, rows, width, positions, answers, r_flops, r_ms = stated(
        r"reasoning exact match on (\d+) synthetic examples, one per row, (\d+) batches of <= (\d+) rows "
        r"trimmed to (\d+) tokens \(trunk and head on ([\d,]+) positions, lm_head on ([\d,]+) answer tokens "
        r"per step\): ([\d.e]+) FLOPs, ~(\d+) ms by FLOPs", text)
    assert (int(n_examples), int(n_batches), int(rows)) == (c["eval_examples"], len(batches), c["batch_size"])
    assert int(width) == max(b.x.size(1) for b in batches)
    near(positions, sum(b.x.numel() for b in batches))
    near(answers, sum(int(b.answer_mask.sum()) for b in batches))
    near(r_flops, sum(cost))
    reasoning_s = max(sum(cost[r::GPUS]) for r in range(GPUS)) / per_gpu_rate   # [rank::world] of the batches
    near(r_ms, 1e3 * reasoning_s)

    per_eval, share, between, n_evals, all_s = stated(
        r"Per eval ~([\d.]+) s, ([\d.]+)% of the (\d+) s between evals; (\d+) evals \(iter 0 and the end "
        r"included\) ~(\d+) s in all", text)
    step_s = f["total"] * owt_figures["tokens"] / owt_figures["rate"]
    evals = sum(it % c["eval_interval"] == 0 or it == c["max_iters"] for it in range(c["max_iters"] + 1))
    near(per_eval, fluency_s + reasoning_s)
    near(share, 100 * (fluency_s + reasoning_s) / (c["eval_interval"] * step_s))
    near(between, c["eval_interval"] * step_s)
    assert int(n_evals) == evals
    near(all_s, evals * (fluency_s + reasoning_s))
    n_params = sum(p.numel() for p in model.parameters())
    near(stated(r"~([\d.]+) GB ckpt.pt", text), n_params * 4 * 3 / 1e9)   # fp32 weights, exp_avg, exp_avg_sq
