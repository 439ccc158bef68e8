"""Loads a local model's tokenizer and weights, converting a GGUF once into a cache of safetensors."""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import math
import os
import shutil
import struct
import threading
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from backends.weights import PICKLE_SUFFIXES, check_weights, file_sha256, local_folder, resolve_source, weight_files
from config.schema import EnginesConfig, TransformersModel

__all__ = ["DTYPES", "MARGIN", "cache_entry", "estimate_bytes", "load_model", "loaded_bytes"]

# bytes per element of the dtypes a model may be loaded in
DTYPES = {"float32": 4, "bfloat16": 2, "float16": 2}
# the estimate's allowance over the weights: buffers, allocator slack, the forward pass's scratch (the KV
# cache grows with the requests and is not included)
MARGIN = 0.10
_MANIFEST = "pointsman.json"  # written last into a cache entry: an entry without it is incomplete
_STORED_BYTES = {"F64": 8, "F32": 4, "BF16": 2, "F16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
_EMBEDDING_NAMES = ("embed", "token_embd", "wte", "wpe")
log = logging.getLogger("pointsman.engine")


def load_model(cfg: TransformersModel, engines: EnginesConfig) -> tuple[Any, Any]:
    """(tokenizer, model in eval mode on cfg.device): validated, converted once if GGUF, cast and quantized."""
    # offline before transformers / huggingface_hub read their settings: weights come from disk only
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    started = time.perf_counter()
    import torch

    device = torch.device(cfg.device)
    dtype_name = _dtype_name(cfg)
    location, gguf = resolve_source(cfg.source, cfg.gguf_file)
    folder = local_folder(location)
    cache = Path(engines.cache_dir).expanduser()
    files = weight_files(folder, gguf)
    checked = check_weights(files, allow_pickle=cfg.allow_pickle, sha256=cfg.sha256, hash_index=cache / "hashes.json")
    dtype = "auto" if dtype_name == "auto" else getattr(torch, dtype_name)
    if dtype != "auto":
        _check_dtype_runs(dtype, device, dtype_name)
    _check_quantize(cfg, device, dtype_name)
    if gguf is None:
        loaded = _load_folder(folder, cfg, dtype, device)
        log.info("%s: loaded %s in %.1f s", cfg.id, folder, time.perf_counter() - started)
        return loaded
    for attempt in range(2):
        entry = cache_entry(files[0], dtype_name, engines, checked)
        try:
            loading = time.perf_counter()
            loaded = _load_folder(entry, cfg, dtype, device)
            log.info("%s: loaded %s from %s in %.1f s (%.1f s before reading the cache)", cfg.id, gguf, entry,
                     time.perf_counter() - started, loading - started)
            return loaded
        except Exception as exc:
            if attempt:  # rebuilt and still failing: not the cache's fault
                raise
            # complete on disk yet unloadable (a bit flip, a transformers upgrade): convert again
            log.warning("%s: cannot load the cached %s (%s); converting again", cfg.id, entry, exc)
            _discard(entry)
    raise AssertionError("unreachable")


def cache_entry(gguf_path: Path, dtype_name: str, engines: EnginesConfig, sha256: str | None = None) -> Path:
    """The folder of `gguf_path` converted to `dtype_name` safetensors + tokenizer files, converting it if needed.

    Two converters of the same file (threads or processes) serialize on a lock file; each writes into a folder
    of its own and renames it into place, so a reader sees a complete entry or none.
    """
    cache = Path(engines.cache_dir).expanduser()
    digest = sha256 or file_sha256(gguf_path, cache / "hashes.json")
    dtype_name = "float32" if dtype_name == "auto" else dtype_name  # GGUF de-quantizes to float32 by default
    root = cache / "converted"
    key = f"{digest}-{dtype_name}"
    entry = root / key
    if _complete(entry):
        return entry
    root.mkdir(parents=True, exist_ok=True)
    with _locked(root / f".{key}.lock"):
        if _complete(entry):  # converted by whoever held the lock before us
            return entry
        if entry.exists():
            _discard(entry)
        for stale in root.glob(f".tmp-{key}-*"):  # left by a converter that died: with the lock held, none runs
            shutil.rmtree(stale, ignore_errors=True)
        tmp = root / f".tmp-{key}-{os.getpid()}-{threading.get_ident()}"
        try:
            log.info("converting %s to %s safetensors in %s (once)", gguf_path, dtype_name, entry)
            _convert(gguf_path, dtype_name, tmp)
            sizes = {p.name: p.stat().st_size for p in sorted(tmp.iterdir())}
            manifest = {"source": str(gguf_path), "sha256": digest, "dtype": dtype_name, "files": sizes}
            (tmp / _MANIFEST).write_text(json.dumps(manifest, indent=1))
            try:
                os.rename(tmp, entry)
            except OSError:  # a converter that ignored the lock (a filesystem without flock) got there first
                if not _complete(entry):
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return entry


def estimate_bytes(cfg: TransformersModel) -> int:
    """The loaded model's footprint: the weights' element counts x the dtype's bytes, plus MARGIN.

    Reads only headers (GGUF tensor infos, safetensors headers); pickled checkpoints count their file size.
    """
    location, gguf = resolve_source(cfg.source, cfg.gguf_file)
    folder = local_folder(location)
    dtype_name = _dtype_name(cfg)
    if gguf:
        tensors = _gguf_tensors(folder / gguf)
        # a GGUF without output.weight ties the LM head to the embedding
        tied = "output.weight" not in tensors
        stored = dict.fromkeys(tensors, 4)
    else:
        tensors, stored, raw = {}, {}, 0
        for path in weight_files(folder, None):
            if path.suffix in PICKLE_SUFFIXES:
                raw += path.stat().st_size
            else:
                for name, (count, width) in _safetensors_tensors(path).items():
                    tensors[name], stored[name] = count, width
        config = _json(folder / "config.json")
        tied = bool(config.get("tie_word_embeddings", True)) and not any(n.startswith("lm_head") for n in tensors)
        if raw:
            return math.ceil(raw * (1 + MARGIN))
    total = 0
    for name, (count, dims) in tensors.items():
        width = stored[name] if dtype_name == "auto" else DTYPES[dtype_name]
        if cfg.quantize == "int8" and dims == 2 and not any(e in name for e in _EMBEDDING_NAMES):
            width = 1  # a quantized Linear keeps int8 weights (plus one scale per tensor)
        total += count * width
        if cfg.quantize == "int8" and tied and dims == 2 and any(e in name for e in _EMBEDDING_NAMES[:2]):
            total += count  # the tied LM head gets its own int8 copy; the embedding stays in the float dtype
    return math.ceil(total * (1 + MARGIN))


def loaded_bytes(model: Any) -> int:
    """What a loaded model's tensors occupy: parameters and buffers (shared ones once) and quantized weights."""
    seen: set[int] = set()
    total = 0
    tensors = [*model.parameters(), *model.buffers()]
    for module in model.modules():
        packed = getattr(module, "_packed_params", None)
        if packed is not None and callable(getattr(module, "weight", None)):
            tensors.append(module.weight())
            bias = module.bias()
            if bias is not None:
                tensors.append(bias)
    for t in tensors:
        key = t.untyped_storage().data_ptr() if not t.is_quantized else id(t)
        if key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()
    return total


# ---- loading ---------------------------------------------------------------------------------------------


def _dtype_name(cfg: TransformersModel) -> str:
    if cfg.dtype != "auto" and cfg.dtype not in DTYPES:
        raise ValueError(f"dtype {cfg.dtype!r} is not one of auto, {', '.join(DTYPES)}")
    return cfg.dtype


def _check_dtype_runs(dtype: Any, device: Any, name: str) -> None:
    """Run the ops a decoder needs in `dtype` on `device`; a build without kernels for it fails here, clearly."""
    import torch

    try:
        torch.ones(1, device=device)
    except (RuntimeError, AssertionError) as exc:  # AssertionError: torch built without CUDA
        raise ValueError(f"device {device} is not available ({exc})") from exc
    try:
        x = torch.ones(2, 8, dtype=dtype, device=device)
        y = torch.nn.functional.linear(x, torch.ones(4, 8, dtype=dtype, device=device))
        torch.nn.functional.silu(y).softmax(-1).mean().item()
        torch.nn.functional.scaled_dot_product_attention(x[None, None], x[None, None], x[None, None]).sum().item()
    except (RuntimeError, TypeError, NotImplementedError) as exc:
        raise ValueError(f"dtype {name} is not supported on {device} by this torch build ({exc}); use float32") from exc


def _check_quantize(cfg: TransformersModel, device: Any, dtype_name: str) -> None:
    # before any loading: a setting that cannot work fails at once, not after a conversion
    if cfg.quantize != "int8":
        return
    if device.type == "cpu" and dtype_name != "float32":
        raise ValueError(f"quantize: int8 on CPU quantizes float32 Linear layers; set dtype: float32, not {dtype_name}")
    if device.type == "cuda":
        import importlib.util

        if importlib.util.find_spec("bitsandbytes") is None:
            raise ValueError("quantize: int8 on CUDA needs the bitsandbytes package, which is not installed "
                             "(pip install bitsandbytes)")
    elif device.type != "cpu":
        raise ValueError(f"quantize: int8 runs on cpu (torch dynamic quantization) or cuda (bitsandbytes), "
                         f"not {device}")


def _load_folder(folder: Path, cfg: TransformersModel, dtype: Any, device: Any) -> tuple[Any, Any]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs: dict[str, Any] = {"local_files_only": True}
    if not cfg.allow_pickle:
        kwargs["use_safetensors"] = True  # never fall back to a pickled checkpoint beside the safetensors
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    if cfg.quantize == "int8" and device.type == "cuda":
        from transformers import BitsAndBytesConfig  # bitsandbytes 8-bit weights, placed on the GPU as they load

        model = AutoModelForCausalLM.from_pretrained(
            folder, dtype=dtype, quantization_config=BitsAndBytesConfig(load_in_8bit=True), device_map={"": device},
            **kwargs,
        )
        return tokenizer, model.eval()
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, **kwargs).eval()
    if cfg.quantize == "int8":
        with warnings.catch_warnings():  # torch.ao.quantization announces its move to torchao; it still works here
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.filterwarnings("ignore", message=".*quantize_per_tensor", category=UserWarning)
            torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8, inplace=True)
    return tokenizer, model.to(device)


