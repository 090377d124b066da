"""Per-step targets, level-matched supervision and the answer weight (README "Steps that earn their keep"),
each against a plain re-computation; the chains each step_targets value names ('final' | 'chain' |
'chain:N') and the held-out split of the chain families; bad step_answers, bad values and the old
chain_length key through the real CLI; readout_grad (the progressive loss: test_progressive.py; the curriculum
over levels: test_curriculum.py)."""

import json
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import data
import tasks
import train
from conftest import run_script
from losses import ObjectiveConfig, Supervision, rlrp_loss, step_supervision, step_weights
from train import Objective
from model import GPT, GPTConfig
from schedules import max_n_steps
from test_train import TINY, tiny_gpt

BYTE = data.get_tokenizer("byte")


def batch_with_chains(step_targets="chain:3", tasks_="hopo:1,hopo:2,hopo:3", rows=6):
    rd = data.ReasoningData("synthetic", BYTE, 48, seed=3, tasks=tasks_, step_targets=step_targets)
    return rd.get_batch(0, rows)


# -----------------------------------------------------------------------------
# the chains and the batch's per-step targets

@pytest.mark.parametrize("family", ["hop", "hopo", "iter"])
def test_chain_answers_end_at_the_generators_answer(family):
    rng = np.random.default_rng(0)
    for level in (1, 2, 3, 5):
        prompt, answer = tasks.TASKS[family][0](rng, level)
        chain = tasks.chain_answers(family, prompt, 7)
        assert chain[level - 1] == answer and len(chain) == 7
        assert len(set(chain)) == 7 or family == "iter"          # an 8-cycle: 7 distinct hops
    assert tasks.chain_answers("add", "12+34=", 3) is None


def test_batch_step_targets_are_the_chain_on_answer_tokens_and_y_elsewhere():
    b = batch_with_chains("chain:4")
    assert b.step_y.shape == (4, *b.y.shape)
    outside = ~b.answer_mask | (b.y == BYTE.eot_token)          # prompts, padding, the closing eot
    assert (b.step_y[:, outside] == b.y[outside]).all()
    for r in range(b.y.size(0)):
        text = BYTE.decode(b.x[r][b.x[r] != BYTE.eot_token].tolist())
        prompt = text[:text.index("=") + 1]
        t = int(torch.nonzero(b.answer_mask[r])[0])               # the answer token's position
        want = tasks.chain_answers("hopo", prompt, 4)
        assert [BYTE.decode([int(b.step_y[k, r, t])]) for k in range(4)] == want
        level = int(prompt[prompt.index("^") + 1])
        assert b.level[r, t] == level and b.chain_len[r, t] == 4 and b.y[r, t] == ord(want[level - 1])


def test_chain_stops_at_the_level_and_final_targets_have_none():
    b = batch_with_chains("chain")
    spans = b.answer_mask & (b.y != BYTE.eot_token)
    assert (b.chain_len[spans] == b.level[spans]).all()
    Y, _ = step_supervision(b.y, 3, step_weights(3), b.step_y, b.chain_len, b.level)
    # past its level L a chain keeps a_L = the final answer ("stay")
    for k in range(3):
        past = spans & (b.level <= k + 1)
        assert (Y[k][past] == b.y[past]).all()
    assert batch_with_chains("final").step_y is None


def test_chain_steps_reads_each_value():
    assert [tasks.chain_steps(v, 4) for v in ("final", "chain", "chain:1", "chain:7")] == [0, 4, 1, 7]


