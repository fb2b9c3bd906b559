"""Training data: a character corpus, a signal or table of rows in time order, or labelled sequences.

Nothing is downloaded. The built-in corpus is a fixed list of standard-library sources,
read from this Python installation, sorted and concatenated, so it is the same on every
run; the built-in signal is synthetic; the built-in labelled sequences are scikit-learn's
bundled 8x8 digits, fed row by row. The user's files come in through `table.read_table`.
"""

from __future__ import annotations

import math
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from lstmserve.export.config import ExportConfig, ExportError
from lstmserve.export.table import read_table

#: Standard-library modules whose source makes up the built-in corpus (about 1 MB).
STDLIB_SOURCES: tuple[str, ...] = (
    "abc.py", "argparse.py", "ast.py", "bisect.py", "calendar.py", "collections/__init__.py",
    "contextlib.py", "copy.py", "csv.py", "dataclasses.py", "datetime.py", "difflib.py",
    "enum.py", "fnmatch.py", "fractions.py", "functools.py", "getopt.py", "gettext.py",
    "glob.py", "heapq.py", "inspect.py", "json/decoder.py", "json/encoder.py", "keyword.py",
    "locale.py", "logging/__init__.py", "numbers.py", "operator.py", "optparse.py",
    "pathlib.py", "pprint.py", "queue.py", "random.py", "re/_parser.py", "sched.py",
    "shlex.py", "shutil.py", "statistics.py", "string.py", "textwrap.py", "threading.py",
    "tokenize.py", "traceback.py", "typing.py", "uuid.py", "weakref.py", "zipfile.py",
)

VAL_FRACTION = 0.1
FEATURE_SERIES_LENGTH = 40_000
FEATURE_NOISE = 0.1


@dataclass(frozen=True)
class TokenData:
    """A character corpus encoded as ids.

    Args:
        vocabulary: id -> character, sorted.
        train, val: int64 id sequences (val is the tail of the text).
        source: where the text came from (for the report).
    """

    vocabulary: tuple[str, ...]
    train: torch.Tensor
    val: torch.Tensor
    source: str


@dataclass(frozen=True)
class FeatureData:
    """A multivariate signal, float32 [time, columns]; val is the tail.

    Args:
        train, val: the rows, every column the model reads or forecasts.
        source: where the rows came from (for the report).
        inputs: indices of the columns fed to the model (empty: all).
        targets: indices of the columns forecast one step ahead (empty: the inputs).
        input_columns, output_columns: their names (empty for the synthetic signal).
        normalization: per-column input_mean, input_std, output_mean, output_std from the
            training rows (empty: none, the synthetic signal is already standardised).
    """

    train: torch.Tensor
    val: torch.Tensor
    source: str
    inputs: tuple[int, ...] = ()
    targets: tuple[int, ...] = ()
    input_columns: tuple[str, ...] = ()
    output_columns: tuple[str, ...] = ()
    normalization: dict[str, list[float]] = field(default_factory=dict)

    @property
    def width(self) -> int:
        """Columns fed to the model."""
        return len(self.inputs) if self.inputs else int(self.train.shape[1])

    @property
    def output_width(self) -> int:
        """Columns forecast."""
        return len(self.targets) if self.targets else self.width

    def select(self, batch: Batch) -> Batch:
        """A batch of windows over every column, cut down to the input and target columns."""
        inputs = batch.inputs[..., list(self.inputs)] if self.inputs else batch.inputs
        targets = batch.targets[..., list(self.targets or self.inputs)] if (self.targets or self.inputs) else batch.targets
        return Batch(inputs, targets)


@dataclass(frozen=True)
class SequenceData:
    """Labelled sequences for a classifier, padded to the longest.

    Args:
        train_x, val_x: float32 [sequences, longest, width], zero after each sequence's end.
        train_len, val_len: int64 [sequences], each sequence's length.
        train_y, val_y: int64 [sequences], class indices.
        classes: class names, in output order.
        input_columns: the feature columns' names.
        normalization: per-column input_mean and input_std from the training rows.
        source: where the sequences came from.
    """

    train_x: torch.Tensor
    train_len: torch.Tensor
    train_y: torch.Tensor
    val_x: torch.Tensor
    val_len: torch.Tensor
    val_y: torch.Tensor
    classes: tuple[str, ...]
    input_columns: tuple[str, ...]
    normalization: dict[str, list[float]]
    source: str

    @property
    def width(self) -> int:
        """Features per row."""
        return int(self.train_x.shape[2])


