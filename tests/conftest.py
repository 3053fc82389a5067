from __future__ import annotations

import ipaddress
import socket
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


def seeded_resnet(arch: str, seed: int = 0) -> torch.nn.Module:
    """The reference model: torchvision's builder right after torch.manual_seed(seed)."""
    torch.manual_seed(seed)
    return torchvision.models.get_model(arch, weights=None).eval()


@pytest.fixture
def chelsea() -> Path:
    return SAMPLES / "chelsea.jpg"
