"""backends/model_loader.py and backends/weights.py on a tiny GGUF written here (llama, Q8_0 and F32 tensors)."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import pytest

from backends.model_loader import cache_entry, estimate_bytes, load_model, loaded_bytes
from backends.weights import check_weights, file_sha256, weight_files
from config.schema import EnginesConfig, TransformersModel

TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CHAT = [{"role": "user", "content": "the cat in the hat"}]


def write_tiny_gguf(path: Path, seed: int = 0) -> None:
    """A 2-layer llama with a byte-level BPE vocabulary, its LM head tied to the embedding (no output.weight)."""
    import gguf
    import numpy as np
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    rng = np.random.default_rng(seed)
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    merges = ["Ġ t", "h e", "Ġt he", "a n", "i n"]
    tokens = specials + list(bytes_to_unicode().values()) + [m.replace(" ", "") for m in merges]
    hidden, ffn = 32, 64
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(2)
    w.add_context_length(256)
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(ffn)
    w.add_head_count(4)
    w.add_head_count_kv(2)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(len(tokens))
    w.add_rope_dimension_count(hidden // 4)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(tokens)
    w.add_token_types([3] * len(specials) + [1] * (len(tokens) - len(specials)))
    w.add_token_merges(merges)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_pad_token_id(2)
    w.add_add_bos_token(False)
    w.add_chat_template(TEMPLATE)

    def add(name: str, *shape: int) -> None:
        if len(shape) == 1:
            w.add_tensor(name, (1.0 + 0.1 * rng.standard_normal(shape)).astype(np.float32))
            return
        data = (0.2 * rng.standard_normal(shape)).astype(np.float32)
        if name == "token_embd.weight":
            w.add_tensor(name, data)
            return
        q = gguf.quants.quantize(data, gguf.GGMLQuantizationType.Q8_0)  # de-quantized on conversion
        w.add_tensor(name, q, raw_shape=q.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0)

    add("token_embd.weight", len(tokens), hidden)
    for i in range(2):
        for part, shape in (("attn_norm", (hidden,)), ("ffn_norm", (hidden,)), ("attn_q", (hidden, hidden)),
                            ("attn_k", (hidden // 2, hidden)), ("attn_v", (hidden // 2, hidden)),
                            ("attn_output", (hidden, hidden)), ("ffn_gate", (ffn, hidden)),
                            ("ffn_up", (ffn, hidden)), ("ffn_down", (hidden, ffn))):
            add(f"blk.{i}.{part}.weight", *shape)
    add("output_norm.weight", hidden)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.fixture(scope="module")
def gguf_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tiny") / "tiny.gguf"
    write_tiny_gguf(path)
    return path


@pytest.fixture(scope="module")
def reference(gguf_path: Path) -> tuple[Any, Any]:
    """The GGUF loaded the way the engine used to: straight through transformers, no cache."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = gguf_path.parent, gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name, local_files_only=True)
    return tokenizer, AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, local_files_only=True).eval()


def model_cfg(source: Path, **fields: Any) -> TransformersModel:
    return TransformersModel(id="tiny", source=str(source), **fields)


def greedy(tokenizer: Any, model: Any, new: int = 12) -> list[int]:
    import torch

    ids = tokenizer.apply_chat_template(CHAT, add_generation_prompt=True, return_tensors="pt")
    ids = ids if isinstance(ids, torch.Tensor) else ids["input_ids"]
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=new, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    return out[0].tolist()


def entries(cache: Path) -> list[str]:
    return sorted(p.name for p in (cache / "converted").iterdir() if p.is_dir())


# ---- the conversion cache ------------------------------------------------------------------------------


