"""``attention_impl="auto"``: which implementation each JAX platform gets.

The resolution is a pure function of the platform name, so every platform is checked
here on CPU; that the Pallas kernels it picks on GPU and TPU really work compiled is
what ``scripts/device_check.py`` (stage 2) checks on the device.
"""

from __future__ import annotations

import pytest
from fbjax_kernels.ragged_paged_attention import (
    IMPLEMENTATIONS,
    PALLAS_FOR_PLATFORM,
    resolve_attention_impl,
)


def _never() -> bool:
    raise AssertionError("cpu_ffi availability asked off CPU")


@pytest.mark.parametrize(("platform", "expected"), [
    ("gpu", "pallas_gpu"),
    ("tpu", "pallas_tpu"),
    ("METAL", "reference"),  # any other platform: the jax.numpy reference
    ("neuron", "reference"),
])
def test_auto_off_cpu(platform, expected):
    assert resolve_attention_impl(platform, "auto", cpu_ffi_available=_never) == expected


@pytest.mark.parametrize(("built", "expected"), [(True, "cpu_ffi"), (False, "xla")])
def test_auto_on_cpu_is_the_cpp_kernel_else_xla(built, expected):
    assert resolve_attention_impl("cpu", cpu_ffi_available=lambda: built) == expected


@pytest.mark.parametrize("platform", ["cpu", "gpu", "tpu"])
@pytest.mark.parametrize("name", ["reference", "xla", "pallas_gpu", "flash"])
def test_a_name_is_itself_on_every_platform(platform, name):
    # the reference stays selectable on accelerators; unknown names fail later, by name
    assert resolve_attention_impl(platform, name, cpu_ffi_available=_never) == name


def test_auto_picks_registered_implementations():
    assert set(PALLAS_FOR_PLATFORM.values()) <= set(IMPLEMENTATIONS)
