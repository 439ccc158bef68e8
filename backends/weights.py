"""Where a local model's weights are (a directory, a .gguf file, an installed package) and whether to trust them."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import tempfile
from pathlib import Path

__all__ = ["PICKLE_SUFFIXES", "check_weights", "file_sha256", "local_folder", "resolve_source", "weight_files"]

_MODULE_NAME = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*")
# formats that unpickle when loaded, so a crafted file runs code; safetensors and GGUF hold only tensors
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")
_SAFE_SUFFIXES = (".safetensors", ".gguf")


def resolve_source(source: str, gguf_file: str | None = None) -> tuple[str, str | None]:
    """(folder or hub id, gguf file name or None) for `from_pretrained`; see TransformersModel.source."""
    path = Path(source).expanduser()
    if path.is_file():
        if path.suffix != ".gguf":
            raise ValueError(f"model source {source!r} is a file but not a .gguf file")
        return str(path.parent), path.name
    if path.is_dir():
        return _from_folder(path, gguf_file)
    if _MODULE_NAME.fullmatch(source):
        folder = _package_folder(source)
        if folder is not None:
            return _from_folder(folder, gguf_file)
    # otherwise a hub id, which only the local Hugging Face cache can satisfy (we never download)
    return source, gguf_file


def _package_folder(name: str) -> Path | None:
    # find_spec locates the package without running its __init__ (a weights package may import heavy things)
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None
    if spec is None:
        return None
    if spec.origin and spec.has_location:
        return Path(spec.origin).parent
    locations = list(spec.submodule_search_locations or [])
    return Path(locations[0]) if locations else None


def _from_folder(folder: Path, gguf_file: str | None) -> tuple[str, str | None]:
    if gguf_file:
        if not (folder / gguf_file).is_file():
            raise FileNotFoundError(f"gguf_file {gguf_file!r} not found in {folder}")
        return str(folder), gguf_file
    if (folder / "config.json").is_file():
        return str(folder), None
    ggufs = sorted(p.name for p in folder.glob("*.gguf"))
    if len(ggufs) == 1:
        return str(folder), ggufs[0]
    if ggufs:
        raise ValueError(f"{folder} holds several .gguf files ({', '.join(ggufs)}); set gguf_file")
    raise FileNotFoundError(f"{folder} holds neither a Hugging Face model (config.json) nor a .gguf file")


def local_folder(location: str) -> Path:
    """The folder that holds `location`'s files: itself, or a hub id's snapshot in the local Hugging Face cache."""
    path = Path(location)
    if path.is_dir():
        return path
    from huggingface_hub import snapshot_download  # only for hub ids; never downloads (local_files_only)

    try:
        return Path(snapshot_download(location, local_files_only=True))
    except Exception as exc:
        raise FileNotFoundError(
            f"model source {location!r} is neither a folder, a .gguf file, an installed package nor a model in "
            f"the local Hugging Face cache (nothing is downloaded at run time)"
        ) from exc


def weight_files(folder: Path, gguf_file: str | None) -> list[Path]:
    """The files `from_pretrained` would read the weights from: the .gguf, else the folder's checkpoint files."""
    if gguf_file:
        return [folder / gguf_file]
    found = sorted(p for p in folder.iterdir() if p.suffix in _SAFE_SUFFIXES + PICKLE_SUFFIXES and p.is_file())
    safe = [p for p in found if p.suffix == ".safetensors"]
    # transformers prefers safetensors when both are present (and is told to insist on them, see check_weights)
    return safe or [p for p in found if p.suffix in PICKLE_SUFFIXES]


def check_weights(
    files: list[Path], *, allow_pickle: bool, sha256: str | None, hash_index: Path | None = None
) -> str | None:
    """Refuse pickled weights unless allowed, and check `sha256` if given (returning it, else None).

    Raises ValueError naming the file and the option that decides.
    """
    if not files:
        raise FileNotFoundError("no weight files (.safetensors, .gguf) found")
    pickled = [p for p in files if p.suffix in PICKLE_SUFFIXES]
    if pickled and not allow_pickle:
        raise ValueError(
            f"weight file {pickled[0]} is pickled ({pickled[0].suffix}), and loading a pickle can run code; "
            f"convert it to safetensors, or set allow_pickle: true on the model if you trust its origin"
        )
    if sha256 is None:
        return None
    if len(files) != 1:
        raise ValueError(
            f"sha256 is set, but the weights are {len(files)} files ({', '.join(p.name for p in files)}); "
            f"it applies to a single weight file"
        )
    # an explicit check hashes the bytes now, never trusting the index (a file can change under the same mtime)
    digest = file_sha256(files[0], hash_index, trust_index=False)
    if digest != sha256.lower():
        raise ValueError(f"weight file {files[0]} has sha256 {digest}, but the model's sha256 option expects {sha256}")
    return digest


def file_sha256(path: Path, index: Path | None = None, *, trust_index: bool = True) -> str:
    """The file's sha256, remembered in the JSON `index` by (path, size, mtime) so a restart need not re-read it."""
    path = path.resolve()
    stat = path.stat()
    key, stamp = str(path), [stat.st_size, stat.st_mtime_ns, stat.st_ino]
    known = _read_index(index) if index is not None else {}
    entry = known.get(key)
    if trust_index and isinstance(entry, dict) and entry.get("stamp") == stamp and isinstance(entry.get("sha256"), str):
        return entry["sha256"]
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    hexdigest = digest.hexdigest()
    if index is not None:
        # re-read just before writing: another process may have added its own files meanwhile
        known = _read_index(index)
        known[key] = {"stamp": stamp, "sha256": hexdigest}
        _write_json(index, known)
    return hexdigest


def _read_index(index: Path) -> dict:
    try:
        data = json.loads(index.read_text())
    except (OSError, ValueError):  # absent, or half-written by a crashed older version: start again
        return {}
    return data if isinstance(data, dict) else {}


def _write_json(path: Path, data: dict) -> None:
    # write beside, then rename over: readers see the old index or the new one, never a partial one
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
