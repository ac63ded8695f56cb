"""L2: GGUF files (llama.cpp, Ollama) in and out, with the maintained `gguf` package (imported lazily:
`pip install lmforge[gguf]`).

    save_gguf(model, "out.gguf", tokenizer, gguf_type="q8_0")   # f32 | f16 | bf16 | q8_0 | q4_0
    config, state, tokenizer = read_model("in.gguf")            # dequantized to float32
    lmforge.checkpoint.load_model("in.gguf")                    # the same, built into a Transformer

Quantized types use gguf-py's reference quantizers (`gguf.quants`, bit-exact with ggml's
`quantize_row_*_ref`); as convert_hf_to_gguf.py, 1-D tensors (norms, biases), routers and
position tables stay F32, and a matrix whose rows are not a whole number of 32-value blocks falls
back to F16. The model config also travels as `lmforge.config` (JSON) so fields GGUF has no key
for (rope scaling parameters, initializer range) survive a round trip; a GGUF from elsewhere is
read from the standard keys alone.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from lmforge.common import LmforgeError, atomic_path
from lmforge.gguf_io.vocab import tokenizer_from_metadata, tokenizer_metadata
from lmforge.gguf_io.weights import KEEP_F32, check_exportable, config_from_metadata, from_gguf, metadata, to_gguf
from lmforge.model import ModelConfig, Transformer, transforms

GGUF_TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0")
_CONFIG_KEY = "lmforge.config"
# Fields GGUF has no standard key for, restored from lmforge.config when the file carries it.
_CARRIED = ("arch", "rope_scaling", "initializer_range", "sliding_window", "norm_topk_prob", "extra", "activation")


def _gguf():
    try:
        import gguf
    except ImportError:
        raise LmforgeError("GGUF needs the `gguf` package: pip install 'lmforge[gguf]' (or pip install gguf)") from None
    return gguf


def _file_type(gguf, gguf_type: str):
    if gguf_type not in GGUF_TYPES:
        raise LmforgeError(f"--gguf-type {gguf_type!r}: choose from {', '.join(GGUF_TYPES)}")
    ft, qt = gguf.LlamaFileType, gguf.GGMLQuantizationType
    return {
        "f32": (ft.ALL_F32, qt.F32),
        "f16": (ft.MOSTLY_F16, qt.F16),
        "bf16": (ft.MOSTLY_BF16, qt.BF16),
        "q8_0": (ft.MOSTLY_Q8_0, qt.Q8_0),
        "q4_0": (ft.MOSTLY_Q4_0, qt.Q4_0),
    }[gguf_type]


def tensor_type(gguf, name: str, t: torch.Tensor, wanted):
    """The GGML type `name` is stored in for a file of type `wanted` (convert_hf_to_gguf.py's rules)."""
    qt = gguf.GGMLQuantizationType
    if t.dim() < 2 or KEEP_F32.search(name) or wanted == qt.F32:
        return qt.F32
    block = gguf.GGML_QUANT_SIZES[wanted][0]
    return wanted if t.shape[-1] % block == 0 else qt.F16


def encode_tensor(gguf, t: torch.Tensor, qtype) -> np.ndarray:
    """Float tensor -> the array the writer stores (quantized bytes for Q8_0/Q4_0/BF16)."""
    data = t.detach().float().cpu().numpy()
    if qtype == gguf.GGMLQuantizationType.F32:
        return data
    if qtype == gguf.GGMLQuantizationType.F16:
        return data.astype(np.float16)
    return gguf.quants.quantize(data, qtype)


def save_gguf(model: Transformer, path: str | Path, tokenizer=None, gguf_type: str = "f32") -> Path:
    """Write `model` (and its tokenizer and chat template) as one GGUF file, atomically."""
    gguf = _gguf()
    file_type, wanted = _file_type(gguf, gguf_type)
    if transforms(model):
        kinds = ", ".join(e.get("kind", "?") for e in transforms(model))
        raise LmforgeError(
            f"cannot export a transformed model ({kinds}) to GGUF: merge adapters / export the float model "
            "(--gguf-type q8_0/q4_0 quantizes it in llama.cpp's own formats)"
        )
    c = model.config
    arch = check_exportable(c)
    tensors = to_gguf(model.state_dict(), c, arch)
    path = Path(path)
    with atomic_path(path) as tmp:
        writer = gguf.GGUFWriter(str(tmp), arch)
        writer.add_name(path.stem)
        writer.add_file_type(int(file_type))
        writer.add_vocab_size(c.vocab_size)
        for key, value in metadata(c, arch).items():
            _add(writer, f"{arch}.{key}", value)
        if tokenizer is not None:
            for key, value in tokenizer_metadata(tokenizer, c.vocab_size).items():
                _add(writer, key, value)
        else:
            writer.add_tokenizer_model("none")
        writer.add_string(_CONFIG_KEY, json.dumps(c.to_dict()))
        for name, t in tensors.items():
            qtype = tensor_type(gguf, name, t, wanted)
            data = encode_tensor(gguf, t, qtype)
            raw = None if qtype in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16) else qtype
            writer.add_tensor(name, data, raw_dtype=raw)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return path


