"""Training data that needs no download: a character corpus or a synthetic signal.

The built-in corpus is a fixed list of standard-library sources, read from this
Python installation, sorted and concatenated, so it is the same on every run.
"""

from __future__ import annotations

import math
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import torch

from lstmserve.export.config import ExportConfig, ExportError

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
    """A multivariate signal, float32 [time, width]; val is the tail."""

    train: torch.Tensor
    val: torch.Tensor
    source: str


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
    """The synthetic forecasting signal, split into train and validation."""
    series = make_signal(config.width, FEATURE_SERIES_LENGTH, config.seed)
    val_len = max(int(len(series) * VAL_FRACTION), config.seq_len + 1)
    if len(series) - val_len < config.seq_len + 1:
        raise ExportError(f"--seq-len {config.seq_len} is too long for the synthetic signal")
    return FeatureData(series[:-val_len], series[-val_len:], f"synthetic-sinusoids-{config.width}")


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
