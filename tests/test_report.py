"""Atomic writers keep a replaced file's mode and give a new file the default mode (mkstemp's 0600 never leaks)."""

import os
import stat

import pytest

from amendlm.report import atomic_save_figure, atomic_write_json, atomic_write_text


def _mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture
def umask_027():
    old = os.umask(0o027)
    yield 0o027
    os.umask(old)


@pytest.mark.parametrize("writer", [lambda p: atomic_write_text(p, "new\n"), lambda p: atomic_write_json(p, {"a": 1})])
def test_rewrite_keeps_existing_mode(tmp_path, writer):
    target = tmp_path / "out.txt"
    target.write_text("old\n")
    os.chmod(target, 0o644)
    writer(target)
    assert _mode(target) == 0o644
    os.chmod(target, 0o600)
    writer(target)
    assert _mode(target) == 0o600


def test_new_file_gets_default_mode_under_umask(tmp_path, umask_027):
    target = tmp_path / "sub" / "new.md"
    atomic_write_text(target, "hello\n")
    assert target.read_text() == "hello\n"
    assert _mode(target) == 0o666 & ~umask_027 == 0o640
    assert os.umask(umask_027) == umask_027  # the umask is left as it was


def test_figure_gets_mode_of_replaced_file(tmp_path):
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    target = tmp_path / "plot.png"
    target.write_bytes(b"")
    os.chmod(target, 0o644)
    atomic_save_figure(plt.figure(figsize=(1, 1)), target, dpi=10)
    assert _mode(target) == 0o644 and target.stat().st_size > 0