# ---- the conversion cache --------------------------------------------------------------------------------


def _convert(gguf_path: Path, dtype_name: str, out: Path) -> None:
    """De-quantize the GGUF into `out`: safetensors, config.json, generation_config.json, tokenizer files."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = gguf_path.parent, gguf_path.name
    out.mkdir(parents=True)
    AutoTokenizer.from_pretrained(folder, gguf_file=name, local_files_only=True).save_pretrained(out)
    kwargs: dict[str, Any] = {"gguf_file": name, "local_files_only": True, "dtype": getattr(torch, dtype_name)}
    try:  # newer transformers can keep GGUF blocks packed; the cache wants plain tensors
        from transformers import GgufConfig

        kwargs["quantization_config"] = GgufConfig(dequantize=True)
    except ImportError:  # older ones always de-quantize
        pass
    model = AutoModelForCausalLM.from_pretrained(folder, **kwargs)
    # the weights are plain tensors now; only the GGUF loader's marker stops save_pretrained
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out)
    del model


def _complete(entry: Path) -> bool:
    """A finished entry: its manifest is there and every file it lists has the size it was written with."""
    manifest = _json(entry / _MANIFEST)
    files = manifest.get("files")
    if not isinstance(files, dict) or "config.json" not in files:
        return False
    if not any(n.endswith(".safetensors") for n in files) or not any(n.startswith("tokenizer") for n in files):
        return False
    try:
        return all((entry / name).stat().st_size == size for name, size in files.items())
    except OSError:
        return False


def _discard(entry: Path) -> None:
    # rename first: whoever looks next finds no entry, never a half-deleted one
    trash = entry.with_name(f".trash-{entry.name}-{os.getpid()}-{threading.get_ident()}")
    try:
        os.rename(entry, trash)
    except FileNotFoundError:
        return
    shutil.rmtree(trash, ignore_errors=True)


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    # flock locks belong to the open file description: another process, or another thread opening the file
    # itself, waits here; the kernel drops the lock if its holder dies
    with path.open("a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


# ---- headers -------------------------------------------------------------------------------------------


def _safetensors_tensors(path: Path) -> dict[str, tuple[tuple[int, int], int]]:
    """{name: ((elements, dims), stored bytes per element)} from the file's JSON header."""
    with path.open("rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(size))
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        shape = info["shape"]
        out[name] = ((math.prod(shape), len(shape)), _STORED_BYTES.get(info["dtype"], 4))
    return out


# GGUF metadata value types -> struct format (8: string, 9: array are read by hand)
_GGUF_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}


