"""Compute dtypes, TF32, cuDNN autotuning, native bfloat16 and the decoding workers per device (CPU-side checks;
the same behaviour on a GPU is in test_cuda.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import warnings
from pathlib import Path

import pytest
import torch

from backbone_inspect.config import feature_config
from backbone_inspect.device import warm_up_cuda
from backbone_inspect.errors import UsageError
from backbone_inspect.extractor import Extractor
from backbone_inspect.local_engine import LocalEngine
from backbone_inspect.options import default_workers
from backbone_inspect.precision import check_compute_dtype, cpu_computes_natively, warn_if_emulated
from conftest import NEW_PRECISION_API, REPO, SAMPLES, SMALL, SMALL_OPTIONS, invoke, precision_state

SRC = REPO / "src"


USERS_SETTINGS = {
    "torch's defaults": "pass",
    "legacy: TF32 everywhere": "torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True",
    "legacy: no TF32, benchmark": "torch.backends.cudnn.allow_tf32 = False; torch.backends.cudnn.benchmark = True",
    "matmul precision high": "torch.set_float32_matmul_precision('high')",
    "matmul precision medium": "torch.set_float32_matmul_precision('medium')",
    "new API, matmul": "torch.backends.cuda.matmul.fp32_precision = 'tf32'",
    "new API, global": "torch.backends.fp32_precision = 'tf32'",
}


CUDA_MATH_CHECK = """
import warnings
import torch
from backbone_inspect.precision import cuda_math
from conftest import precision_state
{settings}
warnings.simplefilter("error")
warnings.filterwarnings("default", message=".*new API settings to control TF32")  # torch 2.9's one notice, not cuda_math's
users = precision_state()

def legacy_flags():  # what inductor reads; None where torch refuses (the APIs were mixed)
    try:
        return torch.get_float32_matmul_precision(), torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    except RuntimeError:
        return None

users_legacy = legacy_flags()
for tf32, autotune in [(False, False), (True, True), (False, True)]:
    with cuda_math(tf32=tf32, autotune=autotune):
        inside = precision_state()
        legacy = None if users_legacy is None else ('high' if tf32 else 'highest', tf32, tf32)
        assert legacy_flags() == legacy, legacy_flags()
    assert legacy_flags() == users_legacy
    assert precision_state() == users, (precision_state(), users)
    mode = "tf32" if tf32 else "ieee"
    assert inside[:2] == (mode, mode) and inside[3] is autotune, inside
    try:
        with cuda_math(tf32=tf32, autotune=autotune):
            raise KeyError("a failing forward")
    except KeyError:
        pass
    assert precision_state() == users
print("ok")
"""
"""Run in a process of its own after the user's ``settings`` line: cuda_math in both modes, and after a failing block."""


@pytest.mark.slow
@pytest.mark.parametrize("settings", list(USERS_SETTINGS.values()), ids=list(USERS_SETTINGS))
def test_cuda_math_sets_the_flags_inside_and_restores_the_users_own(settings: str) -> None:
    """In a process of its own: torch refuses to mix its legacy and new TF32 APIs once either is set."""
    if "fp32_precision" in settings and not NEW_PRECISION_API:
        pytest.skip(f"torch {torch.__version__} has no fp32_precision API (2.9 on)")
    # Warnings are errors from cuda_math on, not before: torch 2.9 (and later releases, until it was
    # dropped) warns once when the user's own line sets a legacy flag or set_float32_matmul_precision.
    code = CUDA_MATH_CHECK.format(settings=settings)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=Path(__file__).parent,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])})
    assert done.stdout == "ok\n", done.stderr


def test_a_forward_leaves_the_users_settings_as_they_were() -> None:
    before = precision_state()
    extractor = Extractor(feature_config(arch="resnet18", layers=(1,), device="cpu"), device="cpu")
    extractor.forward(torch.zeros(1, 3, 32, 32, dtype=torch.uint8))
    assert precision_state() == before


