"""The two comparison benchmarks run end to end in their --quick form, and the correctness columns
of their reports hold: every implementation reaches the same loss from the same weights and batches,
and gptkit's greedy tokens equal transformers'. No timing is asserted (speed lives in the reports).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def run_script(name: str, *args: str, tmp_path: Path) -> str:
    env = {**os.environ, "GPTKIT_CACHE": os.environ.get("GPTKIT_CACHE", str(tmp_path / "cache"))}
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / name), *args],
        capture_output=True, text=True, timeout=600, cwd=ROOT, env=env,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


def table_rows(report: str) -> list[list[str]]:
    """The cells of the report's first Markdown table, header and separator left out."""
    lines = [line for line in report.splitlines() if line.startswith("|")]
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in lines[2:]]


def test_train_throughput_quick_reports_both_allocator_states_with_equal_losses(tmp_path: Path) -> None:
    report = run_script("train_throughput.py", "--quick", "--shapes", "char", tmp_path=tmp_path)
    rows = table_rows(report)
    implementations = {"gptkit GPT", "HF GPT2LMHeadModel (sdpa)", "plain PyTorch GPT (nanoGPT-style)"}
    for state in ("fresh", "warm"):
        phase = [row for row in rows if row[1] == state]
        assert {row[2] for row in phase} == implementations
        # Same weights, same batches, same maths: the same loss after the phase's last step (to
        # float32 rounding; the report prints 4 decimals).
        losses = [float(row[-1]) for row in phase]
        assert max(losses) - min(losses) <= 2e-4, phase
        gptkit = next(row for row in phase if row[2] == "gptkit GPT")
        # Page faults per step: the fused trunk's arena allocates nothing (0 in every recorded run).
        assert float(gptkit[-2].replace(",", "")) <= 20, gptkit
    assert "Target: gptkit / HF tokens/s at the char shape >= 1.5x; fresh:" in report


def test_train_throughput_refuses_an_allocator_state_without_the_char_shape(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "train_throughput.py"), "--shapes", "gpt2", "--allocator", "fresh"],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
    )
    assert result.returncode == 2 and "--allocator applies to the char shape only" in result.stderr


def test_generate_throughput_quick_gives_hf_greedy_tokens(tmp_path: Path) -> None:
    report = run_script("generate_throughput.py", "--quick", "--batches", "1", tmp_path=tmp_path)
    gptkit = next(row for row in table_rows(report) if row[1] == "gptkit decode_tokens")
    tokens, _, total = gptkit[-1].partition("/")
    assert tokens == total  # every greedy token equal to HF generate's
    assert "median against median" in report
