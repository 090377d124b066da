"""
Any local Hugging Face causal LM as the trunk (init_from=DIR): Llama, Qwen, Gemma, OLMo, SmolLM2, ...

The head reads h_t, the decoder's last hidden state before its final norm, and writes o_k = h_t + W_out·z_k,
which goes through that norm and lm_head. So the HF model is cut in three: its decoder with the final norm
replaced by nn.Identity (h = trunk(x)), the norm (LN_f) and lm_head; everything else is GPT's (model.py):
the head, forward, the training parts, generation. GPT-2 folders keep model.py's native GPT.

    h = decoder(x)                                 (B, T, C), the norm taken out
    logits_k = lm_head(LN_f(o_k)) · s / d          Cohere's logit_scale s, Granite's logits_scaling d

A family that changes the logits after lm_head in another way (Gemma 2's soft-capping, Phi's lm_head bias) is
refused: the fused loss (linear_ce) cannot express it. Whatever the family, loading checks I2 on a short probe
against the HF model's own logits (its default attention) and refuses with one line if they differ.
The folder's tokenizer (HFTokenizer) and the HF config travel in the checkpoint: neither resume nor sample.py
needs the folder again. transformers and tokenizers are optional, imported only here.
"""

import hashlib
import json
import os

import numpy as np
import torch
import torch.nn as nn

from data import token_dtype
from latent_head import LatentHead
from linear_ce import token_nll
from model import GPT, GPTConfig

FINAL_NORMS = ("norm", "ln_f", "final_layernorm", "final_layer_norm", "final_norm", "norm_f")
# HF's own models keep their logits for backward; so does a step here up to 2^24 of them (64 MB in fp32),
# instead of recomputing them (linear_ce): at a 49,152-token vocabulary recomputing made K = 0 train at 0.94×
# HF's own step. Bigger steps are tiled, as the native trunk's always are.
KEEP_LOGITS = 2 ** 24


def need(package, what):
    """The optional package, imported now; if absent, an ImportError of one line naming its install."""
    try:
        return __import__(package)
    except ImportError:
        raise ImportError(f"{what} needs {package}: pip install {package}") from None


def folder_json(folder, name="config.json"):
    """A JSON file of a local model folder as a dict, or {} where the folder holds none."""
    path = os.path.join(folder, name)
    if not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def is_hf_folder(path):
    """Whether init_from=path is a local Hugging Face model this module loads (GPT-2's: model.py's path)."""
    return os.path.isdir(path) and folder_json(path).get("model_type", "gpt2") != "gpt2"


def refusal(hf):
    """Why this HF model cannot be a trunk here, in one line naming its family, or None."""
    family, soft_cap = hf.config.model_type, getattr(hf.config, "final_logit_softcapping", None)
    if soft_cap:
        return (f"{family}: final_logit_softcapping={soft_cap} caps the logits after lm_head (tanh), which "
                "the fused loss (linear_ce) cannot express: not supported")
    if getattr(hf.get_output_embeddings(), "bias", None) is not None:
        return (f"{family}: lm_head has a bias, which the fused loss (linear_ce) has no term for: not "
                "supported")
    return None


