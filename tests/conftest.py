"""Shared test set-up: the repository root on sys.path, and GPT-2's tokenizer file provisioned
offline-friendly."""

import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # `import data`, `import model` also under plain `pytest`


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