def _gguf_tensors(path: Path) -> dict[str, tuple[int, int]]:
    """{tensor name: (elements, dims)} from a GGUF file's header, skipping the metadata without decoding it."""
    import mmap

    with path.open("rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        if buf[:4] != b"GGUF":
            raise ValueError(f"{path} is not a GGUF file")
        (version,) = struct.unpack_from("<I", buf, 4)
        count_fmt = "<I" if version == 1 else "<Q"
        width = struct.calcsize(count_fmt)
        (n_tensors,) = struct.unpack_from(count_fmt, buf, 8)
        (n_kv,) = struct.unpack_from(count_fmt, buf, 8 + width)
        pos = 8 + 2 * width

        def skip_string(pos: int) -> int:
            (n,) = struct.unpack_from(count_fmt, buf, pos)
            return pos + width + n

        def skip_value(kind: int, pos: int) -> int:
            if kind == 8:
                return skip_string(pos)
            if kind == 9:
                item, n = struct.unpack_from("<I" + count_fmt[1], buf, pos)
                pos += 4 + width
                if item in _GGUF_SCALARS:
                    return pos + n * struct.calcsize(_GGUF_SCALARS[item])
                for _ in range(n):
                    pos = skip_value(item, pos)
                return pos
            return pos + struct.calcsize(_GGUF_SCALARS[kind])

        for _ in range(n_kv):
            pos = skip_string(pos)
            (kind,) = struct.unpack_from("<I", buf, pos)
            pos = skip_value(kind, pos + 4)
        tensors = {}
        for _ in range(n_tensors):
            (n,) = struct.unpack_from(count_fmt, buf, pos)
            name = bytes(buf[pos + width:pos + width + n]).decode()
            pos += width + n
            (dims,) = struct.unpack_from("<I", buf, pos)
            shape = struct.unpack_from(f"<{dims}{count_fmt[1]}", buf, pos + 4)
            pos += 4 + dims * width + 4 + 8  # dims, the shape, the type, the offset
            tensors[name] = (math.prod(shape), dims)
        return tensors