class HFGPT(GPT):
    """GPT (model.py) on a Hugging Face causal LM: trunk, unembed, step_nll, the generation cache, the FLOPs
    and the context length are the HF model's; the head and everything else are GPT's."""

    def __init__(self, hf, config):
        nn.Module.__init__(self)                   # not GPT.__init__: the HF model is the trunk
        self.config, self.hf = config, hf
        decoder = hf.get_decoder()
        name = next((n for n in FINAL_NORMS if isinstance(getattr(decoder, n, None), nn.Module)), None)
        if name is None:
            raise ValueError(f"{hf.config.model_type}: its decoder has no final norm named one of "
                             f"{', '.join(FINAL_NORMS)}: not supported")
        self.ln_f = getattr(decoder, name)                   # LN_f, now outside the decoder: h is pre-norm
        setattr(decoder, name, nn.Identity())
        # logits after lm_head, as the HF model scales them (multiplying or dividing by 1.0 changes no bit)
        self.logit_scale = float(getattr(hf.config, "logit_scale", None) or 1.0)          # Cohere: ·s
        self.logits_scaling = float(getattr(hf.config, "logits_scaling", None) or 1.0)    # Granite: /d
        self.latent_head = (LatentHead(config.n_embd, config.n_latent, config.bias, attn=config.head_attn,
                                       gelu=config.gelu) if config.n_steps > 0 else None)

    @property
    def lm_head(self):
        return self.hf.get_output_embeddings()

    def get_num_params(self, non_embedding=True):
        """Every parameter (tied ones once): rotary positions have no table to leave out."""
        return sum(p.numel() for p in self.parameters())

    def trunk(self, idx, cache=None):
        """idx (B, T) -> h (B, T, C), the decoder's last hidden state before LN_f. cache: generation's
        HFCache, whose HF cache this call extends; positions follow the cached tokens."""
        hf_cache = None if cache is None else cache.hf
        out = self.hf.get_decoder()(input_ids=idx, cache=hf_cache, use_cache=cache is not None)
        return out.last_hidden_state

    def unembed(self, o):
        """o_k (..., C) -> logits_k (..., V), as the HF model computes its logits from h."""
        return self.lm_head(self.ln_f(o)) * self.logit_scale / self.logits_scaling

    def step_nll(self, o, targets):
        """ℓ_k (B, T) of o_k (B, T, C): the scales folded into lm_head's input, a linear map's."""
        x = self.ln_f(o)
        scale = self.logit_scale / self.logits_scaling
        return token_nll(x if scale == 1 else x * scale, self.lm_head.weight, targets, keep_max=KEEP_LOGITS)

    def new_cache(self, head=None):
        return HFCache(self.hf.config, head)

    def crop_block_size(self, block_size):
        """The context length a run uses (at most the config's max_position_embeddings); nothing to cut."""
        if block_size > self.config.block_size:
            raise ValueError(f"block_size {block_size} is larger than the model's {self.config.block_size}")
        self.config.block_size = block_size

    def compile_parts(self):
        """GPT.compile_parts, the trunk on SDPA's causal path where that is exact (use_causal_sdpa)."""
        use_causal_sdpa(self.hf, self.config.block_size)
        return super().compile_parts()

    def trunk_flops(self, seq_len):
        """Training FLOPs per token of the decoder: 6 per weight of its layers' matrices (the embedding is a
        lookup), and the attention scores q·k and att·v over seq_len positions, 12 per head dimension per
        layer (the config's heads × head_dim; a sliding window is counted as the full T)."""
        c = self.hf.config
        layers = self.hf.get_decoder().layers
        matrices = sum(p.numel() for p in layers.parameters() if p.dim() >= 2)
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        return 6 * matrices + 12 * c.num_hidden_layers * c.num_attention_heads * head_dim * seq_len


CAUSAL_SDPA = "nanorlrp_causal_sdpa"


def causal_sdpa(module, query, key, value, attention_mask, **kwargs):
    """HF's SDPA attention without a mask: a sequence attends causally to itself (SDPA's is_causal), one new
    token to every cached one."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    return sdpa_attention_forward(module, query, key, value, None, **kwargs)


def use_causal_sdpa(hf, block_size):
    """Under torch.compile HF's SDPA gets a dense (B, 1, T, T) causal mask, and SDPA cannot take its causal
    fast path; without a mask (causal_sdpa) it does. Exact where rows are unpadded (always, here) and every
    layer attends causally over all T <= block_size positions: a sliding window shorter than block_size
    (Mistral, Gemma 2/3) or attention soft-capping keeps HF's own path. Returns whether the model switched."""
    from transformers import AttentionInterface, AttentionMaskInterface
    c = hf.config
    window, soft_cap = getattr(c, "sliding_window", None), getattr(c, "attn_logit_softcapping", None)
    windowed = any(t != "full_attention" for t in getattr(c, "layer_types", None) or ["sliding"])
    if c._attn_implementation != "sdpa" or soft_cap or (window and windowed and window < block_size):
        return False
    AttentionInterface.register(CAUSAL_SDPA, causal_sdpa)
    AttentionMaskInterface.register(CAUSAL_SDPA, lambda *args, **kwargs: None)    # no mask to build
    hf.set_attn_implementation(CAUSAL_SDPA)
    return True


