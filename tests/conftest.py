from __future__ import annotations

import ipaddress
import socket
import sys
from pathlib import Path

import pytest
import torch
import torchvision

REPO = Path(__file__).resolve().parent.parent
SAMPLES = REPO / "sample_images"


def _is_loopback(address: object) -> bool:
    host = address[0] if isinstance(address, tuple) else address
    if isinstance(host, str) and host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@pytest.fixture(autouse=True)
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """No test may reach the network: connections anywhere but loopback fail like an offline machine."""
    original_connect = socket.socket.connect

    def guarded_connect(self: socket.socket, address: object) -> None:
        if self.family in (socket.AF_INET, socket.AF_INET6) and not _is_loopback(address):
            raise OSError(101, "Network is unreachable (blocked by the test suite)")
        return original_connect(self, address)

    def guarded_getaddrinfo(host: object, *args: object, **kwargs: object) -> object:
        if not _is_loopback(host) and host is not None:
            raise socket.gaierror(socket.EAI_NONAME, "Name resolution blocked by the test suite")
        return original_getaddrinfo(host, *args, **kwargs)

    original_getaddrinfo = socket.getaddrinfo
    monkeypatch.setattr(socket.socket, "connect", guarded_connect)
    monkeypatch.setattr(socket, "getaddrinfo", guarded_getaddrinfo)


@pytest.fixture(autouse=True)
def torch_home(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty TORCH_HOME per test, so no test sees the user's cached weights."""
    home = tmp_path_factory.mktemp("torch_home")
    monkeypatch.setenv("TORCH_HOME", str(home))
    return home


LAUNCHER_AND_TERMINAL_VARIABLES = (
    "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "TORCHELASTIC_RUN_ID", "MASTER_ADDR", "MASTER_PORT",
    "SLURM_PROCID", "SLURM_NTASKS", "SLURM_STEP_NUM_TASKS", "SLURM_LOCALID", "SLURM_NTASKS_PER_NODE",
    "SLURM_STEP_TASKS_PER_NODE", "SLURM_NODEID",
    "FORCE_COLOR", "PY_COLORS", "GITHUB_ACTIONS", "TTY_COMPATIBLE", "TTY_INTERACTIVE", "COLUMNS", "TERMINAL_WIDTH",
)
"""What the suite's machine may set that changes what a run does or shows: a Slurm job or torchrun
shards every run (SLURM_NTASKS=2: half the images); CI's colour and width settings put escape codes
in Rich's and Typer's output, or wrap the help. The tests that need them set them themselves."""


def pytest_configure(config: pytest.Config) -> None:
    """The same environment on every machine (in this process and the commands it starts), and, under
    pytest-xdist, each worker process gets its share of the cores for torch's threads: by default
    every process would start one thread per core (14 workers on 16 cores: 224)."""
    import os

    for name in LAUNCHER_AND_TERMINAL_VARIABLES:
        os.environ.pop(name, None)
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0") or 0)
    if workers > 1:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))


NEW_PRECISION_API = hasattr(getattr(torch.backends.cudnn, "conv", None), "fp32_precision")
"""torch 2.9 on: per-backend ``fp32_precision``; before, the legacy ``allow_tf32`` flags alone."""


def precision_state() -> tuple[object, ...]:
    """What decides float32 maths on CUDA, read through torch's own API (the new one where it
    exists; else the legacy flags, as "tf32" or "ieee"), and the autotuning flag."""
    if NEW_PRECISION_API:
        return (torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision,
                torch.backends.fp32_precision, torch.backends.cudnn.benchmark)
    modes = ["tf32" if flag else "ieee" for flag in (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)]
    return (*modes, torch.get_float32_matmul_precision(), torch.backends.cudnn.benchmark)


def seeded_model(arch: str, seed: int = 0) -> torch.nn.Module:
    """The reference model: torchvision's builder right after torch.manual_seed(seed)."""
    torch.manual_seed(seed)
    return torchvision.models.get_model(arch, weights=None).eval()


@pytest.fixture
def chelsea() -> Path:
    return SAMPLES / "chelsea.jpg"


SMALL = ["--arch", "resnet18", "--resize", "64", "--crop", "64", "--device", "cpu"]
"""Options that keep a CLI test fast: the smallest arch on 64×64 inputs, on the CPU, where the
references (create_feature_extractor, the model's own forward) run: on CUDA, float32 is not CPU float32."""
SMALL_OPTIONS = {"arch": "resnet18", "resize": 64, "crop": 64, "device": "cpu"}
"""The same, as keywords of the Python API."""
VALID_STAGES = "valid stages: 0=stem, 1=layer1, 2=layer2, 3=layer3, 4=layer4 (also C2-C5, res2-res5, stage1-stage4 for layer1-layer4)"
"""How a usage error names the stages of a ResNet."""


