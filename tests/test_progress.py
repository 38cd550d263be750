"""Live progress: what the children's logs say (AutoRound blocks, lm-eval / vLLM / API bars),
the sweep's ETA, the TTY and plain cadences; and, slow, a real sweep under a pseudo-TTY."""

from __future__ import annotations

import io
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from autoround_exp import child, progress
from autoround_exp.jobstatus import write as record_job
from autoround_exp.progress import ChildProgress, LogProgress
from tests.support import ROOT, ctrl_c_reaches_python, paths_args

BAR = "█████▌    "


def bar(desc: str, n: int, total: int, tail: str = "00:10<00:12, 45.0it/s") -> str:
    return f"\r{desc}: {100 * n // total:3d}%|{BAR}| {n}/{total} [{tail}]"


def parsed(*chunks: str) -> ChildProgress | None:
    log = LogProgress(Path("unused"))
    for chunk in chunks:
        log.feed(chunk)
    return log.progress


# ---------------------------------------------------------------- the logs


# llm-compressor's sequential pipeline with AutoRoundModifier on the tiny model, as logged
# (loguru lines, auto-round's coloured ones, tqdm bars), with the quantize child's block line.
LLMC_AUTOROUND = (
    bar("(2/5): Calibrating", 0, 16, "00:00<?, ?it/s")
    + bar("(2/5): Calibrating", 16, 16)
    + "\n2026-11-29T11:17:01.9275 | apply_autoround | INFO - Applying AutoRound on layer model.layers.0\n"
    + "[autoround] block 1/4 (model.layers.0)\n"
    + "\x1b[38;20mquantized 7/7 layers in the block, loss iter 0: 0.020582 -> iter 0: 0.020582\x1b[0m\n"
    + bar("(3/5): Calibrating", 5, 16)
)


def test_autoround_block_line_wins_over_calibration_bars():
    assert parsed(bar("(1/5): Calibrating", 2, 16)) == ChildProgress("calibrating subgraph", 1, 5)
    assert parsed(LLMC_AUTOROUND) == ChildProgress("AutoRound block", 1, 4)
    assert str(parsed(LLMC_AUTOROUND, "[autoround] block 3/4 (model.layers.2)\n")) == "AutoRound block 3/4"


def test_native_autoround_bar_counts_finished_blocks():
    # auto-round's own bar: "Quantizing model.layers.1 ... 1/4" is the second block being tuned
    assert parsed(bar("Quantizing model.layers.1", 1, 4)) == ChildProgress("AutoRound block", 2, 4)
    assert parsed(bar("Quantizing model.layers.3", 3, 4), bar("Quantizing model.layers.3", 4, 4)).n == 4
    assert parsed(bar("Quantizing done", 4, 4)) == ChildProgress("AutoRound block", 4, 4)


@pytest.mark.parametrize(
    "line,expected",
    [
        (bar("Running generate_until requests", 450, 1000), "lm-eval generate_until 450/1000"),
        (bar("Running loglikelihood requests", 7, 40), "lm-eval loglikelihood 7/40"),
        (bar("Running generate_until requests with text+image input", 3, 8), "lm-eval generate_until 3/8"),
        (
            bar(
                "Processed prompts", 450, 1000, "00:10<00:12, 45.0it/s, est. speed input: 1.0 toks/s, output: 2 toks/s"
            ),
            "vLLM prompts 450/1000",
        ),
        (bar("Requesting API", 450, 1000), "API requests 450/1000"),
    ],
)
def test_lm_eval_vllm_and_api_bars(line, expected):
    assert str(parsed("INFO lm-eval starts\n", line)) == expected


def test_unrelated_bars_and_lines_are_no_progress():
    noise = bar("Loading weights", 38, 38) + "\n" + bar("Preparing cache", 16, 16) + "\nloss 1/2 done\n"
    assert parsed(noise) is None


def test_reads_only_new_bytes_and_never_a_cut_off_bar(tmp_path):
    path = tmp_path / "lm_eval.log"
    path.write_bytes(b"")
    log = LogProgress(path)
    assert log.poll() is None
    line = bar("Running generate_until requests", 450, 1000).encode()
    first = bar("Running generate_until requests", 40, 1000).encode()
    cut = line.index(b"450/1000") + 2  # "...| 45": must not read as 45
    with path.open("ab") as f:
        f.write(first + line[:cut])
    assert log.poll() == ChildProgress("lm-eval generate_until", 40, 1000)
    assert log.offset == path.stat().st_size
    with path.open("ab") as f:
        f.write(line[cut:])
    assert log.poll() == ChildProgress("lm-eval generate_until", 450, 1000)
    # a multi-byte character of the bar split between two reads
    split = bar("Running generate_until requests", 460, 1000).encode()
    at = split.index("█".encode()) + 1
    with path.open("ab") as f:
        f.write(split[:at])
    log.poll()
    with path.open("ab") as f:
        f.write(split[at:])
    assert log.poll() == ChildProgress("lm-eval generate_until", 460, 1000)
    assert "\ufffd" not in log.partial