class HFCache:
    """Generation's cache for an HF trunk: the HF model's own DynamicCache, and the head's (GPT.new_cache)."""

    def __init__(self, hf_config, head=None):
        from transformers import DynamicCache
        self.hf, self.head = DynamicCache(config=hf_config), head

    def __len__(self):
        return self.hf.get_seq_length()              # the tokens cached: the next one's position


# -----------------------------------------------------------------------------
# loading: a folder (checked against the HF model's own logits) or a checkpoint's HF config

def gpt_config(hf, n_steps, n_latent=0, head_attn="none", dropout=0.0, *, bias=False, gelu="exact"):
    """The GPTConfig of an HF trunk: its sizes, and the head's keys (this project's, not the HF config's)."""
    c = hf.config
    V = hf.get_output_embeddings().out_features
    return GPTConfig(block_size=c.max_position_embeddings, vocab_size=V,
                     n_layer=c.num_hidden_layers, n_head=c.num_attention_heads, n_embd=c.hidden_size,
                     dropout=dropout, bias=bias, n_steps=n_steps, n_latent=n_latent, head_attn=head_attn,
                     gelu=gelu)


def set_dropout(config, dropout):
    """Every dropout probability of an HF config (attention_dropout, resid_pdrop, ...) = this project's
    dropout key: the HF defaults (GPT-2's 0.1, ...) are not this run's."""
    for key, value in config.to_dict().items():
        if isinstance(value, float) and key.endswith(("dropout", "pdrop")):
            setattr(config, key, dropout)


def probe_ids(vocab_size, T=12):
    """A fixed short probe, (1, T) ids of the vocabulary."""
    return torch.randint(vocab_size, (1, T), generator=torch.Generator().manual_seed(0))


@torch.no_grad()
def check_identity(model, idx, hf_logits, what):
    """I2 at load: with W_out = 0 every step's logits are the HF model's own, (1, T, V); else a ValueError."""
    logits = model.eval()(idx)[0]                                          # (K1, 1, T, V)
    err = (logits - hf_logits).abs().max().item()
    if not err <= 1e-4 * max(1.0, hf_logits.abs().max().item()):
        raise ValueError(f"{what} ({model.hf.config.model_type}): the trunk's logits differ from the HF "
                         f"model's own by {err:.3g} on a probe (I2 fails): not supported")


def from_folder(folder, n_steps=4, n_latent=0, head_attn="none", dropout=0.0, bias=False, gelu="exact"):
    """A local HF causal-LM folder (config.json, weights) as the trunk of an HFGPT in fp32, with a fresh head
    (W_out = 0); refused with one line (ValueError) where the family or the I2 probe says no."""
    transformers = need("transformers", f"init_from={folder}")
    transformers.utils.logging.disable_progress_bar()     # its bar of loaded tensors: a run's output is ours
    config = transformers.AutoConfig.from_pretrained(folder, local_files_only=True)
    set_dropout(config, dropout)
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, config=config, dtype=torch.float32,
                                                           local_files_only=True).eval()
    why = refusal(hf)
    if why:
        raise ValueError(why)
    idx = probe_ids(config.vocab_size)
    with torch.no_grad():
        hf_logits = hf(idx).logits.float()                                 # before the decoder is cut
    model = HFGPT(hf, gpt_config(hf, n_steps, n_latent, head_attn, dropout, bias=bias, gelu=gelu))
    check_identity(model, idx, hf_logits, folder)
    return model.train()