@pytest.mark.parametrize("device", ["cpu", "mps"])
def test_tf32_is_a_cuda_mode(device: str) -> None:
    with pytest.raises(UsageError, match=f"--dtype tf32: TF32 is a CUDA mode \\(--device {device}\\); use --dtype float32"):
        feature_config(dtype="tf32", device=device)
    with pytest.raises(UsageError, match=f"this run's device is {device}"):
        check_compute_dtype("tf32", torch.device(device))
    assert check_compute_dtype("tf32", torch.device("cuda")) is torch.float32


def test_tf32_on_a_cpu_is_a_usage_error_before_anything_is_written(tmp_path: Path, chelsea: Path) -> None:
    result = invoke(chelsea, *SMALL, "--dtype", "tf32", "--save", tmp_path / "out")
    assert result.exit_code == 2
    assert result.stderr == "Error: --dtype tf32: TF32 is a CUDA mode (--device cpu); use --dtype float32\n"
    assert not (tmp_path / "out").exists()
    result = invoke(chelsea, *SMALL, "--save-dtype", "tf32", "--save", tmp_path / "out")
    assert result.exit_code == 2 and "invalid --save-dtype 'tf32': expected float32, float16, bfloat16" in result.stderr


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_header_json_and_dump_name_the_compute_dtype(tmp_path: Path, chelsea: Path, dtype: str) -> None:
    table = invoke(chelsea, *SMALL, "--layers", "4", "--dtype", dtype)
    assert table.exit_code == 0 and f"device cpu  dtype {dtype}" in table.stdout.splitlines()[0]
    record = json.loads(invoke(chelsea, *SMALL, "--layers", "4", "--dtype", dtype, "--json").stdout)
    assert record["dtype"] == dtype and record["layers"]["layer4"]["dtype"] == dtype
    assert invoke(chelsea, *SMALL, "--layers", "4", "--dtype", dtype, "--save", tmp_path).exit_code == 0
    saved = torch.load(tmp_path / "chelsea.pt", weights_only=True)
    assert saved["meta"]["dtype"] == dtype


@pytest.mark.parametrize(("dtype", "flags", "native"), [
    ("bfloat16", "fpu sse2 avx2 avx512f avx512_bf16 amx_tile", True),
    ("bfloat16", "fpu sse2 avx2 avx512f amx_bf16", True),
    ("bfloat16", "fpu sse2 avx2 avx512f avx512bw avx512_fp16", False),
    ("bfloat16", "fpu sse2 avx2", False),
    ("float16", "fpu sse2 avx2 avx512f avx512_fp16", True),
    ("float16", "fpu sse2 avx2 avx512f amx_fp16", True),
    ("float16", "fpu sse2 avx2 avx512f avx512_bf16 amx_bf16", False),
])
def test_native_half_precision_is_read_from_the_cpu_flags(tmp_path: Path, dtype: str, flags: str, native: bool) -> None:
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\nmodel name\t: Some CPU\nflags\t\t: {flags}\n\nprocessor\t: 1\nflags\t\t: {flags}\n")
    assert cpu_computes_natively(dtype, cpuinfo) is native
    arm = tmp_path / "arm"
    arm_flag = {"bfloat16": "bf16", "float16": "asimdhp"}[dtype]
    arm.write_text(f"processor\t: 0\nFeatures\t: fp asimd {arm_flag + ' ' if native else ''}sve\n")
    assert cpu_computes_natively(dtype, arm) is native
    assert cpu_computes_natively(dtype, tmp_path / "absent") is None


@pytest.mark.parametrize(("dtype", "flags"), [("bfloat16", "avx512_bf16 or amx_bf16 flag, or bf16"),
                                              ("float16", "avx512_fp16 or amx_fp16 flag, or asimdhp")])
