"""Which device this is, in the words profiles are keyed by (asks JAX, so engine side),
and what its memory can move at best (``hbm_peak_tbs``).

See :mod:`fbjax.profiling.store` for what the keys mean and how they are matched.
"""

from __future__ import annotations

import os
import platform
import re
from pathlib import Path
from typing import Any

# Peak HBM bandwidth in TB/s from the vendors' data sheets, by a pattern of the JAX
# ``device_kind`` (lowercased), the first match winning: the yardstick of a decode
# kernel, which reads the KV cache once. Kinds named only by the form factor
# ("NVIDIA H100 PCIe") come before the bare name ("NVIDIA H100 80GB HBM3" is SXM).
HBM_PEAK_TBS: tuple[tuple[str, float], ...] = (
    (r"\bh100\b.*\bpcie\b", 2.0),
    (r"\bh100\b.*\bnvl\b", 3.9),
    (r"\bh100\b", 3.35),  # SXM
    (r"\bh200\b", 4.8),
    (r"\ba100\b.*\b80\s?gb\b", 2.0),  # SXM4 2.04, PCIe 1.94
    (r"\ba100\b", 1.555),  # 40 GB
    (r"\bl40s\b", 0.864),
    (r"\bl4\b", 0.3),
    (r"\ba10g\b", 0.6),
    (r"\btpu v4\b", 1.2),
    (r"\btpu v5 ?(lite|e)\b", 0.819),  # v5e's device_kind is "TPU v5 lite"
    (r"\btpu v5p?\b", 2.765),
    (r"\btpu v6 ?(lite|e)\b", 1.64),
)


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


def hbm_peak_tbs(device_kind: str) -> float | None:
    """The device's peak HBM bandwidth in TB/s (``HBM_PEAK_TBS``); None when unknown
    (a CPU, a card not in the table): then no share of the peak is reported."""
    kind = device_kind.lower()
    for pattern, tbs in HBM_PEAK_TBS:
        if re.search(pattern, kind):
            return tbs
    return None
