"""Run a check script with Triton's CPU interpreter (``TRITON_INTERPRET=1`` must be set before
Triton is imported, hence a subprocess), from the repository root."""
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def run_under_interpreter(script: str, timeout: float, **env: str) -> subprocess.CompletedProcess:
    """``python -c script`` with TRITON_INTERPRET=1 and the repository on PYTHONPATH (plus ``env``)."""
    environment = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT), **env}
    return subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=environment, capture_output=True,
                          text=True, timeout=timeout)
