"""train.py and sample.py on a Hugging Face folder (init_from=DIR): training with the folder's tokenizer, a
checkpoint that needs the folder no more, exact resume, gradient checkpointing, one-line refusals, and
sampling equal to transformers' own generate."""

import os
import shutil

import pytest
import torch
import transformers

import hf_trunk
import train
from conftest import ROOT, run_script, run_torchrun, tiny_lm_folder
from test_train import final_params, records

HF_TINY = ["--device=cpu", "--dtype=float32", "--compile=False", "--fluency_data=pydoc",
           "--reasoning_data=synthetic", "--reasoning_tasks=add:2", "--n_steps=2", "--n_latent=16",
           "--block_size=48", "--batch_size=2", "--gradient_accumulation_steps=2", "--eval_iters=2",
           "--eval_examples=8", "--log_interval=1", "--warmup_iters=2", "--lr_decay_iters=6",
           "--learning_rate=3e-3"]


@pytest.fixture
def llama(tmp_path):
    """A tiny Llama folder with a Llama-3-like tokenizer (a BOS), 64 positions."""
    return tiny_lm_folder(tmp_path / "llama", "llama", "bos")


def test_train_on_a_folder_then_resume_exactly_without_it(llama, tmp_path):
    """tokenizer='auto' takes the folder's; the checkpoint holds the HF config and tokenizer.json, so the
    folder can go; resume continues bit for bit (dropout, random K, sampled supervision)."""
    extra = [f"--init_from={llama}", "--dropout=0.1", "--n_steps_dist=uniform", "--sampled_supervision=True",
             "--eval_interval=3"]
    full, half = tmp_path / "full", tmp_path / "half"
    for out, n in ((full, 6), (half, 3)):   # the CLI: train.main in-process would keep its signal handlers
        r = run_script("train.py", *HF_TINY, *extra, f"--out_dir={out}", f"--max_iters={n}")
        assert r.returncode == 0, r.stderr[-2000:]
    ckpt = torch.load(half / "ckpt.pt", weights_only=False)
    assert ckpt["config"]["tokenizer"] == "hf" and ckpt["hf_config"]["model_type"] == "llama"
    assert ckpt["hf_tokenizer"]["json_text"] == open(f"{llama}/tokenizer.json").read()
    shutil.rmtree(llama)
    r = run_script("train.py", f"--out_dir={half}", "--init_from=resume", "--max_iters=6")
    assert r.returncode == 0, r.stderr[-2000:]
    a, b = records(full, "train"), records(half, "train")
    assert [r["loss"] for r in a] == [r["loss"] for r in b] and len(a) == 6
    for k, v in final_params(full).items():
        assert torch.equal(v, final_params(half)[k]), k
    r = run_script("sample.py", f"--out_dir={half}", "--start=1+2=", "--temperature=0", "--max_new_tokens=4",
                   "--show_steps=True", "--device=cpu", "--num_samples=1")
    assert r.returncode == 0 and r.stdout.startswith("1+2=") and "k=2" in r.stdout, r.stderr


def test_gradient_checkpointing_gives_the_same_gradients(llama):
    """gradient_checkpointing=True recomputes each layer in backward: the same gradients, bit for bit here."""
    grads = []
    for on in (False, True):
        torch.manual_seed(0)                                       # the same fresh head
        c, _ = train.load_config(HF_TINY + [f"--init_from={llama}", f"--gradient_checkpointing={on}"])
        model = train.build_model(c, train.load_data(c)[0], None)
        model.latent_head.w_out.weight.data.normal_(0, 0.1, generator=torch.Generator().manual_seed(0))
        x = torch.randint(model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(1))
        model(x, torch.roll(x, -1, 1))[1].mean().backward()
        assert model.hf.get_decoder().gradient_checkpointing == on
        grads.append({n: p.grad for n, p in model.named_parameters()})
    assert all(torch.equal(grads[0][n], grads[1][n]) for n in grads[0])


@pytest.mark.parametrize("family, extra, line", [
    ("phi", {}, "train.py: phi: lm_head has a bias"),
    ("llama", {}, "train.py: gradient_checkpointing=True does nothing without init_from = a local Hugging"),
])
def test_refusals_are_one_line(tmp_path, family, extra, line):
    folder = tiny_lm_folder(tmp_path / family, family, **extra)
    init = f"--init_from={folder}" if family == "phi" else "--init_from=scratch"
    r = run_script("train.py", *HF_TINY, init, f"--out_dir={tmp_path}/out", "--tokenizer_file=" + folder,
                   "--tokenizer=hf", "--gradient_checkpointing=" + str(family != "phi"))
    assert r.returncode == 1 and r.stderr.strip().startswith(line) and r.stderr.strip().count("\n") == 0, \
        r.stderr[-2000:]


