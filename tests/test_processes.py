"""The command in processes of its own: console script, import cost, signals, torchrun. Marked slow."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, SMALL, features, manifest, many_images
from test_cli import VALID_STAGES

pytestmark = pytest.mark.slow


def run_module(*args: str, **kwargs) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=REPO, timeout=300, **kwargs)


def test_python_dash_m_behaves_like_the_console_script(tmp_path: Path) -> None:
    script = Path(sys.executable).parent / "backbone-inspect"
    args = ["sample_images/chelsea.jpg", "--json", *SMALL, "--layers", "stem,4"]
    env = {**os.environ, "TORCH_HOME": str(tmp_path)}
    as_module = run_module("-m", "backbone_inspect", *args, env=env)
    as_script = subprocess.run([str(script), *args], capture_output=True, text=True, cwd=REPO, timeout=300, env=env)
    assert as_module.returncode == as_script.returncode == 0, as_module.stderr
    assert as_module.stdout == as_script.stdout and json.loads(as_module.stdout)["layers"]["stem"]["shape"] == [64, 16, 16]
    bad = run_module("-m", "backbone_inspect", "sample_images/chelsea.jpg", "--layers", "9", env=env)
    assert bad.returncode == 2 and bad.stderr == f"Error: invalid stage 9; {VALID_STAGES}\n"


def test_help_and_usage_errors_import_neither_torch_nor_torchvision() -> None:
    check = (
        "import sys\n"
        "from backbone_inspect.cli import main\n"
        "sys.argv = ['backbone-inspect'] + sys.argv[1:]\n"
        "try:\n    main()\n"
        "except SystemExit as exit:\n"
        "    loaded = [m for m in ('torch', 'torchvision') if m in sys.modules]\n"
        "    print(exit.code, loaded)\n"
    )
    for args, code in ((["--help"], 0), (["x.jpg", "--layers", "7"], 2), (["x.jpg", "--arch", "vgg"], 2), (["missing.jpg"], 2)):
        result = run_module("-c", check, *args)
        assert result.stdout.splitlines()[-1] == f"{code} []", (args, result.stdout, result.stderr)


@pytest.mark.parametrize(
    ("signals", "exit_code"),
    [([signal.SIGINT], 130), ([signal.SIGTERM], 143), ([signal.SIGINT, signal.SIGINT], 130)],
    ids=["SIGINT", "SIGTERM", "SIGINT twice"],
)
def test_interrupted_run_leaves_only_complete_files_and_resumes(tmp_path: Path, signals, exit_code) -> None:
    root = many_images(tmp_path / "many", 120)
    out = tmp_path / "out"
    command = [sys.executable, "-m", "backbone_inspect", str(root), "--save", str(out), "--batch-size", "2",
               "--workers", "1", "--arch", "resnet50", "--resize", "96", "--crop", "96", "--layers", "1,4"]
    env = {**os.environ, "TORCH_HOME": str(tmp_path / "th")}
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    manifest_path = out / "manifest.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and (not manifest_path.exists() or len(manifest_path.read_text().splitlines()) < 6):
        time.sleep(0.05)
    for number in signals:
        process.send_signal(number)
        time.sleep(0.05)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == exit_code, stderr
    assert "Traceback" not in stderr and "processed " in stderr and "; stopped by SIG" in stderr
    saved = sorted(out.glob("*.pt"))
    assert 6 <= len(saved) < 120
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]
    lines = manifest(out)
    assert sorted(line["output"] for line in lines) == sorted(p.name for p in saved)
    for path in saved:
        assert set(features(path)) == {"layer1", "layer4"}
    rerun = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    assert f"processed {120 - len(saved)}, skipped {len(saved)}, failed 0" in rerun.stderr
    assert len(list(out.glob("*.pt"))) == 120


def test_torchrun_with_two_processes_splits_the_work_and_finishes_despite_bad_images(tmp_path: Path) -> None:
    root = many_images(tmp_path / "many", 9)
    (root / "img000.png").write_text("broken")  # in rank 0's slice
    out = tmp_path / "out"
    env = {**os.environ, "TORCH_HOME": str(tmp_path / "th"), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
               "--module", "backbone_inspect", str(root), "--save", str(out), *SMALL, "--layers", "4", "--workers", "0"]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300, cwd=REPO)
    assert result.returncode != 0, "one rank had a bad image"
    ranks = [manifest(out, f"manifest.shard-{i}-of-2.jsonl") for i in range(2)]
    assert [len(lines) for lines in ranks] == [5, 4]
    assert {line["output"] for lines in ranks for line in lines} == {f"img{i:03d}.pt" for i in range(9)}
    assert [line["status"] for line in ranks[0]].count("error") == 1
    assert all(line["status"] == "ok" for line in ranks[1])
    assert len(list(out.glob("*.pt"))) == 8


