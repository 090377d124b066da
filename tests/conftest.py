"""Shared test set-up: the repository root on sys.path, and GPT-2's tokenizer file provisioned
offline-friendly."""

import atexit
import json
import os
import shutil
import subprocess
import sys
import tempfile

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# `import data`, `import model` also under plain `pytest`; and the scripts kept apart from the method:
# data/prepare.py, bench/*.py, experiments/*.py (a subfolder's script puts the root on sys.path itself)
sys.path[:0] = [ROOT] + [os.path.join(ROOT, d) for d in ("data", "bench", "experiments")]
# Hugging Face libraries: never the network, never the user's cache (set before anything imports them; the
# test subprocesses inherit it)
HF_HOME = tempfile.mkdtemp(prefix="nanorlrp-hf-")
atexit.register(shutil.rmtree, HF_HOME, ignore_errors=True)
os.environ.update(HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", HF_HOME=HF_HOME)


def run_script(*args, cwd=ROOT):
    """A repository script run as a user runs it (one thread), its output captured."""
    return subprocess.run([sys.executable, *args], cwd=cwd, env=dict(os.environ, OMP_NUM_THREADS="1"),
                          capture_output=True, text=True, timeout=300)


def run_torchrun(*args, out_dir):
    """train.py under torchrun with 2 processes (one thread each) writing to out_dir. Retried, up to twice,
    from a fresh out_dir, on exactly one failure: rank 1 ended by std::terminate after the run had finished,
    seen on loaded cores (twice in a row once) and never alone (gloo's teardown race, see train.Run.exit);
    any other failure is returned as it is."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py",
           *args, f"--out_dir={out_dir}"]
    run = lambda: subprocess.run(cmd, cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"),
                                 capture_output=True, text=True, timeout=300)
    result = run()
    for _ in range(2):
        if not (result.returncode and "terminate called without an active exception" in result.stderr):
            break
        shutil.rmtree(out_dir, ignore_errors=True)
        result = run()
    return result


@pytest.fixture(scope="session")
def gpt2_tokenizer_file():
    """GPT-2's ranks file: $NANORLRP_TOKENIZER_FILE, else tests/.cache/gpt2.tiktoken (gitignored),
    fetched there from the openai-whisper sdist on PyPI on first use."""
    if os.environ.get("NANORLRP_TOKENIZER_FILE"):
        return os.environ["NANORLRP_TOKENIZER_FILE"]
    cache = os.path.join(ROOT, "tests", ".cache")
    path = os.path.join(cache, "gpt2.tiktoken")
    if not os.path.isfile(path):
        from prepare import fetch_gpt2_ranks
        fetch_gpt2_ranks(cache)
    return path


@pytest.fixture(scope="session")
def gpt2(gpt2_tokenizer_file):
    from data import get_tokenizer
    return get_tokenizer("gpt2", gpt2_tokenizer_file)


@pytest.fixture(scope="session")
def byte():
    from data import get_tokenizer
    return get_tokenizer("byte")

# -----------------------------------------------------------------------------
# tiny Hugging Face folders, built locally (never the hub): any causal-LM family, every parameter perturbed

HF_FAMILIES = {   # what each family needs beyond the shared tiny sizes; sliding windows shorter than T = 16
    "llama": {}, "qwen2": {}, "qwen3": {"head_dim": 16}, "mistral": {"sliding_window": 4},
    "gemma": {"head_dim": 16}, "phi3": {}, "olmo2": {}, "gpt_neox": {},
    "gemma3_text": {"head_dim": 16, "sliding_window": 4,
                    "layer_types": ["sliding_attention", "full_attention"]},
    "cohere": {"logit_scale": 0.5}, "granite": {"logits_scaling": 2.0},   # logits scaled after lm_head
}


def tiny_hf_folder(path, family, vocab_size=97, seed=0, **extra):
    """save_pretrained of a tiny randomly initialised `family` model into path, its parameters (norms and
    biases too) moved off their init; returns path."""
    import transformers
    sizes = dict(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                 num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64, pad_token_id=0,
                 bos_token_id=1, eos_token_id=2)
    config = transformers.AutoConfig.for_model(family, **{**sizes, **HF_FAMILIES.get(family, {}), **extra})
    torch.manual_seed(seed)
    hf = transformers.AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(0.1 * torch.randn_like(p))
    hf.save_pretrained(path)
    return str(path)


TOKENIZER_KINDS = {   # kind: (BOS, EOS); what each stands for
    "bytelevel": (None, "<|endoftext|>"),                 # GPT-2's, SmolLM2's, Qwen's: no BOS or prefix space
    "bos": ("<|begin_of_text|>", "<|end_of_text|>"),      # Llama 3's: byte-level with a BOS
    "metaspace": ("<s>", "</s>"),                         # Llama 2's SentencePiece: ▁ prefix space and a BOS
}


def tiny_tokenizer(folder, kind="bytelevel"):
    """A tiny BPE tokenizer.json of a kind (TOKENIZER_KINDS), trained on CPython's docs, and a
    tokenizer_config.json naming its EOS, written into folder; returns its vocabulary size."""
    from pydoc_data.topics import topics
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    bos, eos = TOKENIZER_KINDS[kind]
    specials = [t for t in (eos, bos) if t] + (["<unk>"] if kind == "metaspace" else [])
    tok = Tokenizer(models.BPE(unk_token="<unk>" if kind == "metaspace" else None))
    if kind == "metaspace":
        tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first")
        tok.decoder, alphabet = decoders.Metaspace(prepend_scheme="first"), []
    else:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder, alphabet = decoders.ByteLevel(), pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials, initial_alphabet=alphabet)
    tok.train_from_iterator([topics[k] for k in sorted(topics)[:60]] + ["0123456789+-*=()?:"], trainer)
    if bos:
        tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A",
                                                           special_tokens=[(bos, tok.token_to_id(bos))])
    os.makedirs(folder, exist_ok=True)
    tok.save(os.path.join(folder, "tokenizer.json"))
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump({"eos_token": eos}, f)
    return tok.get_vocab_size()


def tiny_lm_folder(path, family="llama", kind="bytelevel", **extra):
    """A tiny HF folder with a tokenizer of that kind: what init_from=DIR and tokenizer='hf' read."""
    return tiny_hf_folder(path, family, vocab_size=tiny_tokenizer(path, kind), **extra)


def crash_at_step(monkeypatch, train, n):
    """train.micro_batches (one call per optimizer step) raising FloatingPointError at step n: a simulated
    crash mid-run, after the checkpoints before it. Returns the real micro_batches."""
    real_batches, calls = train.micro_batches, []

    def crashing(*args, **kwargs):
        calls.append(1)
        if len(calls) == n:
            raise FloatingPointError(f"simulated crash at iter {n}")
        return real_batches(*args, **kwargs)
    monkeypatch.setattr(train, "micro_batches", crashing)
    return real_batches
