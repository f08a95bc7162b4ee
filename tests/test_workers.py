"""Worker processes that die: the parent stops with a one-line error at once instead of waiting forever."""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
import threading
import time

import pytest

from nanoforge import pretokenize, workers


def _kill_children_when_started(stop: threading.Event) -> None:
    while not stop.is_set():
        kids = multiprocessing.active_children()
        if kids:
            time.sleep(0.2)
            for k in kids:
                with contextlib.suppress(ProcessLookupError):  # one that ended between listing and kill
                    os.kill(k.pid, signal.SIGKILL)
            return
        time.sleep(0.02)


def _slow(x: int) -> int:
    time.sleep(0.05)
    return x * x


def test_how_it_ended():
    assert workers.how_it_ended(3) == "exit code 3"
    assert workers.how_it_ended(-signal.SIGKILL) == "killed by SIGKILL (out of memory?)"
    assert workers.how_it_ended(-signal.SIGTERM) == "killed by SIGTERM"


def test_imap_results_in_order_and_bounded():
    assert list(workers.imap(_slow, range(20), 2, "squares")) == [i * i for i in range(20)]


def test_imap_raises_when_a_worker_is_killed():
    stop = threading.Event()
    killer = threading.Thread(target=_kill_children_when_started, args=(stop,))
    killer.start()
    t0 = time.monotonic()
    try:
        with pytest.raises(workers.WorkerDied, match=r"squares: a worker process ended abruptly .*SIGKILL"):
            list(workers.imap(_slow, range(10_000), 2, "squares"))
    finally:
        stop.set()
        killer.join()
    assert time.monotonic() - t0 < 60  # 10,000 × 50 ms / 2 workers would take 250 s


def test_pretokenize_raises_when_a_worker_is_killed():
    stop = threading.Event()

    def texts():
        for i in range(100_000):
            if i == 50:  # the workers are running by now: kill them, then keep feeding
                _kill_children_when_started(stop)
            yield f"Wort{i} und noch ein Satz {i}. " * 20

    t0 = time.monotonic()
    with pytest.raises(workers.WorkerDied, match=r"BPE pre-tokenization: worker \d of 2 \(pid \d+\) killed by SIGKILL"):
        pretokenize.count_chunks(texts(), r"\w+| ?[^\s\w]+|\s+", processes=2, batch_chars=4096)
    assert time.monotonic() - t0 < 60
    assert not [p for p in multiprocessing.active_children() if p.is_alive()]