# ---------------------------------------------------------------- job k/N and the ETA


def test_job_k_of_n_from_the_sweep_dir(tmp_path, monkeypatch):
    monkeypatch.setattr(progress, "_job", progress._job)
    progress.write_total(tmp_path / "sweep", 5)
    progress.set_job(2, tmp_path / "sweep", time.time())
    assert progress._job.label == "job 3/5"
    progress.set_job(2, tmp_path / "elsewhere", time.time())
    assert progress._job.label == "job 3/?"
    progress.set_job(0, None, time.time())
    assert progress._job.label == "job 1/1"


def test_eta_is_mean_finished_job_times_jobs_left():
    assert progress.sweep_eta([], 4, 10.0) is None
    # 2 of 4 finished (mean 90 s); the third has run 30 s: 60 s for it, 90 s for the fourth
    assert progress.sweep_eta([60.0, 120.0], 4, 30.0) == (150.0, False)
    # past the mean: the rest is a lower bound
    assert progress.sweep_eta([60.0, 120.0], 4, 100.0) == (90.0, True)


def test_eta_from_the_jobs_this_sweep_finished(tmp_path):
    sweep = tmp_path / "sweep"
    progress.write_total(sweep, 3)
    now = time.time()
    job = progress.Job(1, 3, sweep, now - 10)
    assert progress.eta_text(job, now) == "sweep ETA unknown"
    record_job(str(sweep), 0, ["iters=0"], [], now - 130)  # the first job ends now, after 130 s
    assert progress.finished_durations(sweep) == [pytest.approx(130, abs=5)]
    # 120 s more for the second (10 s in), 130 s for the third
    assert re.fullmatch(r"sweep ETA 4m1[0-4]s", progress.eta_text(job, now))
    assert progress.eta_text(progress.Job(0, 1, None, now), now) == "sweep ETA unknown"  # a single run
    assert [progress.duration(s) for s in (5, 190, 3725)] == ["5s", "3m10s", "1h02m"]


# ---------------------------------------------------------------- cadence