def test_an_emulated_half_precision_is_one_warning_line(monkeypatch: pytest.MonkeyPatch, chelsea: Path, dtype: str,
                                                        flags: str) -> None:
    monkeypatch.setattr("backbone_inspect.precision.cpu_computes_natively", lambda name: False)
    with pytest.warns(UserWarning, match=f"no native {dtype}"):
        warn_if_emulated(dtype, "cpu")
    result = invoke(chelsea, chelsea, *SMALL, "--layers", "4", "--dtype", dtype, "--summary")
    assert result.exit_code == 0
    warned = [line for line in result.stderr.splitlines() if "Warning" in line]
    assert warned == [f"Warning: --dtype {dtype}: this CPU has no native {dtype} (no {flags} on Arm, in /proc/cpuinfo), "
                      "so it is emulated and slower than float32; use --dtype float32"]
    monkeypatch.setattr("backbone_inspect.precision.cpu_computes_natively", lambda name: True)
    assert "Warning" not in invoke(chelsea, *SMALL, "--layers", "4", "--dtype", dtype).stderr
    monkeypatch.setattr("backbone_inspect.precision.cpu_computes_natively", lambda name: False)
    with warnings.catch_warnings():  # the Ray driver's copy checks the weights on its CPU: where the model runs, not it, warns
        warnings.simplefilter("error")
        Extractor(feature_config(**{**SMALL_OPTIONS, "dtype": dtype}), device="cpu")


@pytest.mark.parametrize(("cores", "device", "processes", "expected"), [
    (16, "cpu", 1, 8), (4, "cpu", 1, 3), (1, "cpu", 1, 1),
    (16, "cuda", 1, 14), (8, "cuda", 1, 6), (7, "cuda", 1, 6), (16, "cuda", 4, 3), (2, "cuda", 1, 1), (64, "cuda", 8, 6),
])
def test_default_workers_follow_the_device(monkeypatch: pytest.MonkeyPatch, cores: int, device: str, processes: int,
                                           expected: int) -> None:
    monkeypatch.setattr(os, "cpu_count", lambda: cores)
    monkeypatch.setattr(os, "sched_getaffinity", lambda _: set(range(cores)), raising=False)
    assert default_workers(device, processes_here=processes) == expected


def test_a_process_bound_to_its_own_cores_uses_them_all(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    monkeypatch.setattr(os, "sched_getaffinity", lambda _: set(range(16, 32)), raising=False)  # Slurm: 16 of 64
    assert default_workers("cuda", processes_here=4) == 14


def test_the_local_engine_resolves_its_default_workers_per_device(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda _: set(range(16)), raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    for name in ("RANK", "WORLD_SIZE", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_STEP_NUM_TASKS", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    assert (LocalEngine(workers=None).workers_for("cuda"), LocalEngine(workers=None).workers_for("cpu")) == (14, 8)
    assert LocalEngine(workers=2).workers_for("cuda") == 2
    monkeypatch.setenv("RANK", "1"), monkeypatch.setenv("WORLD_SIZE", "4"), monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert LocalEngine(workers=None).workers_for("cuda") == 3


def test_warming_up_cuda_is_nothing_on_a_cpu_and_never_fails_the_run(monkeypatch: pytest.MonkeyPatch) -> None:
    assert warm_up_cuda(torch.device("cpu"), torch.float32) is None
    if torch.cuda.is_available():
        pytest.skip("a machine with CUDA warms up for real (test_cuda.py)")
    escaped = []
    monkeypatch.setattr(threading, "excepthook", escaped.append)
    thread = warm_up_cuda(torch.device("cuda"), torch.float16)  # no CUDA here: the thread meets the error
    assert thread is not None
    thread.join(timeout=60)
    assert not thread.is_alive() and escaped == [], "the run reports a missing device itself, in words"
    result = invoke(SAMPLES / "chelsea.jpg", *SMALL[:-2], "--device", "cuda")
    assert result.exit_code != 0 and result.stderr.startswith("Error:") and "Traceback" not in result.output


@pytest.mark.parametrize(("initialised", "expected"), [(True, torch.device("cuda", 1)), (False, torch.device("cuda"))])
def test_the_warm_up_starts_the_callers_current_gpu(monkeypatch: pytest.MonkeyPatch, initialised: bool,
                                                     expected: torch.device) -> None:
    """A library user who chose GPU 1 (torch.cuda.set_device) builds on plain ``cuda``: the warm-up's
    thread would start GPU 0, its own current device. Not asked before CUDA starts: asking starts it."""
    from backbone_inspect import device

    warmed = []
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: initialised)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1 if initialised else pytest.fail("CUDA started"))
    monkeypatch.setattr(device, "_warm_up", lambda on, dtype: warmed.append(on))
    warm_up_cuda(torch.device("cuda"), torch.float16).join(timeout=60)
    assert warmed == [expected]