def test_conversion_then_cache_gives_the_gguf_greedy_output(gguf_path: Path, reference: Any, tmp_path: Path) -> None:
    engines = EnginesConfig(cache_dir=str(tmp_path))
    expected = greedy(*reference)
    first = load_model(model_cfg(gguf_path), engines)  # converts
    [name] = entries(tmp_path)
    entry = tmp_path / "converted" / name
    assert name == f"{file_sha256(gguf_path)}-float32"
    assert {"model.safetensors", "config.json", "generation_config.json", "tokenizer.json"} <= {
        p.name for p in entry.iterdir()
    }
    inode = (entry / "model.safetensors").stat().st_ino
    second = load_model(model_cfg(gguf_path), engines)  # from the cache
    assert (entry / "model.safetensors").stat().st_ino == inode  # not converted again
    assert greedy(*first) == greedy(*second) == expected
    text = "the cat in the hat"
    assert second[0](text)["input_ids"] == reference[0](text)["input_ids"]
    assert second[0].eos_token_id == reference[0].eos_token_id == 2


def test_concurrent_conversions_leave_one_complete_entry(gguf_path: Path, tmp_path: Path) -> None:
    engines = EnginesConfig(cache_dir=str(tmp_path))
    barrier = threading.Barrier(3)
    found: list[Path | BaseException] = []

    def convert() -> None:
        barrier.wait()
        try:
            found.append(cache_entry(gguf_path, "float32", engines))
        except BaseException as exc:
            found.append(exc)

    threads = [threading.Thread(target=convert) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(found)) == 1 and isinstance(found[0], Path), found
    # one entry, nothing half-written or thrown away left beside it
    assert [p.name for p in (tmp_path / "converted").iterdir() if not p.name.endswith(".lock")] == [found[0].name]
    manifest = json.loads((found[0] / "pointsman.json").read_text())
    assert all((found[0] / n).stat().st_size == size for n, size in manifest["files"].items())


def test_a_corrupt_or_partial_entry_is_rebuilt(gguf_path: Path, reference: Any, tmp_path: Path) -> None:
    engines = EnginesConfig(cache_dir=str(tmp_path))
    entry = cache_entry(gguf_path, "float32", engines)
    weights = entry / "model.safetensors"
    with weights.open("r+b") as f:
        f.truncate(weights.stat().st_size // 2)  # a crash mid-write, or a disk that filled up
    stale = entry.parent / f".tmp-{entry.name}-999999-1"  # left by a converter that died
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"partial")
    tokenizer, model = load_model(model_cfg(gguf_path), engines)
    assert greedy(tokenizer, model) == greedy(*reference)
    assert not stale.exists()
    assert entries(tmp_path) == [entry.name]
    # an entry whose manifest is missing (renamed in by hand, or an older layout) is not trusted either
    (entry / "pointsman.json").unlink()
    assert cache_entry(gguf_path, "float32", engines) == entry
    assert (entry / "pointsman.json").is_file()


def test_a_safetensors_folder_loads_without_the_cache(gguf_path: Path, reference: Any, tmp_path: Path) -> None:
    entry = cache_entry(gguf_path, "float32", EnginesConfig(cache_dir=str(tmp_path / "a")))
    unused = tmp_path / "b"
    assert greedy(*load_model(model_cfg(entry), EnginesConfig(cache_dir=str(unused)))) == greedy(*reference)
    assert not (unused / "converted").exists()


# ---- validation ----------------------------------------------------------------------------------------


def test_pickled_weights_are_refused_unless_allowed(gguf_path: Path, tmp_path: Path) -> None:
    folder = tmp_path / "pickled"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "pytorch_model.bin").write_bytes(b"not loaded")
    engines = EnginesConfig(cache_dir=str(tmp_path / "cache"))
    with pytest.raises(ValueError, match=r"pytorch_model\.bin.*allow_pickle: true"):
        load_model(model_cfg(folder), engines)
    assert check_weights(weight_files(folder, None), allow_pickle=True, sha256=None) is None
    # safetensors beside the pickle: the safetensors are what loads, so nothing is refused
    (folder / "model.safetensors").write_bytes(b"")
    assert [p.name for p in weight_files(folder, None)] == ["model.safetensors"]