def command(*args: object) -> list[str]:
    """The command line that runs ``backbone-inspect ARGS`` in a process of its own, with this Python."""
    return [sys.executable, "-m", "backbone_inspect", *map(str, args)]


def invoke(*args: object):
    """Run the command in-process, as a user would type it."""
    from typer.testing import CliRunner

    from backbone_inspect.cli import app

    return CliRunner().invoke(app, [str(a) for a in args])


def noise_image(path: Path, size: tuple[int, int] = (72, 72), seed: int = 0) -> Path:
    from PIL import Image

    generator = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (size[1], size[0], 3), dtype=torch.uint8, generator=generator)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.frombytes("RGB", size, pixels.numpy().tobytes()).save(path)
    return path


def manifest(folder: Path, name: str = "manifest.jsonl") -> list[dict]:
    import json

    return [json.loads(line) for line in (folder / name).read_text().splitlines()]


def features(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=True)["features"]


def imagenet_normalised(pixels: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 [N, 3, H, W] pixels as torchvision's models take them: scaled to [0, 1], then ImageNet's mean and std."""
    mean = torch.tensor([0.485, 0.456, 0.406], dtype=dtype).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225], dtype=dtype).view(1, 3, 1, 1)
    return (pixels.to(dtype) / 255 - mean) / std


def assert_close_scaled(actual: torch.Tensor, expected: torch.Tensor, rtol: float = 1e-5) -> None:
    """Equal up to float32 noise, measured against the tensor's own size.

    oneDNN picks other kernels on other CPUs, so single elements of deep features (values over
    100) differ in their last bits from machine to machine; an elementwise ``atol`` tests the
    CPU. The error relative to the norm does not depend on the scale of the values.
    """
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    error = (actual.double() - expected.double()).norm() / expected.double().norm().clamp_min(1e-12)
    assert error.item() <= rtol, f"relative error {error.item():.3g} > {rtol:g}"


@pytest.fixture
def photos(tmp_path: Path) -> Path:
    """A nested folder: one stem twice, an upper-case extension, hidden and non-image files."""
    root = tmp_path / "photos"
    noise_image(root / "a" / "cat.jpg", seed=1)
    noise_image(root / "b" / "cat.PNG", seed=2)
    noise_image(root / "b" / "deep" / "dog.webp", seed=3)
    noise_image(root / "top.png", seed=4)
    noise_image(root / ".hidden.png", seed=5)
    noise_image(root / ".cache" / "skip.png", seed=6)
    (root / "README.txt").write_text("not an image")
    return root


def many_images(root: Path, count: int, size: tuple[int, int] = (40, 40)) -> Path:
    for index in range(count):
        noise_image(root / f"img{index:03d}.png", size, seed=index)
    return root


def photo_jpeg(path: Path, size: tuple[int, int] = (500, 375), seed: int = 0, *, orientation: int | None = None,
               mode: str = "RGB", quality: int = 90) -> Path:
    """A photo-like JPEG (W×H ``size``): smooth colour gradients, a bright off-centre disc, mild noise;
    lopsided, so a wrong rotation or flip shows. ``orientation``: an EXIF orientation tag."""
    from PIL import Image

    generator = torch.Generator().manual_seed(seed)
    width, height = size
    y = torch.linspace(0, 1, height).view(height, 1)
    x = torch.linspace(0, 1, width).view(1, width)
    phase = torch.rand(3, generator=generator) * 6.28
    channels = [0.5 + 0.4 * torch.sin(3 * x + 5 * y * y + p) for p in phase]
    disc = ((x - 0.3) ** 2 + (y - 0.25) ** 2 < 0.02).float()
    rgb = torch.stack(channels, dim=-1) * (1 - disc[..., None]) + disc[..., None] * 0.95
    noise = torch.randn(height, width, 3, generator=generator) * 0.03
    pixels = ((rgb + noise).clamp(0, 1) * 255).round().to(torch.uint8)
    image = Image.frombytes("RGB", size, pixels.numpy().tobytes()).convert(mode)
    exif = Image.Exif()
    if orientation is not None:
        exif[0x0112] = orientation
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, "JPEG", quality=quality, exif=exif.tobytes())
    return path


@pytest.fixture
def mixed(tmp_path: Path) -> Path:
    """Good images in nested folders, of two sizes, beside a corrupt, an empty and a truncated one."""
    root = tmp_path / "photos"
    for index in range(7):
        noise_image(root / ("a" if index % 2 else "b") / f"img{index}.png", size=(72, 72) if index % 3 else (90, 70), seed=index)
    (root / "a" / "corrupt.jpg").write_bytes(b"not a jpeg at all")
    (root / "b" / "empty.png").write_bytes(b"")
    whole = (root / "a" / "img1.png").read_bytes()
    (root / "b" / "truncated.png").write_bytes(whole[: len(whole) // 2])
    return root
