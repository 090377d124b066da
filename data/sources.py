"""
Where data/prepare.py's documents come from: text files, datasets folders, the Hugging Face hub. A source cuts
its documents, from unit `start` on, into tasks of about task_chars characters: tasks(start, task_chars)
yields (payload, units, documents), and read(payload), in a worker, gives the task's units
[(text, ends_document)]. A unit is a piece of a text file or a dataset row, so a rerun can skip the units it
already has. The `datasets` package (an optional extra) is imported only for Hugging Face and
parquet/arrow/JSONL input.
"""

import glob
import hashlib
import os


def _import_datasets():
    try:
        import datasets
    except ImportError:
        raise ModuleNotFoundError("Hugging Face and parquet/arrow/JSONL input needs the optional `datasets` "
                                  "package: pip install datasets") from None
    return datasets


def _load_hub_dataset(name, config, **kwargs):
    """datasets.load_dataset(name, config) from the hub or a local copy of its repository; offline, an error
    that says what to do instead."""
    try:
        return _import_datasets().load_dataset(name, config or None, **kwargs)
    except ConnectionError as e:
        raise ConnectionError(f"{e}; without internet, copy the repository (`hf download --repo-type dataset "
                              f"{name} --local-dir DIR`) and pass --hf_dataset=DIR") from None


def _text_pieces(path, chunk_chars=1 << 20):
    """Yield a text file in pieces, each cut just before a newline that precedes a non-space character:
    GPT-2's pre-tokenizer splits the same way there at a string's end and inside it, so the tokens equal
    the whole file's."""
    buf = ""
    # errors="replace": a stray bad byte should not stop a long prepare
    with open(path, encoding="utf-8", errors="replace") as f:
        while chunk := f.read(chunk_chars):
            buf += chunk
            cut = buf.rfind("\n", 0, len(buf) - 1)
            while cut > 0 and buf[cut + 1].isspace():
                cut = buf.rfind("\n", 0, cut)
            if cut > 0:
                yield buf[:cut]
                buf = buf[cut:]
    if buf:
        yield buf


class TextFiles:
    """Each file is one document, read in pieces by the main process: a task carries its text."""

    def __init__(self, files, name):
        self.files, self.name, self.documents = files, name, len(files)
        stats = [(f, os.path.getsize(f), os.path.getmtime(f)) for f in files]
        self.fingerprint = hashlib.sha256(repr(stats).encode()).hexdigest()  # changes when the files do

    def _units(self, start):
        i = 0
        for path in self.files:
            pieces = _text_pieces(path)
            piece = next(pieces, "")  # an empty file is an empty document: just its eot
            for following in pieces:
                if i >= start:
                    yield piece, False
                piece, i = following, i + 1
            if i >= start:
                yield piece, True
            i += 1

    def tasks(self, start, task_chars):
        task, chars = [], 0
        for text, ends_document in self._units(start):
            task.append((text, ends_document))
            chars += len(text)
            if chars >= task_chars:
                yield task, len(task), sum(end for _, end in task)
                task, chars = [], 0
        if task:
            yield task, len(task), sum(end for _, end in task)

    @staticmethod
    def read(task):
        return task


class DatasetRows:
    """Each row of a datasets.Dataset is one document, its text_field. A task is a range of rows that the
    worker reads itself; the main process reads only the rows' lengths (arrow offsets), so reading scales with
    the workers instead of capping them."""

    def __init__(self, ds, text_field, name):
        if text_field not in ds.column_names:
            raise ValueError(f"--text_field={text_field!r} is not a column of {name}: "
                             f"it has {ds.column_names}")
        if getattr(ds.features[text_field], "dtype", None) not in ("string", "large_string"):
            raise ValueError(f"--text_field={text_field!r} of {name} holds {ds.features[text_field]}, "
                             "not text")
        self.ds, self.field, self.name = ds.select_columns([text_field]), text_field, name
        self.documents, self.fingerprint = len(ds), ds._fingerprint  # datasets' own: changes with the data

    def tasks(self, start, task_chars, block_rows=1 << 16):
        import pyarrow.compute as pc  # datasets' dependency
        arrow, n = self.ds.with_format("arrow"), len(self.ds)
        first, chars = start, 0  # the task being cut: its first row, its UTF-8 bytes so far
        for lo in range(start, n, block_rows):
            lengths = pc.binary_length(arrow[lo:lo + block_rows][self.field]).fill_null(0)
            for row, length in enumerate(lengths.to_numpy().tolist(), lo):
                chars += length
                if chars >= task_chars:
                    yield (first, row + 1), row + 1 - first, row + 1 - first
                    first, chars = row + 1, 0
        if first < n:
            yield (first, n), n - first, n - first

    def read(self, rows):
        first, stop = rows
        return [(text or "", True) for text in self.ds[first:stop][self.field]]  # null: an empty document


DATA_FILE_BUILDERS = {".parquet": "parquet", ".arrow": "arrow", ".jsonl": "json", ".json": "json"}


def _input_files(input):
    if os.path.isfile(input):
        return [input]
    pattern = os.path.join(input, "**", "*") if os.path.isdir(input) else input  # glob skips hidden files
    files = sorted(f for f in glob.glob(pattern, recursive=True) if os.path.isfile(f))
    if not files:
        raise FileNotFoundError(f"--input={input!r}: no such file, no files in that folder, or no glob match")
    return files


def _pick_split(ds, split, name):
    if hasattr(ds, "keys"):  # a DatasetDict
        if split not in ds:
            raise ValueError(f"{name} has no split {split!r}: it has {list(ds)}; set --split")
        ds = ds[split]
    return ds


def _is_saved_dataset(path):
    """A folder that datasets' save_to_disk wrote (a Dataset or a DatasetDict)."""
    return os.path.isdir(path) and any(os.path.isfile(os.path.join(path, f))
                                       for f in ("state.json", "dataset_dict.json"))


def open_source(input="", hf_dataset="", hf_config="", split="train", text_field="text", num_proc=1):
    """The documents of --input (text files, parquet/arrow/JSONL files, a save_to_disk folder) or of
    --hf_dataset (a hub name, or a local copy of a hub repository)."""
    if bool(input) == bool(hf_dataset):
        raise ValueError("give exactly one of --input=FILE|DIR|GLOB and --hf_dataset=NAME")
    if _is_saved_dataset(hf_dataset):  # load_dataset cannot read one: load_from_disk can, --input's way
        raise ValueError(f"--hf_dataset={hf_dataset} is a datasets save_to_disk folder: pass it as "
                         f"--input={hf_dataset}")
    if hf_dataset:
        name = f"{hf_dataset}" + (f" ({hf_config})" if hf_config else "") + f" [{split}]"
        ds = _load_hub_dataset(hf_dataset, hf_config, split=split,
                               num_proc=num_proc if num_proc > 1 else None)
        return DatasetRows(ds, text_field, name)
    if _is_saved_dataset(input):
        ds = _pick_split(_import_datasets().load_from_disk(input), split, input)
        return DatasetRows(ds, text_field, input)
    files = _input_files(input)
    builders = {DATA_FILE_BUILDERS.get(os.path.splitext(f)[1]) for f in files}
    if builders == {None}:
        return TextFiles(files, input)
    if len(builders) > 1:
        raise ValueError(f"--input={input!r} mixes file kinds ({sorted(map(str, builders))}): give one kind "
                         "(text, or parquet, arrow, JSONL); a copy of a hub repository is --hf_dataset=DIR")
    ds = _import_datasets().load_dataset(builders.pop(), data_files=files, split="train")
    return DatasetRows(ds, text_field, input)
