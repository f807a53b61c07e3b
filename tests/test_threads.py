"""The scripts' CPU thread rule (minivr1/threads.py): one thread on a CPU unless OMP_NUM_THREADS says
otherwise, so a run repeats on any machine whatever its cores and load."""
import pytest
import torch

from minivr1 import threads


@pytest.fixture
def restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_omp_num_threads_is_obeyed(monkeypatch, restore_threads):
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    torch.set_num_threads(2)
    assert threads.set_cpu_threads() == 2 and torch.get_num_threads() == 2        # untouched


def test_a_cpu_only_run_gets_one_thread_whatever_the_machine(monkeypatch, restore_threads):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    torch.set_num_threads(2)
    assert threads.set_cpu_threads() == 1 and torch.get_num_threads() == 1


def test_with_a_gpu_torch_keeps_its_default(monkeypatch, restore_threads):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    torch.set_num_threads(2)
    assert threads.set_cpu_threads() == 2