@dataclass(frozen=True)
class Batch:
    """Batch-major inputs and their next-step targets."""

    inputs: torch.Tensor
    targets: torch.Tensor


def stdlib_corpus() -> str:
    """The built-in corpus: the sources in STDLIB_SOURCES that exist here, concatenated."""
    root = Path(sysconfig.get_paths()["stdlib"])
    texts = []
    for name in sorted(STDLIB_SOURCES):
        path = root / name
        if path.is_file():
            texts.append(path.read_text(encoding="utf-8"))
    if not texts:
        raise ExportError(f"no standard-library sources found under {str(root)!r}; pass --corpus FILE")
    return "\n".join(texts)


def read_corpus(path: Path) -> str:
    """Reads a UTF-8 corpus file; raises ExportError if missing, unreadable or empty."""
    if not path.is_file():
        raise ExportError(f"--corpus {str(path)!r} does not exist or is not a file")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ExportError(f"--corpus {str(path)!r} is not readable UTF-8 text: {exc}") from exc
    if not text:
        raise ExportError(f"--corpus {str(path)!r} is empty")
    return text


def load_tokens(config: ExportConfig) -> TokenData:
    """Builds the character vocabulary and the train/validation split."""
    if config.corpus is None:
        text, source = stdlib_corpus(), "python-stdlib"
    else:
        text, source = read_corpus(config.corpus), str(config.corpus)
    vocabulary = tuple(sorted(set(text)))
    index = {ch: i for i, ch in enumerate(vocabulary)}
    ids = torch.tensor([index[ch] for ch in text], dtype=torch.int64)
    val_len = max(int(len(ids) * VAL_FRACTION), config.seq_len + 1)
    if len(ids) - val_len < config.seq_len + 1:
        raise ExportError(
            f"--corpus {source!r} has {len(ids)} characters, too few for --seq-len {config.seq_len} "
            f"(need at least {2 * (config.seq_len + 1)})"
        )
    return TokenData(vocabulary, ids[:-val_len], ids[-val_len:], source)


def make_signal(width: int, length: int, seed: int) -> torch.Tensor:
    """Noisy sinusoids, float32 [length, width]: each channel mixes three shared waves."""
    gen = torch.Generator().manual_seed(seed)
    t = torch.arange(length, dtype=torch.float64)
    periods = 8.0 + 56.0 * torch.rand(3, generator=gen, dtype=torch.float64)
    phases = 2 * math.pi * torch.rand(3, generator=gen, dtype=torch.float64)
    waves = torch.sin(2 * math.pi * t[:, None] / periods[None, :] + phases[None, :])  # [length, 3]
    mixing = torch.randn(3, width, generator=gen, dtype=torch.float64) / math.sqrt(3)
    shift = 2 * math.pi * torch.rand(width, generator=gen, dtype=torch.float64)
    own = torch.sin(2 * math.pi * t[:, None] / (16.0 + 4.0 * torch.arange(width)) + shift)
    noise = FEATURE_NOISE * torch.randn(length, width, generator=gen, dtype=torch.float64)
    return (waves @ mixing + 0.5 * own + noise).to(torch.float32)


def load_features(config: ExportConfig) -> FeatureData:
    """The rows to forecast, split into train and validation: the user's --data, else the synthetic signal."""
    if config.data is not None:
        return _table_features(config, config.data)
    series = make_signal(config.width, FEATURE_SERIES_LENGTH, config.seed)
    val_len = max(int(len(series) * VAL_FRACTION), config.seq_len + 1)
    if len(series) - val_len < config.seq_len + 1:
        raise ExportError(f"--seq-len {config.seq_len} is too long for the synthetic signal")
    return FeatureData(series[:-val_len], series[-val_len:], f"synthetic-sinusoids-{config.width}")


