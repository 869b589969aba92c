"""Which device this is, in the words profiles are keyed by (asks JAX, so engine side).

See :mod:`fbjax.profiling.store` for what the keys mean and how they are matched.
"""

from __future__ import annotations

import os
import platform
import re
from pathlib import Path
from typing import Any


def device_key_of(platform_name: str, device_kind: str) -> str:
    """The stable device key of a JAX device's platform and ``device_kind``."""
    platform_name = platform_name.lower()
    if platform_name == "cpu":
        return "cpu"
    slug = re.sub(r"[^a-z0-9]+", "-", device_kind.lower()).strip("-")
    if platform_name == "tpu" or slug.startswith("tpu"):
        return slug if slug.startswith("tpu") else f"tpu-{slug}"
    slug = re.sub(r"^(nvidia|amd|tesla)-", "", slug)
    slug = re.sub(r"^(nvidia|amd|tesla)-", "", slug)
    return slug.split("-")[0] or platform_name


def current_device_key() -> str:
    import jax

    device = jax.devices()[0]
    return device_key_of(device.platform, device.device_kind)


def device_detail() -> dict[str, Any]:
    """What the metadata records about the machine (informational, not matched)."""
    import jax

    device = jax.devices()[0]
    detail: dict[str, Any] = {"platform": device.platform, "device_kind": device.device_kind,
                              "num_devices": jax.device_count()}
    if device.platform == "cpu":
        detail["cpu"] = _cpu_model_name()
        detail["cores"] = os.cpu_count()
        detail["machine"] = platform.machine()
    return detail


def _cpu_model_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"
