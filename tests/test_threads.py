"""The scripts' CPU thread rule (minivr1/threads.py)."""
import pytest
import torch

from minivr1 import threads


@pytest.mark.parametrize("default, cpus, load, want", [
    (2, 2, 0.0, 2),       # an idle machine: torch's default
    (2, 2, 0.4, 2),       # a little noise does not count
    (2, 2, 1.2, 1),       # one CPU busy elsewhere: one thread
    (2, 2, 6.0, 1),       # oversubscribed (a shared 2-core machine): one thread, never 0
    (8, 16, 4.0, 8),      # more CPUs free than torch wants: its default
    (8, 8, 3.6, 4),       # 4 of 8 busy: 4
])
def test_cpu_threads_rule(default, cpus, load, want):
    assert threads.cpu_threads(default, cpus, load) == want


@pytest.fixture
def restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_omp_num_threads_is_obeyed(monkeypatch, restore_threads):
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    monkeypatch.setattr(threads.os, "getloadavg", lambda: (9.0, 9.0, 9.0))
    torch.set_num_threads(2)
    assert threads.set_cpu_threads() == 2 and torch.get_num_threads() == 2        # untouched


def test_busy_machine_gets_one_thread(monkeypatch, restore_threads, capsys):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(threads.os, "getloadavg", lambda: (6.0, 6.0, 6.0))
    monkeypatch.setattr(threads.os, "sched_getaffinity", lambda pid: {0, 1})
    torch.set_num_threads(2)
    assert threads.set_cpu_threads() == 1 and torch.get_num_threads() == 1
    assert "OMP_NUM_THREADS" in capsys.readouterr().err
    monkeypatch.setattr(threads.os, "getloadavg", lambda: (0.0, 0.0, 0.0))   # idle: the default stays
    torch.set_num_threads(2)
    assert threads.set_cpu_threads() == 2 and torch.get_num_threads() == 2