def _add(writer, key: str, value) -> None:
    gguf = _gguf()
    vt = gguf.GGUFValueType
    if isinstance(value, bool):
        writer.add_bool(key, value)
    elif isinstance(value, int):
        writer.add_uint32(key, value)
    elif isinstance(value, float):
        writer.add_float32(key, value)
    elif isinstance(value, str):
        writer.add_key_value(key, value, vt.STRING)  # add_string drops empty strings
    elif isinstance(value, list):
        if value and isinstance(value[0], int):
            writer.add_key_value(key, value, vt.ARRAY, sub_type=vt.INT32)
        elif value and isinstance(value[0], float):  # SentencePiece token scores
            writer.add_key_value(key, value, vt.ARRAY, sub_type=vt.FLOAT32)
        else:
            writer.add_key_value(key, value, vt.ARRAY, sub_type=vt.STRING)
    else:
        raise TypeError(f"GGUF metadata {key}: unsupported value {value!r}")


def read_gguf(path: str | Path, tensors: bool = True) -> tuple[dict, dict[str, torch.Tensor], dict]:
    """(metadata, float32 tensors in PyTorch's [out, in] layout, GGML type name per tensor);
    `tensors=False` reads the metadata only."""
    gguf = _gguf()
    path = Path(path)
    if not path.is_file():
        raise LmforgeError(f"GGUF file not found: {path}")
    try:
        reader = gguf.GGUFReader(str(path))
    except (ValueError, OSError, KeyError) as e:
        raise LmforgeError(f"{path}: not a readable GGUF file ({e})") from None
    meta = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    out, types = {}, {}
    for t in reader.tensors if tensors else []:
        try:
            data = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type)
        except NotImplementedError:
            raise LmforgeError(f"{path}: tensor {t.name} has type {t.tensor_type.name}, which cannot be read") from None
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))
        out[t.name] = torch.from_numpy(
            np.array(data, dtype=np.float32).reshape(shape)
        )  # a copy: the reader memory-maps
        types[t.name] = t.tensor_type.name
    return meta, out, types


def read_model(path: str | Path) -> tuple[ModelConfig, dict[str, torch.Tensor], object | None]:
    """A GGUF file -> (ModelConfig, float32 lmforge state dict, Tokenizer or None); the model itself
    is built by `lmforge.checkpoint.load_model`, which accepts a .gguf path."""
    meta, tensors, _ = read_gguf(path)
    source = str(path)
    arch = meta.get("general.architecture")
    prefix = f"{arch}."
    model_meta = {k[len(prefix) :]: v for k, v in meta.items() if k.startswith(prefix)}
    embd = tensors.get("token_embd.weight")
    if embd is None:
        raise LmforgeError(f"{source}: no token_embd.weight tensor")
    fields = config_from_metadata(arch, model_meta, int(embd.shape[0]), set(tensors), source)
    if _CONFIG_KEY in meta:
        try:
            saved = json.loads(meta[_CONFIG_KEY])
        except ValueError:
            raise LmforgeError(f"{source}: metadata {_CONFIG_KEY} is not valid JSON") from None
        fields.update({k: saved[k] for k in _CARRIED if k in saved})
    if "rope_freqs.weight" in tensors and not (fields.get("rope_scaling") or {}).get("rope_type") == "llama3":
        raise LmforgeError(f"{source}: a rope_freqs tensor without Llama 3 rope scaling parameters is not supported")
    config = ModelConfig.from_dict(fields, where=f"{source} model config")
    return config, from_gguf(tensors, config, arch), tokenizer_from_metadata(meta, source)


def is_gguf(path: str | Path) -> bool:
    path = Path(path)
    if not path.is_file():
        return False
    with open(path, "rb") as f:
        return f.read(4) == b"GGUF"


__all__ = ["GGUF_TYPES", "is_gguf", "read_gguf", "read_model", "save_gguf"]