class FakeTTY(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_default_intervals_and_the_environment_variable(monkeypatch):
    monkeypatch.delenv(progress.ENV, raising=False)
    assert (progress.interval_s(tty=True), progress.interval_s(tty=False)) == (30.0, 60.0)
    monkeypatch.setenv(progress.ENV, "2")
    assert progress.interval_s(tty=True) == progress.interval_s(tty=False) == 2.0


def write_log(path: Path) -> None:
    path.write_text("loading\n" + bar("Running generate_until requests", 3, 20))


def test_plain_lines_wait_a_whole_interval(tmp_path, monkeypatch):
    monkeypatch.setenv(progress.ENV, "0.2")
    monkeypatch.setattr(progress, "_job", progress.Job(1, 4, None, time.time()))
    write_log(tmp_path / "log")
    out = io.StringIO()
    with progress.watching(tmp_path / "log", "evaluate hf", out):
        time.sleep(0.05)
    assert out.getvalue() == ""  # a stage shorter than the interval prints nothing
    with progress.watching(tmp_path / "log", "evaluate hf", out):
        time.sleep(1.1)
    lines = out.getvalue().splitlines()
    assert 2 <= len(lines) <= 6, lines
    assert re.fullmatch(
        r"\[progress\] job 2/4 evaluate hf \ds lm-eval generate_until 3/20 · sweep ETA unknown", lines[0]
    )


def test_tty_shows_a_bar_at_once_and_its_last_state(tmp_path, monkeypatch):
    monkeypatch.setenv(progress.ENV, "30")
    monkeypatch.setattr(progress, "_job", progress.Job(0, 1, None, time.time()))
    (tmp_path / "log").write_text("")
    out = FakeTTY()
    with progress.watching(tmp_path / "log", "quantize autoround", out):
        assert "job 1/1 quantize autoround 00:00 · sweep ETA unknown" in out.getvalue()
        (tmp_path / "log").write_text("[autoround] block 2/4 (model.layers.1)\n")
    shown = out.getvalue()
    assert "[progress]" not in shown and "\r" in shown
    assert re.search(r"job 1/1 quantize autoround 00:00 \|[^|]+\| AutoRound block 2/4 · sweep ETA unknown", shown)


def test_child_run_reports_a_silent_child_and_still_times_out(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(progress.ENV, "0.3")
    monkeypatch.setattr(progress, "_job", progress.Job(0, 1, None, time.time()))
    child.run([sys.executable, "-c", "import time; time.sleep(1)"], tmp_path / "a.log", 30, "quiet", stage="quantize")
    assert "[progress] job 1/1 quantize 0s · sweep ETA unknown" in capsys.readouterr().out
    with pytest.raises(child.ChildFailed, match="slow timed out"):
        child.run([sys.executable, "-c", "import time; time.sleep(30)"], tmp_path / "b.log", 1, "slow")


def test_ctrl_c_while_watching_still_ends_the_child(tmp_path):
    code = (
        "import sys; from pathlib import Path; from autoround_exp import child\n"
        "child.run([sys.executable, '-c', 'import os, time; print(os.getpid(), flush=True); time.sleep(60)'],"
        f" Path({str(tmp_path / 'c.log')!r}), 120, 'sleeper', stage='quantize')\n"
    )
    env = {**os.environ, progress.ENV: "0.2"}
    proc = subprocess.Popen(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        text=True,
        preexec_fn=ctrl_c_reaches_python,
    )
    deadline = time.monotonic() + 60
    while not (tmp_path / "c.log").is_file() or not (tmp_path / "c.log").read_text().strip():
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.1)
    pid = int((tmp_path / "c.log").read_text().split()[0])
    time.sleep(0.5)  # a few progress lines
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode != 0 and "[progress] job 1/1 quantize" in out
    assert not Path(f"/proc/{pid}").exists()  # ended and reaped by child.stop


# ---------------------------------------------------------------- the real chain, on a TTY


SWEEP = [
    "-m",
    "method=rtn,autoround",
    "iters=16",
    "scheme=w4a16",
    "calibration.nsamples=8",
    "calibration.seqlen=64",
    "baselines=false",
    "serve=hf",
    "eval.limit=20",
    "report.readme=null",
]


def run_on_pty(argv: list[str], cwd: Path, env: dict, timeout_s: float) -> tuple[int, str]:
    """Run ``argv`` with stdout and stderr on a pseudo-terminal, as in a shell; all it wrote."""
    import fcntl
    import pty
    import select
    import struct
    import termios

    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 50, 200, 0, 0))
    proc = subprocess.Popen(argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=slave, stderr=slave)
    os.close(slave)
    out = bytearray()
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 1)
            if ready:
                try:
                    data = os.read(master, 65536)
                except OSError:  # EIO: every writer has closed the terminal
                    break
                if not data:
                    break
                out += data
            elif proc.poll() is not None:
                break
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        os.close(master)
    return proc.returncode, out.decode(errors="replace")


@pytest.mark.slow
def test_sweep_on_a_tty_shows_job_stage_elapsed_and_child_progress(tmp_path):
    env = {**os.environ, progress.ENV: "2"}
    # its own checkpoints: the bar must show the quantize stage at work
    argv = [sys.executable, str(ROOT / "run.py"), *SWEEP, *paths_args(tmp_path, share_checkpoints=False)]
    argv += ["tracking.enabled=false"]
    rc, out = run_on_pty(argv, tmp_path, env, timeout_s=600)
    states = [s for s in re.split(r"[\r\n]", out) if s.startswith("job ")]
    assert "[progress]" not in out, out[-3000:]  # the bar, not the plain lines

    def seen(pattern: str) -> bool:
        return any(re.search(pattern, s) for s in states)

    assert seen(r"^job 1/2 quantize rtn \d\d:\d\d · sweep ETA unknown"), states
    assert seen(r"^job 1/2 evaluate hf \d\d:\d\d \|.*\| lm-eval generate_until \d+/20 · sweep ETA unknown"), states
    # the AutoRound job, once the first job's time is known
    assert seen(r"^job 2/2 quantize autoround \d\d:\d\d \|.*\| AutoRound block [1-4]/4 · sweep ETA (>?\d|overdue)"), (
        states
    )
    assert seen(r"^job 2/2 evaluate hf \d\d:\d\d"), states
    assert rc == 0 and "[sweep] 2 done, 0 reused, 0 failed" in out, out[-3000:]
