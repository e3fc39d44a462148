"""Wall time of the CLI's quick commands, each in a fresh process: target at most 1 s.

    python scripts/bench_startup.py              # 5 repetitions each, medians
    python scripts/bench_startup.py --repeat 1

Commands that only compose or print (help, ``train --cfg job``) must not pay for
torch, transformers or Lightning: those load only when a command needs them.
``ftx plan`` needs them (it builds the model on PyTorch's meta device to read
every shape) and has no target; it is listed, with ``import torch`` alone, for scale.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

TARGET_S = 1.0
COMMANDS = (  # (shown as, arguments, held to the target)
    ("ftx --help", ["--help"], True),
    ("ftx train --help", ["train", "--help"], True),
    ("ftx train --cfg job", ["train", "--cfg", "job"], True),
    ("ftx train method=qlora method.r=32 --cfg job", ["train", "method=qlora", "method.r=32", "--cfg", "job"], True),
    ("ftx sweep --list", ["sweep", "--list"], True),
    ("ftx plan model=llama31_8b method=qlora", ["plan", "model=llama31_8b", "method=qlora", "trainer=gpu"], False),
)


def ftx_command() -> list[str]:
    """The installed console script next to this interpreter, else ``python -m ftx.cli``."""
    script = Path(sys.executable).parent / "ftx"
    if script.exists():
        return [str(script)]
    found = shutil.which("ftx")
    return [found] if found else [sys.executable, "-m", "ftx.cli"]


def wall_time(command: list[str]) -> float:
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    elapsed = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{done.stderr[-2000:]}")
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()

    ftx = ftx_command()
    rows = [(label, [*ftx, *argv], held) for label, argv, held in COMMANDS]
    rows.append(("python -c 'import torch'", [sys.executable, "-c", "import torch"], False))
    print(f"| command | median s ({args.repeat} runs) | target ≤ {TARGET_S:g} s |\n|---|---|---|")
    slow = []
    for label, command, held in rows:
        median = statistics.median(wall_time(command) for _ in range(args.repeat))
        verdict = ("meets" if median <= TARGET_S else "over") if held else "(for scale)"
        if verdict == "over":
            slow.append(label)
        print(f"| `{label}` | {median:.2f} | {verdict} |", flush=True)
    if slow:
        print(f"over the {TARGET_S:g} s target: {', '.join(slow)}")


if __name__ == "__main__":
    main()
