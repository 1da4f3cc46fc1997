import corrjax


def test_subpackages_import_lazily():
    assert corrjax.__version__
    for name in ("stats", "optim", "mtl", "models", "data", "train"):
        assert getattr(corrjax, name).__name__ == f"corrjax.{name}"


def test_fake_devices():
    import jax

    assert jax.device_count() == 8
