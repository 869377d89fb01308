"""A simulation engine that does not come up ends `fedkd run` with a message and exit code 3.

Ray is replaced by fakes (no Ray process starts, so this is cheap): one that never finishes
starting, one that raises while starting (as Ray does when it misses its own 30 s), and one
whose workers never answer. Without the watchdog each of these runs hangs forever (the
ServerApp thread waits for replies without a timeout), which the subprocess timeout turns
into a failure.
"""

import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FAKES = textwrap.dedent("""
    import sys, time
    from flwr.server.superlink.fleet.vce.backend import raybackend

    class NeverUp:  # Ray never finishes starting
        def __init__(self, config):
            time.sleep(3600)

    class Raises:  # Ray gives up while starting
        def __init__(self, config):
            raise RuntimeError("simulated: Ray did not start within 30 s")

    class Silent:  # Ray is up, its workers never answer
        num_workers = 1
        def __init__(self, config): pass
        def build(self, app_fn): pass
        def process_message(self, message, context): time.sleep(3600)
        def terminate(self): pass

    raybackend.RayBackend = {"never-up": NeverUp, "raises": Raises, "silent": Silent}[sys.argv[1]]
    from simulations.cli import main
    sys.exit(main(sys.argv[2:]))
""")


@pytest.mark.extended
@pytest.mark.slow  # three Python processes importing torch and Flower, in parallel
def test_an_engine_that_does_not_come_up_ends_the_run_with_exit_code_3(tmp_path):
    script = tmp_path / "fake_engine.py"
    script.write_text(FAKES)
    procs = {}
    t0 = time.monotonic()
    # "raises" fails at once and is given a long limit: with 3 s, on a loaded machine, the watch
    # could fire before the fake engine was even built, and the run would end as "never-up" does
    limits = {"never-up": 3, "raises": 120, "silent": 3}
    for mode, limit in limits.items():  # in parallel: each is mostly Python start-up
        cmd = [sys.executable, str(script), mode, "run", "--startup-timeout", str(limit), "--experiment-name", mode,
               "--output-dir", str(tmp_path / "out"), "--cache-dir", str(tmp_path / f"cache-{mode}"),
               "--synthetic-users", "50", "--synthetic-items", "80", "--teacher-epochs", "1", "--num-rounds", "1"]
        procs[mode] = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                       start_new_session=True)
    results = {}
    try:
        for mode, proc in procs.items():
            _, err = proc.communicate(timeout=300)
            results[mode] = (proc.returncode, err)
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
    elapsed = time.monotonic() - t0
    for mode, (code, err) in results.items():
        assert code == 3, f"{mode}: exit {code}\n{err[-3000:]}"
        last = err.strip().splitlines()[-1]
        assert last.startswith("fedkd: error: the simulation engine"), f"{mode}: {err[-3000:]}"
        assert f"(--startup-timeout {limits[mode]})" in last and "Nothing was trained" in last
        assert str(tmp_path / "out" / mode / "run.log") in last
    assert "Ray had not started its workers after 3 s" in results["never-up"][1]
    assert ("failed while starting (RuntimeError: Simulation Runtime crashed. <- RuntimeError: simulated: Ray did "
            "not start within 30 s)") in results["raises"][1]
    assert "no ClientApp answered its first message within 3 s" in results["silent"][1]
    assert elapsed < 240


def test_help_explains_the_startup_timeout():
    out = subprocess.run([sys.executable, "-m", "simulations.cli", "run", "--help"], cwd=ROOT, capture_output=True,
                         text=True, timeout=120).stdout
    text = " ".join(out.split())
    assert "--startup-timeout SECONDS" in text and "exit code 3 instead of hanging; 0 waits forever" in text
