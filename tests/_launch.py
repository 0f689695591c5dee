"""Running the cluster launcher (`ray up`, `ray submit`, `ray job submit`...) from a test: its
output kept in a log as it comes, and a hung step failed after QUIET_S seconds of silence instead
of at its timeout."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


# A launcher step that prints nothing for this long is taken as hung: Ray Tune prints its status
# table every ~30 s and the launcher each of its phases, so silence means no progress. (A hang of
# `ray job submit` once waited out its whole 600 s timeout and left no log; issue 24.)
QUIET_S = float(os.environ.get("LDCT_LAUNCH_QUIET_S", "240"))


def run_launcher(cmd: list[str], env: dict[str, str], timeout: float, log: Path, ok: bool = True) -> str:
    """Run a launcher command, keep its output for the README (and for a failure's message).

    Fails after ``timeout`` seconds, or sooner after ``QUIET_S`` seconds without a line of output,
    with what it printed so far; the log file keeps every line as it comes."""
    started = time.perf_counter()
    lines: list[str] = []
    last = [time.monotonic()]
    with log.open("a") as fh:
        fh.write(f"$ {' '.join(cmd)}\n")
        fh.flush()
        proc = subprocess.Popen(
            cmd,
            env=env,
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )

        def pump() -> None:
            for line in proc.stdout:
                lines.append(line)
                fh.write(line)
                fh.flush()
                last[0] = time.monotonic()

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        why = ""
        while proc.poll() is None:
            if time.perf_counter() - started > timeout:
                why = f"still running after {timeout:.0f} s"
            elif time.monotonic() - last[0] > QUIET_S:
                why = f"no output for {QUIET_S:.0f} s"
            if why:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                break
            time.sleep(1)
        reader.join(timeout=10)
        seconds = time.perf_counter() - started
        fh.write(f"[exit {proc.returncode}, {seconds:.0f} s{'; killed: ' + why if why else ''}]\n\n")
    out = "".join(lines)
    assert not why, f"{' '.join(cmd[:3])} killed, {why}:\n{out[-6000:]}"
    if ok:
        assert proc.returncode == 0, f"{' '.join(cmd[:3])} failed ({proc.returncode}):\n{out[-6000:]}"
    else:
        assert proc.returncode != 0, f"{' '.join(cmd[:3])} should have failed:\n{out[-3000:]}"
    return out