def saved_model(ckpt, dropout=None):
    """The HFGPT a checkpoint holds: its HF config (hf_config) and state, with this run's dropout."""
    transformers = need("transformers", "this checkpoint (a Hugging Face trunk)")
    saved = dict(ckpt["hf_config"])
    config = transformers.AutoConfig.for_model(saved.pop("model_type"), **saved)
    if dropout is not None:
        set_dropout(config, dropout)
    hf = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    args = {**ckpt["model_args"], **({} if dropout is None else {"dropout": dropout})}
    model = HFGPT(hf, GPTConfig(**args))
    model.load_state_dict(ckpt["model"])
    return model


# -----------------------------------------------------------------------------
# the folder's tokenizer: tokenizer.json through the tokenizers library

ANCHOR = "\n"   # what an answer is encoded after, to tokenize it as a continuation (encode_answer)


class HFTokenizer:
    """
    A tokenizer.json behind data.Tokenizer's interface. eot_token is its end-of-sequence token, which ends
    every document and answer. bos: the ids tokenizer(text) puts before a text (Llama 3's, Gemma's BOS; []
    where it adds none, as Qwen's and SmolLM2's): documents and prompts start with them. The rule follows the
    tokenizer's behaviour, never the family's name. encode never adds them, and the text of a special token
    is ordinary text, as in data.Tokenizer.
    """
    name = "hf"

    def __init__(self, json_text, eos):
        tokenizers = need("tokenizers", "tokenizer='hf'")
        self.tok = tokenizers.Tokenizer.from_str(json_text)
        self.tok.encode_special_tokens = True
        self.saved = dict(json_text=json_text, eos=eos)           # what a checkpoint keeps of it
        self.sha256 = hashlib.sha256(json_text.encode()).hexdigest()
        self.vocab_size = self.tok.get_vocab_size(with_added_tokens=True)
        self.eot_token = eos if isinstance(eos, int) else self.tok.token_to_id(eos)
        if self.eot_token is None:
            raise ValueError(f"tokenizer='hf': its end-of-sequence token {eos!r} is not in tokenizer.json")
        plain, full = self.encode("a"), self.tok.encode("a").ids
        self.bos = next((full[:i] for i in range(len(full)) if full[i:i + len(plain)] == plain), [])
        # a tokenizer that starts every text with a prefix space (SentencePiece's ▁) would put one before an
        # answer too, where the text it continues has none
        self.prefix_space = self.encode(ANCHOR + "a")[len(self.encode(ANCHOR)):] != plain

    def encode(self, text):
        return self.tok.encode(text, add_special_tokens=False).ids

    def encode_answer(self, text):
        """text that continues earlier text (an answer after its prompt): no BOS, and no prefix space; so a
        prompt's and its answer's ids are the whole text's where their boundary is a token boundary."""
        if not self.prefix_space:
            return self.encode(text)
        anchor, ids = self.encode(ANCHOR), self.encode(ANCHOR + text)
        return ids[len(anchor):]

    def encode_array(self, text):
        return np.array(self.encode(text), token_dtype(self.vocab_size))

    def decode(self, ids):
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=False)


def folder_eos(folder):
    """The folder's end-of-sequence token: tokenizer_config.json's eos_token (text), else config.json's or
    generation_config.json's eos_token_id (the first where it lists several)."""
    for name, key in (("tokenizer_config.json", "eos_token"), ("config.json", "eos_token_id"),
                      ("generation_config.json", "eos_token_id")):
        eos = folder_json(folder, name).get(key)
        eos = eos.get("content") if isinstance(eos, dict) else eos[0] if isinstance(eos, list) else eos
        if eos is not None:
            return eos
    raise ValueError(f"tokenizer='hf': {folder} names no end-of-sequence token (tokenizer_config.json's "
                     "eos_token or config.json's eos_token_id)")


def folder_tokenizer(folder):
    """The HFTokenizer of a local Hugging Face folder (its tokenizer.json)."""
    path = os.path.join(folder, "tokenizer.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"tokenizer='hf' reads {path}, which does not exist: a Hugging Face folder "
                                "with its tokenizer.json (set tokenizer_file=DIR to another folder)")
    with open(path, encoding="utf-8") as f:
        return HFTokenizer(f.read(), folder_eos(folder))
