"""One command-line convention for every entry point (configurator.py): --help lists every key with its
default and its meaning from the DEFAULTS comments, a bare boolean flag is a one-line error naming the form to
write, and a key that is gone (RENAMED) one saying what to set instead."""

import importlib
import os
import subprocess
import sys

import pytest

import configurator

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, OMP_NUM_THREADS="1")
# per script: keys and words of their comments in DEFAULTS (train.py's: two comment lines, joined)
KNOWN = {
    "train.py": [("routing", "'step': each optimizer step is all fluency or all reasoning (routing (ii)); "
                             "'mixed': every micro-batch holds a ρ share"),
                 ("gelu", "'exact' (nanoGPT's, faster) | 'tanh' (GPT-2's); init_from=gpt2 or a HF dir: "
                          "GPT-2's tanh")],
    "sample.py": [("temperature", "0 = greedy")],
    "bench/bench.py": [("vocab", "byte (256) | gpt2 (50257)"),
                       ("gelu", "exact (nanoGPT's, train.py's default)")],
    "experiments/ablation.py": [("quick", "1 seed, a quarter of the steps")],
}


def run(*args):
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, encoding="utf-8",
                          env=dict(ENV, PYTHONIOENCODING="utf-8"), timeout=120)


def key_lines(out):
    """{key: its line} for every '  --key=default  meaning' line of a help text."""
    lines = [line for line in out.splitlines() if line.startswith("  --")]
    return {line[4:].split("=", 1)[0]: line for line in lines}


@pytest.mark.slow
@pytest.mark.parametrize("script", ["train.py", "sample.py", "bench/bench.py", "experiments/ablation.py"])
def test_help_lists_every_key_with_its_default_and_meaning(script):
    r = run(script, "--help")
    assert r.returncode == 0 and r.stderr == "", r.stderr[-2000:]
    module = importlib.import_module(os.path.basename(script)[:-3])
    doc_first_line = module.__doc__.strip().splitlines()[0]
    assert r.stdout.startswith(doc_first_line)     # the usage header: the docstring's first paragraph
    assert f"usage: python {script} " in r.stdout
    lines = key_lines(r.stdout)
    assert list(lines) == list(module.DEFAULTS)                     # every key once, in the DEFAULTS order
    for key, value in module.DEFAULTS.items():
        shown = [repr(value)] + ([value] if isinstance(value, str) else [])
        assert any(lines[key].startswith(f"  --{key}={s}") for s in shown), lines[key]
    for key, meaning in KNOWN[script]:
        assert meaning in lines[key], lines[key]


@pytest.mark.slow
def test_short_help_wins_over_other_arguments():
    r = run("sample.py", "--no_such_key=1", "-h")
    assert r.returncode == 0 and "--exit_threshold=None" in r.stdout and r.stderr == ""


def test_help_text_pairs_keys_with_their_comments(tmp_path):
    script = tmp_path / "tool.py"
    script.write_text('''"""
A tool that does one thing.
Second line of the first paragraph.

    python tool.py --a=2

More prose that is not the usage.
"""
DEFAULTS = dict(
    # section one
    a=1,            # the a
                    # continued on a second line
    b="x y",
    c=None, d=0.5,  # d only
    # section two
    e=[1, 2],       # a list
)
''')
    text = configurator.help_text({"a": 1, "b": "x y", "c": None, "d": 0.5, "e": [1, 2]}, str(script))
    lines = text.splitlines()
    assert lines[:4] == ["A tool that does one thing.", "Second line of the first paragraph.", "",
                         "    python tool.py --a=2"]
    assert "More prose" not in text and "usage: python tool.py [PRESET.py ...] [--key=value ...]" in text
    keys = key_lines(text)
    assert keys["a"].split() == ["--a=1", "the", "a", "continued", "on", "a", "second", "line"]
    assert keys["b"].strip() == "--b='x y'" and keys["c"].strip() == "--c=None"
    assert keys["d"].split() == ["--d=0.5", "d", "only"]
    at = lines.index
    assert at("section one") < at(keys["a"]) < at("section two") < at(keys["e"])


def test_help_without_a_readable_source_still_lists_the_defaults(tmp_path):
    text = configurator.help_text({"a": 1, "out": "o"}, str(tmp_path / "missing.py"))
    assert key_lines(text) == {"a": "  --a=1", "out": "  --out=o"}


@pytest.mark.parametrize("argv", [["--help"], ["-h"], ["--bad=1", "--help"]])
def test_configure_prints_help_and_exits_0(argv, capsys):
    defaults = dict(alpha=3)   # a key the source does not describe: printed with its default alone
    with pytest.raises(SystemExit) as e:
        configurator.configure(defaults, argv, doc=os.path.join(ROOT, "bench", "bench.py"))
    assert e.value.code == 0 and "  --alpha=3" in capsys.readouterr().out


def test_bare_boolean_flag_names_the_form_to_write():
    with pytest.raises(configurator.ConfigError, match=r"argument '--sweep' must look like --key=value: "
                                                       r"write --sweep=True"):
        configurator.configure(dict(sweep=False), ["--sweep"])
    with pytest.raises(configurator.ConfigError, match=r"argument '--n' must look like --key=value$"):
        configurator.configure(dict(n=1), ["--n"])


def test_a_key_that_is_gone_stops_with_its_own_line(tmp_path):
    renamed = {"size": "size was renamed: use width"}
    preset = tmp_path / "preset.py"
    preset.write_text("size = 2\n")
    for argv in (["--size=2"], [str(preset)]):      # on the command line and in a preset
        with pytest.raises(configurator.ConfigError) as e:
            configurator.configure(dict(width=1), argv, renamed=renamed)
        assert str(e.value) == "size was renamed: use width"
    with pytest.raises(configurator.ConfigError, match=r"unknown config key 'height' \(from the command"):
        configurator.configure(dict(width=1), ["--height=2"], renamed=renamed)
    with pytest.raises(configurator.ConfigError, match="unknown config key 'size'"):     # not renamed there
        configurator.configure(dict(width=1), ["--size=2"])


@pytest.mark.slow
@pytest.mark.parametrize("script, flag", [("bench/bench.py", "--sweep"), ("train.py", "--eval_only")])
def test_bare_boolean_flag_is_a_one_line_error_on_every_entry_point(script, flag):
    r = run(script, flag)
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr.strip().count("\n") == 0 and f"write {flag}=True" in r.stderr


def test_default_device_is_cuda_then_mps_then_cpu(monkeypatch):
    import torch
    for cuda, mps, want in [(True, True, "cuda"), (False, True, "mps"), (False, False, "cpu")]:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
        monkeypatch.setattr(torch.backends.mps, "is_available", lambda: mps)
        assert configurator.default_device() == want
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)
    assert [configurator.default_dtype(d) for d in ("cpu", "mps", "cuda", "cuda:1")] == \
        ["float32", "float32", "float16", "float16"]
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    assert configurator.default_dtype("cuda:0") == "bfloat16"
