"""Where a local model's weights are: a directory, a .gguf file, or an installed package that ships them."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

__all__ = ["resolve_source"]

_MODULE_NAME = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*")


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