def test_sha256_mismatch_is_refused(gguf_path: Path, tmp_path: Path) -> None:
    engines = EnginesConfig(cache_dir=str(tmp_path))
    with pytest.raises(ValueError, match=r"tiny\.gguf has sha256 [0-9a-f]{64}, but the model's sha256 option"):
        load_model(model_cfg(gguf_path, sha256="0" * 64), engines)
    assert not (tmp_path / "converted").exists()  # refused before any conversion
    digest = file_sha256(gguf_path)
    assert check_weights([gguf_path], allow_pickle=False, sha256=digest.upper()) == digest
    with pytest.raises(ValueError, match="single weight file"):
        check_weights([gguf_path, gguf_path], allow_pickle=False, sha256=digest)


def test_the_hash_index_spares_rehashing_until_the_file_changes(tmp_path: Path) -> None:
    weights, index = tmp_path / "w.gguf", tmp_path / "hashes.json"
    weights.write_bytes(b"one")
    real = file_sha256(weights, index)
    known = json.loads(index.read_text())
    [entry] = known.values()
    entry["sha256"] = "remembered"
    index.write_text(json.dumps(known))
    assert file_sha256(weights, index) == "remembered"  # read from the index, not from the file
    assert file_sha256(weights, index, trust_index=False) == real
    weights.write_bytes(b"two, longer")  # size and mtime change: hashed again
    assert file_sha256(weights, index) == file_sha256(weights) != real


# ---- dtype, quantization, footprint ----------------------------------------------------------------------


def test_dtype_and_quantize_options(gguf_path: Path, tmp_path: Path) -> None:
    import torch

    engines = EnginesConfig(cache_dir=str(tmp_path))
    tokenizer, model = load_model(model_cfg(gguf_path, dtype="bfloat16"), engines)
    assert model.dtype == torch.bfloat16
    assert len(greedy(tokenizer, model, 4)) > 4
    assert [n.rsplit("-", 1)[1] for n in entries(tmp_path)] == ["bfloat16"]
    tokenizer, model = load_model(model_cfg(gguf_path, quantize="int8"), engines)
    assert type(model.model.layers[0].mlp.up_proj).__module__.startswith("torch.ao.nn.quantized.dynamic")
    assert model.model.layers[0].mlp.up_proj.weight().dtype == torch.qint8
    assert len(greedy(tokenizer, model, 4)) > 4
    with pytest.raises(ValueError, match="set dtype: float32"):
        load_model(model_cfg(gguf_path, dtype="bfloat16", quantize="int8"), engines)
    with pytest.raises(ValueError, match="dtype 'int4' is not one of"):
        load_model(model_cfg(gguf_path, dtype="int4"), engines)


@pytest.mark.parametrize(("dtype", "quantize"), [("float32", None), ("bfloat16", None), ("float32", "int8")])
def test_estimate_bytes_is_within_the_margin_of_the_loaded_size(
    gguf_path: Path, tmp_path: Path, dtype: str, quantize: str | None
) -> None:
    cfg = model_cfg(gguf_path, dtype=dtype, quantize=quantize)
    _, model = load_model(cfg, EnginesConfig(cache_dir=str(tmp_path)))
    real = loaded_bytes(model)
    # the estimate adds MARGIN (10%) over the weights; it must not fall short, nor overshoot by more than 20%
    assert real <= estimate_bytes(cfg) <= 1.2 * real
    [name] = entries(tmp_path)
    entry = tmp_path / "converted" / name
    assert real <= estimate_bytes(model_cfg(entry, dtype=dtype, quantize=quantize)) <= 1.2 * real


def test_devices_and_quantizers_that_cannot_work_are_refused_before_loading(gguf_path: Path, tmp_path: Path) -> None:
    import importlib.util

    import torch

    from backends.model_loader import _check_quantize

    engines = EnginesConfig(cache_dir=str(tmp_path))
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="device cuda is not available"):
            load_model(model_cfg(gguf_path, device="cuda"), engines)
        assert not (tmp_path / "converted").exists()
    if importlib.util.find_spec("bitsandbytes") is None:
        with pytest.raises(ValueError, match="needs the bitsandbytes package"):
            _check_quantize(model_cfg(gguf_path, quantize="int8"), torch.device("cuda"), "float16")
    with pytest.raises(ValueError, match="runs on cpu .* or cuda"):
        _check_quantize(model_cfg(gguf_path, quantize="int8"), torch.device("meta"), "float32")