def _table_features(config: ExportConfig, path: Path) -> FeatureData:
    """--data FILE: the selected columns (and targets) as one series; val is the last --val-fraction of it."""
    inputs = list(config.columns) if config.columns is not None else None
    targets = list(config.targets) if config.targets is not None else None
    wanted = None if inputs is None else list(dict.fromkeys(inputs + (targets or [])))
    table = read_table(path, wanted)
    names = list(table.names)
    if targets is not None and inputs is None:
        missing = [t for t in targets if t not in names]
        if missing:
            raise ExportError(f"--targets: {str(path)!r} has no column {missing[0]!r} (columns: {', '.join(names)})")
    in_names = inputs if inputs is not None else names
    out_names = targets if targets is not None else in_names
    _check_width(config, len(in_names))
    rows = len(table.values)
    val_len = max(int(rows * config.val_fraction), config.seq_len + 1)
    if rows - val_len < config.seq_len + 1:
        raise ExportError(
            f"--data {str(path)!r} has {rows} rows, too few for --seq-len {config.seq_len} with "
            f"--val-fraction {config.val_fraction} (need at least {2 * (config.seq_len + 1)})"
        )
    series = torch.from_numpy(table.values.astype(np.float32))
    train = series[:-val_len]
    in_index = tuple(names.index(n) for n in in_names)
    out_index = tuple(names.index(n) for n in out_names)
    normalization = {
        "input_mean": _mean(train[:, list(in_index)]),
        "input_std": _std(train[:, list(in_index)]),
        "output_mean": _mean(train[:, list(out_index)]),
        "output_std": _std(train[:, list(out_index)]),
    }
    return FeatureData(train, series[-val_len:], str(path), in_index, out_index, tuple(in_names),
                       tuple(out_names), normalization)


def _check_width(config: ExportConfig, width: int) -> None:
    if config.input_size is not None and config.input_size != width:
        raise ExportError(f"--input-size {config.input_size} does not match the {width} feature columns of --data")


def _mean(values: torch.Tensor) -> list[float]:
    return [float(x) for x in values.double().mean(dim=0)]


def _std(values: torch.Tensor) -> list[float]:
    """Per-column standard deviation; 1 for a constant column (so it passes through unscaled)."""
    std = values.double().std(dim=0, unbiased=False)
    return [float(x) if x > 1e-12 else 1.0 for x in std]


def load_sequences(config: ExportConfig) -> SequenceData:
    """Labelled sequences: the user's --data CSV, else scikit-learn's 8x8 digits (8 rows of 8 pixels each)."""
    if config.data is not None:
        sequences, labels, columns, source = _csv_sequences(config, config.data)
    else:
        sequences, labels, columns, source = _digits()
    _check_width(config, len(columns))
    classes = _classes(config, labels)
    index = {name: i for i, name in enumerate(classes)}
    y = torch.tensor([index[label] for label in labels], dtype=torch.int64)
    order = torch.randperm(len(sequences), generator=torch.Generator().manual_seed(config.seed))
    val_count = max(1, int(round(len(sequences) * config.val_fraction)))
    if len(sequences) - val_count < 2:
        raise ExportError(f"{source}: {len(sequences)} sequences are too few to hold out {val_count} for validation")
    val_ids, train_ids = order[:val_count].tolist(), order[val_count:].tolist()
    lengths = {len(s) for s in sequences}
    if config.bidirectional and len(lengths) > 1:
        raise ExportError(f"{source}: a bidirectional classifier needs sequences of one length, got lengths {sorted(lengths)[:5]}")
    train_rows = torch.cat([sequences[i] for i in train_ids])
    normalization = {"input_mean": _mean(train_rows), "input_std": _std(train_rows)}
    train_x, train_len = _pad([sequences[i] for i in train_ids])
    val_x, val_len = _pad([sequences[i] for i in val_ids])
    return SequenceData(train_x, train_len, y[train_ids], val_x, val_len, y[val_ids], classes, columns,
                        normalization, source)


