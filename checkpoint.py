"""
Where a run starts from (init_from) and its checkpoints.

The model for init_from (scratch, a checkpoint, GPT-2), atomic checkpoint writes that keep the previous one,
one-line errors for a missing or unreadable file, and the resumed run's config and state.
"""

import os
from dataclasses import asdict

import torch

import data
import hf_trunk
from configurator import ConfigError, configure
from model import GPT, GPTConfig

# What a resumed run may change: where and how often it evaluates, logs and saves, how long it runs and
# where its learning-rate schedule ends, and the machine it runs on. Everything else (architecture, data,
# objective, optimizer, seed) comes from the checkpoint: a different value would make it another run, not
# this one resumed.
SAFE_ON_RESUME = ("out_dir", "init_from", "eval_interval", "log_interval", "eval_iters", "eval_examples",
                  "eval_only", "checkpoint_interval", "checkpoint_minutes", "wandb_log", "wandb_project",
                  "wandb_run_name", "max_iters", "lr_decay_iters", "min_lr", "device", "dtype", "compile",
                  "threads", "gpu_peak_tflops", "tokenizer_file", "eval_tasks")
ARCH_KEYS = ("block_size", "n_layer", "n_head", "n_embd", "bias", "n_steps", "n_latent", "head_attn", "gelu")
# What a checkpoint written before an architecture key existed ran: its value when model_args and config lack
# the key (gelu: every model was GPT-2's tanh GELU until the key came)
BEFORE_THE_KEY = {"gelu": "tanh"}


def saved_model(ckpt, dropout=None):
    """The model a loaded checkpoint holds, with this run's dropout (None: the checkpoint's)."""
    if "hf_config" in ckpt:   # a Hugging Face trunk: its config is in the checkpoint, no folder needed
        return hf_trunk.saved_model(ckpt, dropout)
    args = {**BEFORE_THE_KEY, **ckpt["model_args"], **({} if dropout is None else {"dropout": dropout})}
    model = GPT(GPTConfig(**args))
    model.load_state_dict(ckpt["model"])
    return model


