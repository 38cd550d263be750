"""Live progress while a child quantizes or evaluates: job k/N of the sweep, the stage, its
elapsed time, the child's own progress as its log shows it, and the sweep's ETA.

The child's log is the only channel: a thread reads the bytes added since its last look,
every ``interval_s()``. On a TTY a tqdm status bar; otherwise one plain line per interval,
so CI and Slurm logs stay short. Nothing here may break a run: any error ends the display.
"""

from __future__ import annotations

import codecs
import functools
import os
import re
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from autoround_exp import jobstatus

ENV = "AUTOROUND_EXP_PROGRESS_S"  # seconds between updates; 0 turns the display off
TTY_INTERVAL_S = 30.0
PLAIN_INTERVAL_S = 60.0
TOTAL_FILE = "jobs.total"  # in the sweep dir: how many jobs the -m sweep has
AUTOROUND_BLOCK = "[autoround] block"  # what the quantize child prints per decoder block


@dataclass(frozen=True)
class Job:
    num: int  # Hydra's job number, from 0
    total: int | None  # None: a sweep whose job count was not written
    sweep_dir: Path | None  # None for a single run
    started: float  # epoch seconds

    @property
    def label(self) -> str:
        return f"job {self.num + 1}/{self.total or '?'}"


_job = Job(0, 1, None, time.time())


def set_job(num: int, sweep_dir: str | Path | None, started: float) -> None:
    """The job that this process runs now (one at a time, also under Hydra's local launcher)."""
    global _job
    if sweep_dir is None:
        _job = Job(0, 1, None, started)
    else:
        _job = Job(num, read_total(Path(sweep_dir)), Path(sweep_dir), started)


def write_total(sweep_dir: Path, total: int) -> None:
    sweep_dir.mkdir(parents=True, exist_ok=True)
    (sweep_dir / TOTAL_FILE).write_text(f"{total}\n")


def read_total(sweep_dir: Path) -> int | None:
    try:
        return int((sweep_dir / TOTAL_FILE).read_text())
    except (OSError, ValueError):
        return None


# ---------------------------------------------------------------- the child's log


@dataclass(frozen=True)
class ChildProgress:
    label: str
    n: int
    total: int

    def __str__(self) -> str:
        return f"{self.label} {self.n}/{self.total}"


# The counts must be followed by tqdm's " [elapsed" (or the block line's " ("): a bar cut
# off mid-write then never reads as a smaller fraction.
_BAR = r":\s+\d+%\|[^|]*\|\s*(?P<n>\d+)/(?P<total>\d+) \["
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def _block(m: re.Match) -> ChildProgress:
    return ChildProgress("AutoRound block", int(m["n"]), int(m["total"]))


def _native_block(m: re.Match) -> ChildProgress:
    # auto-round's bar counts finished blocks; the one being tuned is the next
    n, total = int(m["n"]), int(m["total"])
    return ChildProgress("AutoRound block", total if m["what"] == "done" else min(n + 1, total), total)


def _subgraph(m: re.Match) -> ChildProgress:
    return ChildProgress("calibrating subgraph", int(m["i"]), int(m["k"]))


def _bar(label: str) -> Callable[[re.Match], ChildProgress]:
    return lambda m: ChildProgress(label.format(**m.groupdict()), int(m["n"]), int(m["total"]))


# (rank, pattern, reading): a match replaces what is shown unless that came from a higher
# rank, so llm-compressor's per-subgraph calibration bars never hide the AutoRound block.
PATTERNS: list[tuple[int, re.Pattern, Callable[[re.Match], ChildProgress]]] = [
    (2, re.compile(re.escape(AUTOROUND_BLOCK) + r" (?P<n>\d+)/(?P<total>\d+) \("), _block),
    (1, re.compile(r"Quantizing (?P<what>\S+)" + _BAR), _native_block),
    (0, re.compile(r"\((?P<i>\d+)/(?P<k>\d+)\): (?:Calibrating|Propagating)" + _BAR), _subgraph),
    (0, re.compile(r"Running (?P<kind>\w+) requests[^:|]*" + _BAR), _bar("lm-eval {kind}")),
    (0, re.compile(r"Processed prompts" + _BAR), _bar("vLLM prompts")),
    (0, re.compile(r"Requesting API" + _BAR), _bar("API requests")),
]


class LogProgress:
    """The latest progress in a log that is still being written; each ``poll`` reads only
    the bytes added since the last one. tqdm separates its updates with '\\r'."""

    def __init__(self, path: Path):
        self.path = path
        self.offset = 0
        self.partial = ""
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.rank = -1
        self.progress: ChildProgress | None = None

    def feed(self, text: str) -> None:
        *done, self.partial = re.split(r"[\r\n]", self.partial + text)
        self.partial = self.partial[-4096:]  # a bar, not a runaway line
        # the unfinished tail is the bar's current state; a cut-off one matches no pattern
        for segment in [*done, self.partial]:
            self._match(_ANSI.sub("", segment))

    def _match(self, segment: str) -> None:
        if "/" not in segment:  # most log lines: no count, no regex
            return
        for rank, pattern, reading in PATTERNS:
            if rank >= self.rank and (m := pattern.search(segment)):
                self.rank, self.progress = rank, reading(m)
                return

    def poll(self) -> ChildProgress | None:
        try:
            with self.path.open("rb") as f:
                f.seek(self.offset)
                data = f.read()
        except OSError:
            return self.progress
        self.offset += len(data)
        self.feed(self.decoder.decode(data))
        return self.progress