@pytest.mark.parametrize("family", ["llama", "gemma3_text"])
def test_sample_from_a_folder_is_transformers_greedy_generate(tmp_path, family):
    """sample.py --init_from=DIR, the head attached at identity (W_out = 0): greedy decoding gives
    transformers' own generate, token for token (Gemma 3's sliding window shorter than the text)."""
    folder = tiny_lm_folder(tmp_path / family, family, "bytelevel")
    tok = hf_trunk.folder_tokenizer(folder)
    prompt = "The capital of France is"
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    x = torch.tensor([[tok.eot_token] + tok.bos + tok.encode(prompt)])
    # an explicit mask: the eot here is the tiny config's pad_token_id, which generate would mask out
    want = hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=12, min_new_tokens=12,
                       do_sample=False)[0, x.size(1):]
    r = run_script("sample.py", f"--init_from={folder}", f"--start={prompt}", "--temperature=0",
                   "--max_new_tokens=12", "--stop_at_eot=False", "--device=cpu", "--dtype=float32",
                   "--num_samples=1")
    assert r.returncode == 0, r.stderr
    assert r.stdout == tok.decode(tok.encode(prompt) + want.tolist()) + "\n---------------\n"


def test_bench_hf_times_the_hf_model_beside_ours(llama):
    r = run_script("bench/bench_hf.py", f"--init_from={llama}", "--batch_size=1", "--block_size=16",
                   "--warmup=1", "--iters=1", "--threads=1")
    assert r.returncode == 0, r.stderr[-2000:]
    for row in ("HF's own", "ours, K = 0", "ours, K = 4", "ours, K = 4, sampled"):
        assert any(line.strip().startswith(row + " ") for line in r.stdout.splitlines()), row
    assert "x HF's own speed (target >= 0.97)" in r.stdout


@pytest.mark.parametrize("preset", ["config/finetune_smollm2_gsm8k.py", "config/finetune_smollm2_cpu.py"])
def test_smollm2_presets_load_as_written(llama, preset):
    """The presets as train.py checks them (the SmolLM2 folder stood in for by a tiny one): every key as
    written, the folder's tokenizer."""
    c, _ = train.load_config([os.path.join(ROOT, preset), f"--init_from={llama}"])
    written = {}
    exec(open(os.path.join(ROOT, preset)).read(), {}, written)
    assert all(c[k] == v for k, v in written.items() if k != "init_from")
    assert written["init_from"] == "data/smollm2-135m" and c["tokenizer"] == "hf"


def test_gsm8k_preset_flops_as_stated():
    """Its comment's MFLOPs per token and PFLOPs, from SmolLM2-135M's configuration (bench_hf.SMOLLM2)."""
    from bench_hf import SMOLLM2
    from losses import sampled_unembeds
    c, _ = train.load_config([os.path.join(ROOT, "config/finetune_smollm2_gsm8k.py"), "--init_from=scratch",
                              "--tokenizer=byte"])
    with torch.device("meta"):
        config = transformers.AutoConfig.for_model("llama", **SMOLLM2)
        hf = transformers.AutoModelForCausalLM.from_config(config)
        model = hf_trunk.HFGPT(hf, hf_trunk.gpt_config(hf, c["n_steps"]))
    T, tokens = c["block_size"], c["batch_size"] * c["block_size"] * c["gradient_accumulation_steps"]
    f = model.flops_per_token(4, T, unembeds=sampled_unembeds(4, c["batch_size"] * T, c["imp_fraction"]))
    text = open(os.path.join(ROOT, "config/finetune_smollm2_gsm8k.py")).read()
    assert f"{f['total'] / 1e6:,.0f} MFLOPs per token" in text
    assert f"({model.flops_per_token(0, T)['total'] / 1e6:,.0f} at K = 0)" in text
    assert f"{tokens:,}\n# tokens" in text
    assert f"{f['total'] * tokens * c['max_iters'] / 1e15:.1f} PFLOPs" in text


@pytest.mark.slow
def test_ddp_two_processes_equal_one_process_on_an_hf_trunk(llama, tmp_path):
    """2 gloo processes train a tiny Llama trunk as one process does (dropout, random K, sampled supervision):
    DDP finds every HF parameter used."""
    args = HF_TINY + [f"--init_from={llama}", "--max_iters=4", "--eval_interval=4", "--dropout=0.1",
                      "--n_steps_dist=uniform", "--sampled_supervision=True", "--eval_iters=1"]
    one, two = tmp_path / "one", tmp_path / "two"
    r = run_script("train.py", *args, f"--out_dir={one}")
    assert r.returncode == 0, r.stderr[-2000:]
    ddp = run_torchrun(*args, out_dir=str(two))
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    a, b = records(one, "train"), records(two, "train")
    assert [r["n_steps"] for r in a] == [r["n_steps"] for r in b] and len(a) == 4
    for ra, rb in zip(a, b):
        assert ra["loss"] == pytest.approx(rb["loss"], abs=1e-5)
    pa, pb = final_params(one), final_params(two)
    assert all(torch.allclose(pa[k], pb[k], atol=1e-5) for k in pa)