@pytest.mark.parametrize("step_targets", ["final", "chain", "chain:1", "chain:3", "chain:5"])
def test_each_value_trains_the_chain_it_names(step_targets):
    """Every answer's step targets against tasks.chain_answers: 'chain' to the example's own level L,
    'chain:N' f^1..f^N whatever L; none with 'final' or for other families (as chain_length None / 0 / N
    gave)."""
    N = int(step_targets[6:]) if step_targets.startswith("chain:") else None
    b = data.ReasoningData("synthetic", BYTE, 64, seed=3, tasks="hop:2,hopo:4,iter:3,add:2",
                           step_targets=step_targets).get_batch(0, 12)
    assert (b.step_y is None) == (step_targets == "final")
    seen = set()
    for r, i in sorted({(r, int(b.answer_id[r, t])) for r, t in torch.nonzero(b.answer_mask).tolist()}):
        span = torch.nonzero(b.answer_id[r] == i)[:-1, 0]           # the answer's tokens, not its eot
        prompt = BYTE.decode(b.x[r, :span[0] + 1].tolist()).split(data.EOT)[-1]
        family = "hop" if ">" in prompt else "iter" if prompt.startswith("f^") else "add"  # hopo: hop's chain
        n = 0 if step_targets == "final" or family == "add" else N or int(b.level[r, span[0]])
        S = 0 if b.chain_len is None else int(b.chain_len[r, span[0]])
        assert [BYTE.decode(b.step_y[k, r, span].tolist()) for k in range(S)] == \
            (tasks.chain_answers(family, prompt, n) if n else []), prompt
        seen.add(family)
    assert seen == {"hop", "iter", "add"}


def test_held_out_answers_never_appear_as_a_step_target_in_training():
    """The chain families split on the prompt without its level: no (map, start) of the eval set trains at
    any level, so no held-out answer f^L(x) is ever a step target."""
    suite = "hopo:1,hopo:2,hopo:3"
    rd = data.ReasoningData("synthetic", BYTE, 48, seed=0, tasks=suite, step_targets="chain:3")
    eval_keys = {tasks.split_key("hopo", p) for p, _ in rd.eval_examples(3000)}
    trained = set()
    for i in range(40):
        b = rd.get_batch(i, 32)
        for r in range(32):
            text = BYTE.decode(b.x[r][1:].tolist())
            trained.add(tasks.split_key("hopo", text[:text.index("=") + 1]))
    assert len(trained) > 1000 and not trained & eval_keys
    # the level is what the key drops: the same map and start at every level is one key
    assert tasks.split_key("hopo", "p>q;f^3(p)=") == tasks.split_key("hopo", "p>q;f^1(p)=")


# -----------------------------------------------------------------------------
# the loss with per-step labels and weights, against plain re-computations

def per_step_nll(logits, Y):
    """ℓ[k] = cross-entropy of logits[k] against step k's labels, by F.cross_entropy per step."""
    return torch.stack([F.cross_entropy(logits[k].transpose(1, 2), Y[k].clamp(min=0), reduction="none")
                        * (Y[k] >= 0) for k in range(len(Y))])


