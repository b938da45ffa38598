"""`python tests/tuner/run_loop.py train --config RUN.toml [--resume latest]`: the real CLI with the test trainer.

Used by the loop tests for runs that must be separate processes (SIGKILL, `accelerate launch`, exit codes).
"""

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parents[1])]  # the test trainer, and the repository (tuner)

import loop_trainer  # noqa: E402

from tuner.cli import main  # noqa: E402

if __name__ == "__main__":
    loop_trainer.register()
    sys.exit(main(sys.argv[1:]))
