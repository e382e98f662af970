"""benchmarks/gpu.py: skips cleanly without CUDA, and its measuring code runs (tiny model, CPU)."""

from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu.py"


def load_script():
    spec = importlib.util.spec_from_file_location("gpu_bench", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_without_cuda_it_prints_one_skip_line_and_exits_0() -> None:
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run([sys.executable, str(SCRIPT)], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == load_script().SKIP_MESSAGE


@pytest.mark.parametrize("mode", ["bf16", "fp16"])
def test_measuring_code_runs_on_a_tiny_model(mode: str, monkeypatch) -> None:
    bench = load_script()
    import gptkit.model.presets as presets

    tiny = {"n_layer": 1, "n_head": 2, "d_model": 16, "block_size": 32, "vocab_size": 64}
    monkeypatch.setattr(presets, "preset_values", lambda name: dict(tiny))
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **k: None)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    args = argparse.Namespace(batch=2, seq=16, steps=2, warmup=1, new_tokens=4)
    tokens_per_second, fpt = bench.train_tokens_per_second(mode, args, torch.device("cpu"))
    assert tokens_per_second > 0 and fpt > 6 * 64 * 16
    assert bench.decode_tokens_per_second(2, args, torch.device("cpu")) > 0


def test_gpu_check_writes_its_report_under_an_absolute_out(tmp_path: Path) -> None:
    """OUT=/abs/path (as a job folder is given) must hold gpu_report.jsonl: $PWD/$OUT named a
    folder that does not exist, and every CUDA test failed writing its measurements."""
    stubs = tmp_path / "bin"
    stubs.mkdir()
    (stubs / "nvidia-smi").write_text("#!/bin/sh\nexit 0\n")
    # A stand-in for python: where the CUDA tests run, write a report line as they do.
    (stubs / "python").write_text(
        '#!/bin/sh\ncase "$*" in *tests/gpu*) echo "{}" >> "$GPTKIT_GPU_REPORT" || exit 1;; esac\nexit 0\n'
    )
    for stub in stubs.iterdir():
        stub.chmod(0o755)
    out = tmp_path / "out"
    env = {**os.environ, "PATH": f"{stubs}{os.pathsep}{os.environ['PATH']}", "OUT": str(out),
           "PYTHON": str(stubs / "python"), "SUITE_SECONDS": "5"}
    script = SCRIPT.parent / "gpu_check.sh"
    result = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert (out / "gpu_report.jsonl").read_text() == "{}\n", result.stdout
