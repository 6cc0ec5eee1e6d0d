"""What a predictions file was made from, so a resumed run never reuses another run's predictions.

Every `predictions/<task>_<length>.jsonl` has a `<task>_<length>.run.json` beside it holding the
identity of the run that wrote it: the model (a fingerprint of its files, or of its parameters for an
in-memory model), the tokenizer, the mode and every setting that changes a prompt or a score. A
resumed run reuses the file only when all of it matches; each record also holds a hash of the exact
prompt token ids, checked again per sample.
"""
import hashlib
import json
import os

# files that define a model's outputs (weights, architecture, generation defaults such as eos ids)
_MODEL_FILES = ("config.json", "generation_config.json")
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".index.json")

# identity fields that belong to the whole run (model, tokenizer, decoding numerics): predictions
# files whose run fields differ are never reported together with this run's
RUN_FIELDS = ("model", "model_fingerprint", "tokenizer_fingerprint", "mode", "backend", "dtype", "attn_implementation")


def _file_digest(path: str) -> str:
    """sha256 of the whole file. Sampling parts of it would miss an edit of one tensor (a merged or
    patched layer, new token embeddings); reading it all costs about as long as loading it once."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def model_dir_fingerprint(path: str) -> str:
    """Fingerprint of a model folder's config, generation config and weight files (names and content)."""
    digest = hashlib.sha256()
    names = sorted(n for n in os.listdir(path) if n in _MODEL_FILES or n.endswith(_WEIGHT_SUFFIXES))
    for name in names:
        full = os.path.join(path, name)
        if os.path.isfile(full):
            digest.update(name.encode() + b"\0" + _file_digest(full).encode())
    return digest.hexdigest()[:16]


def model_object_fingerprint(model) -> str:
    """Fingerprint of an in-memory model: its config, a strided sample and the sum of every parameter, so the
    same architecture after more training steps is another model."""
    import torch
    digest = hashlib.sha256(model.config.to_json_string(use_diff=False).encode())
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            flat = tensor.detach().reshape(-1)
            sample = flat[:: max(1, flat.numel() // 64)][:64].to("cpu", torch.float32)
            # and a sum over every element: an edit the strided sample misses still changes it (float32
            # accumulation reads bf16 weights in the kernel, without a float64 copy of the tensor)
            total = tensor.detach().sum(dtype=torch.float32).reshape(1).to("cpu")
            digest.update(f"{name}{tuple(tensor.shape)}{tensor.dtype}".encode() + sample.numpy().tobytes()
                          + total.numpy().tobytes())
    return digest.hexdigest()[:16]


def tokenizer_fingerprint(tokenizer) -> str:
    """Vocabulary, special tokens and chat template: what turns a prompt into ids."""
    parts = {"class": type(tokenizer).__name__, "vocab": sorted(tokenizer.get_vocab().items()),
             "special": {k: str(v) for k, v in sorted(tokenizer.special_tokens_map.items())},
             "chat_template": getattr(tokenizer, "chat_template", None),
             "bos_eos": [getattr(tokenizer, "add_bos_token", None), getattr(tokenizer, "add_eos_token", None)]}
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def ids_hash(input_ids) -> str:
    return hashlib.sha256(json.dumps(list(map(int, input_ids))).encode()).hexdigest()[:16]


def differences(saved: dict, current: dict, fields=None) -> list[str]:
    """'field: saved -> current' for every field that differs (all fields of both when `fields` is None)."""
    keys = fields if fields is not None else sorted(set(saved) | set(current))
    return [f"{k}: {saved.get(k)!r} (in the file) vs {current.get(k)!r} (now)"
            for k in keys if saved.get(k) != current.get(k)]


def write_json_atomic(path: str, data) -> None:
    """Write to a temporary file beside `path`, then move it into place (never a half-written file)."""
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2)
    os.replace(tmp, path)