def build_model(c, tok, ckpt):
    """The model for c's init_from (ckpt: the loaded checkpoint when resuming); its block_size must cover the
    run's, and its vocabulary the tokenizer's."""
    if c["init_from"] == "resume":
        model = saved_model(ckpt, c["dropout"])
    elif c["init_from"] == "scratch":
        V = tok.vocab_size if tok.vocab_size < 1024 else -(-tok.vocab_size // 64) * 64  # big ones: pad to ×64
        model = GPT(GPTConfig(vocab_size=V, dropout=c["dropout"], **{k: c[k] for k in ARCH_KEYS}))
    else:
        head = {k: c[k] for k in ("n_steps", "n_latent", "dropout", "head_attn")}
        folder = c["init_from"]
        try:
            model = (hf_trunk.from_folder(folder, bias=c["bias"], gelu=c["gelu"], **head)
                     if hf_trunk.is_hf_folder(folder) else GPT.from_pretrained(folder, **head))
        except (ImportError, OSError, ValueError) as e:
            raise ConfigError(str(e).splitlines()[0]) from e
    if c.get("gradient_checkpointing"):   # HF's: each layer recomputed in backward (check_needs: an HF trunk)
        model.hf.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    if c["block_size"] > model.config.block_size:
        raise ConfigError(f"block_size={c['block_size']} is larger than the model's "
                          f"{model.config.block_size}")
    if tok.vocab_size > model.config.vocab_size:
        raise ConfigError(f"tokenizer {tok.name!r} ({tok.vocab_size} tokens) does not fit the model's "
                          f"vocabulary ({model.config.vocab_size})")
    if c["block_size"] < model.config.block_size:
        model.crop_block_size(c["block_size"])
    return model


def state(model, optimizer, scaler, it, config, curriculum_switches=(), tokenizer=None):
    """What a checkpoint holds: enough to rebuild the model (model_args; an HF trunk's config too) and its
    tokenizer (a Hugging Face folder's, whole), and to continue the run exactly (curriculum_switches: where a
    threshold curriculum's levels joined)."""
    hf = {"hf_config": model.hf.config.to_dict()} if isinstance(model, hf_trunk.HFGPT) else {}
    saved = getattr(tokenizer, "saved", None)
    return {"model_args": asdict(model.config), "model": model.state_dict(),
            "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(), "iter_num": it,
            "config": config, "curriculum_switches": list(curriculum_switches), **hf,
            **({"hf_tokenizer": saved} if saved else {})}


def tokenizer(c, ckpt=None):
    """A run's tokenizer: the one its checkpoint holds (a Hugging Face folder's: no folder needed), else c's
    tokenizer and tokenizer_file."""
    if ckpt and ckpt.get("hf_tokenizer"):
        return hf_trunk.HFTokenizer(**ckpt["hf_tokenizer"])
    return data.get_tokenizer(c["tokenizer"], c["tokenizer_file"])


def restore(ckpt, optimizer, scaler):
    """A resumed run's optimizer and loss-scaler state from ckpt -> its iteration; a new run (ckpt None)
    starts at 0."""
    if ckpt is None:
        return 0
    optimizer.load_state_dict(ckpt["optimizer"])
    if ckpt.get("scaler"):                            # fp16's loss scale ({} when the scaler is off)
        scaler.load_state_dict(ckpt["scaler"])
    return ckpt["iter_num"]


def previous(path):
    """ckpt.pt -> ckpt.prev.pt, the checkpoint before the latest."""
    root, ext = os.path.splitext(path)
    return f"{root}.prev{ext}"


def save(path, state):
    """Atomic (written to a temp file, then renamed): a crash mid-write leaves the last checkpoint intact. The
    one it replaces is kept as ckpt.prev.pt, so a checkpoint damaged later (a full disk, a bad copy) loses one
    interval."""
    torch.save(state, path + ".tmp")
    if os.path.exists(path):
        os.replace(path, previous(path))
    os.replace(path + ".tmp", path)


def load(path):
    """The checkpoint at `path` (on the CPU), or a ConfigError naming the file and what to do instead."""
    prev = previous(path)
    hint = f"; the previous checkpoint is {prev}: copy it to {path} to resume from it" \
        if os.path.exists(prev) else ""
    if not os.path.exists(path):
        raise ConfigError(f"init_from=resume but {path} does not exist"
                          + (hint or "; start with init_from=scratch"))
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # a truncated zip, a damaged pickle, ...: whatever it is, the file cannot be used
        raise ConfigError(f"{path} is unreadable ({type(e).__name__}), truncated or corrupt{hint}") from e


def saved_config(saved):
    """A checkpoint's config in today's keys: a key it lacks takes its BEFORE_THE_KEY value (what it ran), and
    chain_length, since folded into step_targets, becomes its value there ('chain' with chain_length N > 0
    was 'chain:N'), said in one line."""
    c = {**BEFORE_THE_KEY, **saved}
    if "chain_length" in c:
        n = c.pop("chain_length")
        if c["step_targets"] == "chain" and n:
            c["step_targets"] = f"chain:{n}"
        if int(os.environ.get("RANK", 0)) == 0:   # under torchrun every rank resumes: rank 0 says it
            print(f"checkpoint: chain_length={n} -> step_targets={c['step_targets']!r} (the key was folded "
                  "into step_targets)", flush=True)
    return c


def resume_config(defaults, saved, argv):
    """The resumed run's config: the checkpoint's, then argv (presets and --key=value) applied over it. A key
    outside SAFE_ON_RESUME whose value differs from the checkpoint's is an error naming the key. A key the
    checkpoint's config lacks takes its BEFORE_THE_KEY value (what the checkpoint ran), else the default;
    an old key is mapped to today's (saved_config)."""
    base = {**defaults, **{k: v for k, v in saved_config(saved).items() if k in defaults}}
    c = configure(base, argv)
    for key in defaults:
        if key not in SAFE_ON_RESUME and c[key] != base[key]:
            raise ConfigError(f"{key}={c[key]!r} differs from the checkpoint's {base[key]!r}; a resumed run "
                              f"keeps its config except {', '.join(SAFE_ON_RESUME)} (start a new out_dir to "
                              "change it)")
    return c
