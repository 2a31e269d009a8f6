"""CPU affinity of the served process: one CPU for the loop, all for uploads."""

from __future__ import annotations

import pytest

from dais_core.errors import InvalidData
from dais_wsgi.affinity import allowed_cpus, choose_cpu
from tests.child import run_python

pytestmark = pytest.mark.skipif(
    len(allowed_cpus()) < 2, reason="one CPU: there is no choice to make"
)


class TestChooseCpu:
    """Which CPU a process keeps to."""

    def test_off_pins_nothing(self):
        """``off`` leaves the process unpinned."""
        assert choose_cpu("off") is None
        assert choose_cpu("off", worker=3) is None

    def test_workers_go_round_the_allowed_cpus(self):
        """Worker i gets the i-th allowed CPU, round the list."""
        cpus = allowed_cpus()
        chosen = [choose_cpu("auto", worker=i) for i in range(2 * len(cpus))]
        assert chosen == cpus + cpus

    def test_auto_picks_an_allowed_cpu(self):
        """A single process keeps to one of the CPUs it may use."""
        assert choose_cpu("auto") in allowed_cpus()

    def test_a_named_cpu_must_be_allowed(self):
        """A CPU outside the allowed set is refused."""
        assert choose_cpu(str(allowed_cpus()[-1])) == allowed_cpus()[-1]
        with pytest.raises(InvalidData, match="not one this process may use"):
            choose_cpu(str(max(allowed_cpus()) + 1))


def test_an_upload_thread_widens_and_narrows_again():
    """Inside ``widened`` a pinned thread, and threads it starts, may use
    every CPU; afterwards it is back on its own.

    Run in a child process: pinning is process state.
    """
    script = """
        import os, threading
        from dais_wsgi.affinity import allowed_cpus, pin, widened
        cpus = set(allowed_cpus())
        home = max(cpus)
        pin(home)
        before = os.sched_getaffinity(0)
        seen = {}
        with widened():
            seen["inside"] = os.sched_getaffinity(0)
            helper = threading.Thread(
                target=lambda: seen.update(helper=os.sched_getaffinity(0))
            )
            helper.start()
            helper.join()
        after = os.sched_getaffinity(0)
        print(before == {home}, seen["inside"] == cpus, seen["helper"] == cpus,
              after == {home})
        """
    assert run_python(script).split() == ["True", "True", "True", "True"]


def test_a_thread_moved_meanwhile_gets_back_where_it_was():
    """A thread an operator moved while it was widened returns to where it
    was moved, not to the CPU chosen at start-up."""
    script = """
        import os
        from dais_wsgi.affinity import allowed_cpus, pin, widened
        cpus = allowed_cpus()
        pin(cpus[-1])
        os.sched_setaffinity(0, {cpus[0]})
        with widened():
            pass
        print(os.sched_getaffinity(0) == {cpus[0]})
        """
    assert run_python(script).split() == ["True"]
