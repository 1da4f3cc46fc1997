"""Test configuration: 8 fake CPU devices, set before JAX is imported, so sharded code is tested everywhere."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["JAX_NUM_CPU_DEVICES"] = "8"
# Older jaxlib releases read the device count only from XLA_FLAGS.
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
    os.environ["XLA_FLAGS"] = (_flags + " --xla_force_host_platform_device_count=8").strip()

import jax  # noqa: E402
import pytest  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

# float64 references are computed in NumPy; JAX runs in float32 unless a test asks for x64 via the fixture below.
settings.register_profile(
    "corrjax",
    deadline=None,
    max_examples=30,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    derandomize=True,
)
settings.register_profile("ci", parent=settings.get_profile("corrjax"), max_examples=30)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "corrjax"))


@pytest.fixture
def x64():
    """Runs the test with 64-bit JAX types enabled (restored afterwards)."""
    with jax.enable_x64(True):
        yield


@pytest.fixture(scope="session")
def mesh8():
    """A 1-D mesh over the 8 fake CPU devices, axis name ``"data"``."""
    assert jax.device_count() == 8, jax.devices()
    return jax.make_mesh((8,), ("data",))
