"""What a training run prints: a progress bar and short lines for a person at a terminal, one
JSON object per line for log collectors (pods, pipes, `lmforge run --log-format json`).

Library chatter is kept out of both: transformers' dict-per-log-step printing, its download and
weight-loading bars, and deprecation warnings (LMFORGE_VERBOSE=1 brings them back).
"""

from __future__ import annotations

import json
import logging
import os
import sys
import warnings
from typing import Any, TextIO

from lmforge.api.kinds import Progress

LOG_FORMAT_ENV = "LMFORGE_LOG_FORMAT"  # auto (default) | human | json
VERBOSE_ENV = "LMFORGE_VERBOSE"
LOG_FORMATS = ("auto", "human", "json")


def log_format(stream: TextIO | None = None) -> str:
    """human or json: as asked in LMFORGE_LOG_FORMAT, else human on a terminal outside a pod."""
    asked = os.environ.get(LOG_FORMAT_ENV, "auto")
    if asked in ("human", "json"):
        return asked
    stream = stream or sys.stderr
    in_pod = "KUBERNETES_SERVICE_HOST" in os.environ
    return "human" if stream.isatty() and not in_pod else "json"


class JsonFormatter(logging.Formatter):
    """One JSON object per line: what log collectors in a cluster expect."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "rank": int(os.environ.get("RANK", "0")),
            "message": record.getMessage(),
        }
        progress = getattr(record, "progress", None)
        if progress is not None:
            entry["progress"] = progress
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


class _HumanHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Log lines on a terminal: the progress bar steps aside first."""

    def emit(self, record: logging.LogRecord) -> None:
        if _bar is not None:
            _bar.end_line()
        super().emit(record)


_bar: Console | None = None  # the console drawing a bar in this process, if any


def setup_logging() -> str:
    """Configure the root logger for this process; returns the format in use."""
    fmt = log_format()
    handler: logging.Handler
    if fmt == "json":
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(JsonFormatter())
    else:
        handler = _HumanHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)
    for noisy in ("httpx", "urllib3", "filelock", "bitsandbytes"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    if os.environ.get(VERBOSE_ENV) != "1":
        quiet_libraries()
    return fmt


def quiet_libraries() -> None:
    """Libraries' progress bars, info chatter and deprecation warnings out of the default view."""
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", message=".*is deprecated.*")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()  # type: ignore[no-untyped-call]
        hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]
    except ImportError:  # pragma: no cover - the trainer always has transformers
        pass
    try:
        import datasets

        datasets.disable_progress_bars()  # type: ignore[no-untyped-call]
        datasets.logging.set_verbosity_error()  # type: ignore[no-untyped-call]
    except ImportError:  # pragma: no cover
        pass
    for name in ("trl", "peft", "accelerate", "torch.distributed"):
        logging.getLogger(name).setLevel(logging.ERROR)


def _clock(seconds: int | None) -> str:
    if seconds is None:
        return "--:--"
    hours, rest = divmod(int(seconds), 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes:02d}:{secs:02d}"


def progress_line(progress: Progress, width: int = 24) -> str:
    """`[#######-----]  30/60  loss 0.6124  1,234 tok/s  ETA 00:21` for a terminal."""
    total = progress.total_steps or 0
    done = min(progress.step / total, 1.0) if total else 0.0
    filled = int(done * width)
    bar = "#" * filled + "-" * (width - filled)
    parts = [f"[{bar}] {progress.step:>{len(str(total))}}/{total or '?'}"]
    if progress.loss is not None:
        parts.append(f"loss {progress.loss:.4f}")
    if progress.eval_loss is not None:
        parts.append(f"eval {progress.eval_loss:.4f}")
    if progress.tokens_per_second:
        parts.append(f"{progress.tokens_per_second:,.0f} tok/s")
    parts.append(f"ETA {_clock(progress.eta_seconds)}")
    return "  ".join(parts)


def progress_summary(progress: Progress) -> dict[str, Any]:
    """The fields of a progress report worth a JSON log line."""
    return {k: v for k, v in progress.to_wire().items() if v is not None and k != "updatedAt"}


class Console:
    """Shows progress: a bar redrawn in place on a terminal, a JSON line per report otherwise."""

    def __init__(self, fmt: str | None = None, stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stderr
        self.format = fmt or log_format(self.stream)
        self.drawn = False
        self.log = logging.getLogger("lmforge.trainer.progress")

    def show(self, progress: Progress) -> None:
        global _bar
        if self.format == "human":
            _bar = self
            self.stream.write("\r\033[K" + progress_line(progress))
            self.stream.flush()
            self.drawn = True
        else:
            self.log.info(
                "step %d/%s",
                progress.step,
                progress.total_steps or "?",
                extra={"progress": progress_summary(progress)},
            )

    def end_line(self) -> None:
        """Leave the bar on its own line before other output."""
        if self.drawn:
            self.stream.write("\n")
            self.stream.flush()
            self.drawn = False