def test_per_step_targets_equal_a_plain_recomputation_with_per_step_labels():
    b = batch_with_chains("chain:3")
    K, V = 3, BYTE.vocab_size
    logits = torch.randn(K, *b.y.shape, V, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    w = step_weights(K, "linear")
    Y, W = step_supervision(b.y, K, w, b.step_y, b.chain_len, b.level)
    loss, parts = rlrp_loss(per_step_nll(logits, Y), b.y, b.answer_mask, "reasoning", W, lambda_rl=0.5)
    # written out: Σ_k w_k · mean over valid tokens of CE(step k, a_k), plus λ_rl · Σ_k w_k · mean over the
    # answer tokens of 1 − p_k(a_k)
    valid, ds, rl = b.y >= 0, 0.0, 0.0
    for k in range(K):
        labels = torch.where(b.answer_mask & (b.y != BYTE.eot_token), b.step_y[k], b.y)
        ce = F.cross_entropy(logits[k][valid], labels[valid], reduction="none")
        ds += w[k].item() * ce.mean()
        p = torch.softmax(logits[k][b.answer_mask], -1).gather(1, labels[b.answer_mask][:, None])
        rl += w[k].item() * (1 - p).mean()
    assert torch.allclose(parts["ds"], ds) and torch.allclose(parts["rl"], rl)
    assert torch.allclose(loss, ds + 0.5 * rl)


def test_model_forward_takes_per_step_targets():
    model = tiny_gpt(2, 3).double()
    torch.nn.init.normal_(model.latent_head.w_out.weight, std=0.1)   # steps that differ
    b = batch_with_chains("chain:3", rows=2)
    Y, _ = step_supervision(b.y, 3, step_weights(3), b.step_y)
    _, nll = model(b.x, Y, n_steps=3)
    logits, _ = model(b.x, n_steps=3)
    assert torch.allclose(nll, per_step_nll(logits, Y))


@pytest.mark.parametrize("rule", ["at", "from"])
def test_level_steps_touch_only_the_intended_steps(rule):
    b = batch_with_chains("final", tasks_="hopo:1,hopo:2,hopo:3,hopo:5")
    K, w = 4, step_weights(4, "linear")
    _, W = step_supervision(b.y, K, w, level=b.level, level_steps=rule)
    assert torch.allclose(W.sum(0), torch.ones(()))
    for r, t in zip(*torch.nonzero(b.answer_mask, as_tuple=True)):
        L = min(int(b.level[r, t]), K)                            # level 5 > K = 4: its last step
        want = torch.zeros(K)
        if rule == "at":
            want[L - 1] = 1.0
        else:
            want[L - 1:] = w[L - 1:] / w[L - 1:].sum()
        assert torch.allclose(W[:, r, t], want)
    prompt = ~b.answer_mask
    assert torch.allclose(W[:, prompt], w[:, None].expand(K, int(prompt.sum())))   # prompt tokens keep w


def test_beyond_chain_none_drops_the_steps_past_the_chain():
    b = batch_with_chains("chain")                          # S = the level
    for schedule in ("linear", "last"):
        w = step_weights(3, schedule)
        _, W = step_supervision(b.y, 3, w, b.step_y, b.chain_len, b.level, beyond_chain="none")
        for r, t in zip(*torch.nonzero(b.answer_mask, as_tuple=True)):
            S = int(b.chain_len[r, t])
            want = torch.zeros(3)
            want[:S] = w[:S] / w[:S].sum() if w[:S].sum() > 0 else torch.eye(S)[S - 1]  # 'last': step S
            assert torch.allclose(W[:, r, t], want), (schedule, S)


def test_answer_weight_is_a_weighted_mean_over_tokens():
    b = batch_with_chains("final")
    nll = torch.rand(2, *b.y.shape, generator=torch.Generator().manual_seed(1)) * (b.y >= 0)
    w = step_weights(2, "uniform")
    _, parts = rlrp_loss(nll, b.y, b.answer_mask, "reasoning", w, answer_weight=20.0)
    a = torch.where(b.answer_mask, 20.0, 1.0)[b.y >= 0]
    per_token = (0.5 * nll[0] + 0.5 * nll[1])[b.y >= 0]
    assert torch.allclose(parts["ds"], (a * per_token).sum() / a.sum())


def test_mixed_routing_concatenates_per_step_targets_with_fluency_rows():
    b = batch_with_chains("chain:3", rows=2)
    fl = data.FluencyData("pydoc", BYTE, 48).get_batch("train", 0, 2)
    mixed = data.cat_batches([fl, b], "reasoning")
    assert mixed.step_y.shape == (3, 4, 48)
    assert (mixed.step_y[:, :2] == fl.y).all() and (mixed.step_y[:, 2:] == b.step_y).all()
    assert (mixed.chain_len[:2] == 0).all() and (mixed.level[2:] == b.level).all()


# -----------------------------------------------------------------------------
# train.py: JSONL step_answers, and bad ones as one-line errors

def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def lookup_rows(n):
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        prompt, answer = tasks.TASKS["hopo"][0](rng, 1 + i % 2)
        steps = tasks.chain_answers("hopo", prompt, 2)
        rows.append({"prompt": prompt, "answer": answer, "step_answers": steps, "level": 1 + i % 2})
    return rows


@pytest.mark.slow
def test_train_runs_on_jsonl_step_answers(tmp_path):
    rows = lookup_rows(60)
    train_file, eval_file = write_jsonl(tmp_path / "t.jsonl", rows[:50]), write_jsonl(tmp_path / "e.jsonl",
                                                                                      rows[50:])
    out = tmp_path / "out"
    r = run_script("train.py", *TINY, f"--reasoning_data={train_file}", f"--reasoning_eval_data={eval_file}",
                   "--reasoning_fraction=1.0", "--step_targets=chain", "--lambda_imp=0", "--max_iters=3",
                   "--eval_interval=3", f"--out_dir={out}")
    assert r.returncode == 0, r.stderr
    assert "EM jsonl" in r.stdout


@pytest.mark.parametrize("row, message", [
    ({"step_answers": "q"}, '"step_answers" must be a list of 1..1000 strings, got "q"'),
    ({"step_answers": []}, '"step_answers" must be a list of 1..1000 strings, got \\[\\]'),
    ({"step_answers": ["q", 3]}, "must be a list of 1..1000 strings"),
    ({"step_answers": ["qq", "r"]}, r"step_answers\[0\] 'qq' is 2 tokens, the answer 'r' 1"),
    ({"level": 0}, '"level" must be an integer in 1..1000, got 0'),
])
def test_bad_step_answers_are_one_line_errors_naming_the_row(tmp_path, row, message):
    good = {"prompt": "p>r;f^1(p)=", "answer": "r"}
    path = write_jsonl(tmp_path / "bad.jsonl", [good, {**good, **row}, good])
    r = run_script("train.py", *TINY, f"--reasoning_data={path}", "--step_targets=chain", "--lambda_imp=0",
                   "--max_iters=1")
    assert r.returncode != 0 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "bad.jsonl:2:" in r.stderr
    assert re.search(message, r.stderr), r.stderr


@pytest.mark.parametrize("args, message", [
    (["--step_targets=chain"], "step_targets='chain' needs lambda_imp=0"),
    (["--step_targets=chain:2"], "step_targets='chain:2' needs lambda_imp=0"),
    (["--level_steps=first"], "level_steps must be one of all, at, from"),
    (["--beyond_chain=none", "--level_steps=at"], "both choose the supervised steps"),
    (["--answer_weight=0"], "answer_weight must be > 0"),
])
def test_step_options_config_errors(args, message):
    with pytest.raises(train.ConfigError, match=message):
        train.load_config(TINY + args)


@pytest.mark.parametrize("value", ["chain:0", "chain:x", "chains", "chain:", "chain:-1", "Final", "steps"])
def test_step_targets_is_final_chain_or_chain_n_else_one_line(value):
    with pytest.raises(train.ConfigError) as e:
        train.load_config(TINY + [f"--step_targets={value}", "--lambda_imp=0"])
    assert str(e.value) == f"step_targets must be 'final', 'chain' or 'chain:N' (N >= 1), got {value!r}"
    for good in ("final", "chain", "chain:1", "chain:12"):
        c, _ = train.load_config(TINY + [f"--step_targets={good}", "--lambda_imp=0"])
        assert c["step_targets"] == good


@pytest.mark.parametrize("args, message", [
    (["--chain_length=3"], "train.py: chain_length was folded into step_targets: use step_targets='chain:N' "
                           "(f^1..f^N for every example) or 'chain' (each example's own level)"),
    (["PRESET"], "train.py: chain_length was folded into step_targets: use step_targets='chain:N'"),
    (["--step_targets=chain:x"], "train.py: step_targets must be 'final', 'chain' or 'chain:N' (N >= 1), "
                                 "got 'chain:x'"),
])
def test_the_old_key_and_bad_step_targets_stop_the_cli_with_one_line(tmp_path, args, message):
    """chain_length was folded into step_targets: on the command line or in a preset it names the new key."""
    preset = tmp_path / "old.py"
    preset.write_text('step_targets = "chain"\nchain_length = 0\n')
    r = run_script("train.py", *TINY, *[str(preset) if a == "PRESET" else a for a in args], "--max_iters=1")
    assert r.returncode != 0 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert r.stderr.startswith(message) and "Traceback" not in r.stderr and r.stdout == "", r.stderr


def test_steps_preset_never_trains_a_level_above_its_highest():
    """config/train_steps.py: no chain is longer than the highest trained level, and the steps past it that
    random K draws (up to 2K − 1) get no loss on an answer, so the levels above it (the extrapolation test)
    are never trained, not even as a step's target."""
    c, _ = train.load_config(["config/train_steps.py"])
    highest = max(level for _, level in tasks.parse_tasks(c["reasoning_tasks"]))
    n = tasks.chain_steps(c["step_targets"], highest)           # 'chain:N': N at every level
    assert c["step_targets"].startswith("chain:") and n <= highest == c["n_steps"]
    K = max_n_steps(c)
    assert (c["n_steps_dist"], c["beyond_chain"], K) == ("uniform", "none", 2 * highest - 1)
    b = train.load_data(c)[2].get_batch(0, 8)
    assert b.step_y.size(0) == n and (b.chain_len[b.answer_mask] == n).all()
    _, W = step_supervision(b.y, K, step_weights(K, c["weight_schedule"]), b.step_y, b.chain_len, b.level,
                            c["beyond_chain"], c["level_steps"])
    answer = W[:, b.answer_mask]                                # (K, answer tokens)
    assert (answer[n:] == 0).all() and (answer[:n] > 0).all()


# -----------------------------------------------------------------------------
# readout_grad: which steps' losses reach the trunk through the readout's residual h_t

@pytest.mark.parametrize("attn", ["none", "trunk"])
def test_readout_grad_first_equals_a_recomputation_with_h_detached_in_later_readouts(attn):
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=48, vocab_size=257, n_layer=1, n_head=2, n_embd=32, n_steps=3,
                          n_latent=16, head_attn=attn))
    with torch.no_grad():
        model.latent_head.w_out.weight.normal_(0, 0.1)
    b = batch_with_chains("chain:3", rows=4)
    w = step_weights(3, "linear")

    def grads(nll):
        model.zero_grad()
        ((nll * w[:, None, None]).sum() / (b.y >= 0).sum()).backward()
        return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}

    nll_all = model(b.x, b.step_y, n_steps=3)[1]
    g_all = grads(nll_all)
    sup = Supervision(targets=b.step_y, weights=w, n_steps=3)
    nll_first = Objective(model, ObjectiveConfig(readout_grad="first")).step_nll(b.x, sup)
    g_first = grads(nll_first)
    h = model.trunk(b.x)
    _, z = model.latent_head(h, 3, return_latents=True)
    o = [model.latent_head.readout(h if k == 1 else h.detach(), z[k]) for k in (1, 2, 3)]
    want = grads(torch.stack([model.step_nll(o_k, y_k) for o_k, y_k in zip(o, b.step_y)]))
    assert torch.equal(nll_all, nll_first)                        # the same values: only gradients differ
    assert g_first.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(g_first[name], want[name], rtol=1e-5, atol=1e-7)
    assert not torch.allclose(g_first["transformer.wte.weight"], g_all["transformer.wte.weight"])
    assert torch.equal(g_first["latent_head.w_out.weight"], g_all["latent_head.w_out.weight"])


def test_readout_grad_is_checked():
    with pytest.raises(train.ConfigError, match="readout_grad must be one of all, first, got 'last'"):
        train.load_config(TINY + ["--readout_grad=last"])