# ---------------------------------------------------------------- ETA and the line


def finished_durations(sweep_dir: Path) -> list[float]:
    """Seconds each finished job of the sweep took (the jobs' status files)."""
    return [job.seconds for job in jobstatus.read(sweep_dir)]


def sweep_eta(durations: list[float], total: int | None, current_elapsed: float) -> tuple[float, bool] | None:
    """Seconds until the sweep ends: the mean finished-job time for each job not yet
    finished, less what the current one has run; and whether the current one has run past
    that mean, which makes the figure a lower bound."""
    if not durations or total is None:
        return None
    mean = sum(durations) / len(durations)
    remaining = max(total - len(durations), 1)
    return mean * (remaining - 1) + max(mean - current_elapsed, 0.0), current_elapsed > mean


def duration(seconds: float) -> str:
    s = int(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def eta_text(job: Job, now: float) -> str:
    eta = sweep_eta(finished_durations(job.sweep_dir), job.total, now - job.started) if job.sweep_dir else None
    if eta is None:
        return "sweep ETA unknown"
    seconds, overrun = eta
    if overrun and seconds < 1:
        return "sweep ETA overdue"  # the last job, past the mean job time
    return f"sweep ETA {'>' if overrun else ''}{duration(seconds)}"


def interval_s(tty: bool) -> float:
    value = os.environ.get(ENV)
    if value:
        try:
            return float(value)
        except ValueError:
            pass
    return TTY_INTERVAL_S if tty else PLAIN_INTERVAL_S


# ---------------------------------------------------------------- displays


class PlainLines:
    """One line per interval, none at the start: at most one a minute in a CI or Slurm log."""

    def __init__(self, job: Job, stage: str, stream: TextIO):
        self.prefix, self.stream = f"[progress] {job.label} {stage}", stream

    def show(self, elapsed: float, child: ChildProgress | None, eta: str) -> None:
        child_text = f" {child}" if child else ""
        print(f"{self.prefix} {duration(elapsed)}{child_text} · {eta}", file=self.stream, flush=True)

    def close(self) -> None:
        pass


def _escape(text: str) -> str:
    return text.replace("{", "{{").replace("}", "}}")


@functools.cache
def _bar_class() -> type:
    from tqdm import tqdm

    class Bar(tqdm):
        monitor_interval = 0  # no monitor thread of tqdm's own: the watcher refreshes it

    return Bar


class StatusBar:
    """tqdm's status line, shown at once; its bar is the child's own fraction when known."""

    def __init__(self, job: Job, stage: str, stream: TextIO, eta: str):
        self.prefix = _escape(f"{job.label} {stage}")
        self.bar = _bar_class()(
            total=None, file=stream, leave=True, dynamic_ncols=True, bar_format=self._format(None, eta)
        )

    def _format(self, child: ChildProgress | None, eta: str) -> str:
        if child is None:
            return f"{self.prefix} {{elapsed}} · {_escape(eta)}"
        return f"{self.prefix} {{elapsed}} |{{bar:16}}| {_escape(str(child))} · {_escape(eta)}"

    def show(self, elapsed: float, child: ChildProgress | None, eta: str) -> None:
        if child is not None:
            self.bar.total, self.bar.n = child.total, child.n
        self.bar.bar_format = self._format(child, eta)
        self.bar.refresh()

    def close(self) -> None:
        self.bar.close()


class _Watch(threading.Thread):
    def __init__(self, log_path: Path, stage: str, interval: float, stream: TextIO, tty: bool):
        super().__init__(name="autoround-exp-progress", daemon=True)
        self.job, self.log, self.interval = _job, LogProgress(log_path), interval
        self.start_t = time.monotonic()
        self.done = threading.Event()
        self.lock = threading.Lock()
        self.display: PlainLines | StatusBar = (
            StatusBar(self.job, stage, stream, eta_text(self.job, time.time()))
            if tty
            else PlainLines(self.job, stage, stream)
        )

    def update(self) -> None:
        with self.lock:
            child = self.log.poll()
            self.display.show(time.monotonic() - self.start_t, child, eta_text(self.job, time.time()))

    def run(self) -> None:
        try:
            while not self.done.wait(self.interval):
                self.update()
        except Exception:
            pass  # the display stops; the child and its log go on

    def finish(self) -> None:
        self.done.set()
        self.join(timeout=5)
        try:
            if isinstance(self.display, StatusBar):
                self.update()  # the bar's last state stays on screen
            self.display.close()
        except Exception:
            pass


@contextmanager
def watching(log_path: Path, stage: str, stream: TextIO | None = None) -> Iterator[None]:
    """Show the progress of the child that writes ``log_path`` while the block runs."""
    watch = None
    try:
        stream = stream or (sys.stderr if sys.stderr.isatty() else sys.stdout)
        tty = stream.isatty()
        interval = interval_s(tty)
        if interval > 0:
            watch = _Watch(log_path, stage, interval, stream, tty)
            watch.start()
    except Exception:
        watch = None
    try:
        yield
    finally:
        if watch is not None:
            watch.finish()