def _pad(sequences: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    lengths = torch.tensor([len(s) for s in sequences], dtype=torch.int64)
    return torch.nn.utils.rnn.pad_sequence(sequences, batch_first=True), lengths


def _digits() -> tuple[list[torch.Tensor], list[str], tuple[str, ...], str]:
    """scikit-learn's bundled 8x8 digits (1797 images, shipped inside scikit-learn): each image is a
    sequence of its 8 pixel rows."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:
        raise ExportError(
            "the built-in digits come with scikit-learn: pip install 'lstmserve[export]' (or scikit-learn), "
            "or pass --data FILE"
        ) from exc
    digits = load_digits()
    images = torch.from_numpy(digits.images.astype(np.float32))  # [1797, 8, 8]
    labels = [str(int(t)) for t in digits.target]
    return list(images), labels, tuple(f"pixel{i}" for i in range(8)), "scikit-learn digits (8x8, row by row)"


def _csv_sequences(config: ExportConfig, path: Path) -> tuple[list[torch.Tensor], list[str], tuple[str, ...], str]:
    """A long-format CSV: one row per time step, the sequence id and label columns, and feature columns.
    A sequence's rows are consecutive, in time order, and share one label."""
    text = (config.sequence_column, config.label_column)
    if config.columns is not None:
        clash = [c for c in config.columns if c in text]
        if clash:
            raise ExportError(f"--columns: {clash[0]!r} is the sequence or label column, not a feature")
    table = read_table(path, config.columns, text_columns=text)
    ids, labels = table.text[config.sequence_column], table.text[config.label_column]
    sequences: list[torch.Tensor] = []
    sequence_labels: list[str] = []
    starts = [0] + [i for i in range(1, len(ids)) if ids[i] != ids[i - 1]]
    seen: set[str] = set()
    for number, start in enumerate(starts):
        end = starts[number + 1] if number + 1 < len(starts) else len(ids)
        sequence_id = ids[start]
        if sequence_id in seen:
            raise ExportError(
                f"--data {str(path)!r}: the rows of sequence {sequence_id!r} are not consecutive "
                f"(it starts again on line {start + 2})"
            )
        seen.add(sequence_id)
        label = labels[start]
        for line in range(start, end):
            if labels[line] != label:
                raise ExportError(
                    f"--data {str(path)!r}: sequence {sequence_id!r} has label {label!r} and {labels[line]!r} "
                    f"(line {line + 2}); a sequence has one label"
                )
        sequences.append(torch.from_numpy(table.values[start:end].astype(np.float32)))
        sequence_labels.append(label)
    return sequences, sequence_labels, table.names, str(path)


def _classes(config: ExportConfig, labels: list[str]) -> tuple[str, ...]:
    """The classes in output order: --classes, else the sorted labels (numerically when all are numbers)."""
    if config.classes is not None:
        allowed = set(config.classes)
        for number, label in enumerate(labels):
            if label not in allowed:
                raise ExportError(
                    f"label {label!r} of sequence {number + 1} is not one of the --classes {', '.join(config.classes)}"
                )
        return tuple(config.classes)
    found = set(labels)
    if len(found) < 2:
        raise ExportError(f"a classifier needs at least two classes, the data has {sorted(found)}")
    try:
        return tuple(sorted(found, key=float))
    except ValueError:
        return tuple(sorted(found))


def sample_batch(series: torch.Tensor, batch_size: int, seq_len: int, gen: torch.Generator) -> Batch:
    """Random windows of seq_len + 1 steps: inputs are the first seq_len, targets the next."""
    starts = torch.randint(0, len(series) - seq_len, (batch_size,), generator=gen)
    return _windows(series, starts, seq_len)


def fixed_batches(series: torch.Tensor, count: int, batch_size: int, seq_len: int) -> list[Batch]:
    """Evenly spaced windows covering the series, for repeatable evaluation."""
    total = count * batch_size
    starts = torch.linspace(0, len(series) - seq_len - 1, total).long()
    return [_windows(series, starts[i * batch_size:(i + 1) * batch_size], seq_len) for i in range(count)]


def _windows(series: torch.Tensor, starts: torch.Tensor, seq_len: int) -> Batch:
    offsets = torch.arange(seq_len + 1)
    windows = series[starts[:, None] + offsets[None, :]]
    return Batch(windows[:, :-1].contiguous(), windows[:, 1:].contiguous())
