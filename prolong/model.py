"""Loading the tokenizer and the causal LM, with the recipe's RoPE settings and attention backend.

RoPE lives in ``config.rope_parameters`` in transformers v5: ``config.rope_theta = x`` is silently
ignored and ``from_pretrained(path, rope_theta=x)`` raises, so we edit the loaded config and pass
it back with ``config=``; ``save_pretrained`` then writes the new base into config.json.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from prolong.training.attention import choose_attn_implementation, dense_mask_warning
from prolong.config import ModelConfig
from prolong.errors import RecipeError
from prolong.io.hub import require_path_or_hub_id
from prolong.io.tokenizer import load_tokenizer as load_any_tokenizer

logger = logging.getLogger(__name__)


def _model_path_hint(field: str) -> str:
    return "init_from is the output_dir of the previous stage." if field == "init_from" else \
        "Fix the path (the demo's models: `make demo`)."


def _check_model_path(path: str, field: str = "model_name_or_path") -> None:
    require_path_or_hub_id(path, field, hint=_model_path_hint(field))


def _rope_dicts(config: PretrainedConfig) -> dict[str | None, dict]:
    """The rope parameter dicts of a config: {None: params}, or one per layer type (Gemma 3, OLMo 3)."""
    params = config.rope_parameters
    if params is None:
        return {}
    if all(isinstance(v, dict) for v in params.values()):
        return dict(params)
    return {None: params}


GLOBAL_LAYERS = "full_attention"


def _rope_updates(text_config, rope_theta: float | None, rope_scaling: dict | None) -> dict[str | None, dict]:
    """What the recipe changes in each rope dict. With one dict per layer type, rope_theta and a flat
    rope_scaling go to the full-attention layers only: a sliding layer never sees more than its window,
    so its RoPE needs no extension (transformers applies Gemma 3 / OLMo 3's rope_scaling the same way).
    A rope_scaling keyed by layer type sets each type explicitly."""
    dicts, name = _rope_dicts(text_config), type(text_config).__name__
    rope_scaling = rope_scaling or {}
    per_type = bool(rope_scaling) and all(isinstance(v, dict) for v in rope_scaling.values())
    updates = {}
    if per_type:
        if None in dicts:
            raise RecipeError(f"rope_scaling: {name} has one RoPE for all layers, not one per layer type "
                              f"({', '.join(rope_scaling)}); give the parameters themselves, e.g. "
                              "{rope_type: yarn, factor: 4, original_max_position_embeddings: 32768}.")
        if unknown := sorted(set(rope_scaling) - set(dicts)):
            raise RecipeError(f"rope_scaling: {name} has no layer type {', '.join(unknown)}; its layer types "
                              f"are {', '.join(dicts)}.")
        updates = {key: dict(value) for key, value in rope_scaling.items()}
    flat = {} if per_type else dict(rope_scaling)
    if rope_theta:
        flat["rope_theta"] = float(rope_theta)
    if flat:
        target = None if None in dicts else GLOBAL_LAYERS
        if target not in dicts:
            raise RecipeError(f"rope_theta / rope_scaling: {name} has no {target} layers; key rope_scaling by "
                              f"layer type ({', '.join(dicts)}).")
        updates[target] = {**flat, **updates.get(target, {})}
    return updates


def theta_warning(theta: float, max_length: int) -> str | None:
    """ProLong's ablation: at 64K, theta 0.5M/4M/8M gave 29.1/48.7/54.6. Warn below ~8e6 x (L/64K)."""
    recommended = 8e6 * max_length / 65536
    if theta < recommended / 2:
        return (
            f"rope_theta={theta:g} looks too small for max_length={max_length}: ProLong used 8e6 at 64K "
            f"and 1.28e8 at 512K (about {recommended:.3g} or more here). Set rope_theta in the recipe."
        )
    return None


def apply_rope_settings(
    config: PretrainedConfig, rope_theta: float | None, rope_scaling: dict | None, max_length: int | None
) -> PretrainedConfig:
    """Set the recipe's RoPE base / scaling on ``config`` and make the window cover ``max_length``;
    refuse (RecipeError, with the model's own reason) what this model's RoPE cannot take."""
    text_config = config.get_text_config()
    if (rope_theta or rope_scaling) and text_config.rope_parameters is None:
        raise RecipeError(f"{type(config).__name__} has no rope_parameters; drop rope_theta/rope_scaling.")
    dicts = _rope_dicts(text_config)
    for key, update in _rope_updates(text_config, rope_theta, rope_scaling).items():
        dicts[key].update(update)
    original = dicts.get(None, {}).get("original_max_position_embeddings")
    if original and hasattr(text_config, "original_max_position_embeddings"):
        # Phi-3 keeps this at the top level too, and transformers prefers that copy when it rebuilds
        # rope_parameters (at model init): without this, longrope would switch at the old window
        text_config.original_max_position_embeddings = original
    original_window = getattr(text_config, "max_position_embeddings", None)
    if max_length and original_window and max_length > original_window:
        text_config.max_position_embeddings = max_length
        for key, params in dicts.items():
            if key in (None, GLOBAL_LAYERS) and params.get("rope_type", "default") == "default":
                warning = theta_warning(params["rope_theta"], max_length)
                if warning:
                    logger.warning(warning)
    for params in dicts.values():
        rope_type = params.get("rope_type", "default")
        if rope_type != "default" and rope_type not in ROPE_INIT_FUNCTIONS:
            raise RecipeError(
                f"rope_scaling: unknown rope_type '{rope_type}'; use one of default, {', '.join(ROPE_INIT_FUNCTIONS)}."
            )
    try:
        text_config.validate_rope()
    except (KeyError, ValueError) as error:
        raise RecipeError(f"rope_scaling / rope_theta: {type(text_config).__name__} cannot take "
                          f"{text_config.rope_parameters}: {error}") from error
    return config


def resolve_dtype(name: str) -> torch.dtype:
    """auto is fp32 on every device: the optimizer's master weights (prolong/training/precision.py)."""
    return torch.float32 if name == "auto" else getattr(torch, name)


def load_tokenizer(cfg: ModelConfig):
    """The recipe's tokenizer (prolong.io's loader), with an EOS token and a pad token."""
    path = cfg.tokenizer_name_or_path or cfg.model_name_or_path
    field = "tokenizer_name_or_path" if cfg.tokenizer_name_or_path else "model_name_or_path"
    gguf_file = cfg.gguf_file if cfg.gguf_file and not cfg.tokenizer_name_or_path else None
    tokenizer = load_any_tokenizer(path, gguf_file, trust_remote_code=cfg.trust_remote_code, field=field,
                                   hint=_model_path_hint(field))
    if tokenizer.eos_token_id is None:
        raise RecipeError(f"The tokenizer of '{path}' has no EOS token; documents could not be separated.")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def apply_chat_template_path(model, tokenizer, chat_template_path: str | None):
    """The recipe's ``chat_template_path``: a .jinja file, or a tokenizer whose template (and special
    tokens, resizing the model's embeddings) TRL's ``clone_chat_template`` copies."""
    if chat_template_path is None:
        return model, tokenizer
    if os.path.isfile(chat_template_path):
        tokenizer.chat_template = Path(chat_template_path).read_text(encoding="utf-8")
        return model, tokenizer
    from trl.chat_template_utils import clone_chat_template

    require_path_or_hub_id(chat_template_path, "chat_template_path",
                           hint="Give a .jinja file or a tokenizer (directory or Hub id) whose template to copy.")
    model, tokenizer, _ = clone_chat_template(model, tokenizer, chat_template_path)
    return model, tokenizer


def load_model(cfg: ModelConfig, max_length: int | None = None, path: str | None = None):
    """Load ``path`` (default: cfg.model_name_or_path) with the recipe's RoPE and attention backend."""
    field = "init_from" if path else "model_name_or_path"
    path = path or cfg.model_name_or_path
    _check_model_path(path, field)
    kwargs = {"gguf_file": cfg.gguf_file} if cfg.gguf_file and path == cfg.model_name_or_path else {}
    config = AutoConfig.from_pretrained(path, trust_remote_code=cfg.trust_remote_code, **kwargs)
    apply_rope_settings(config, cfg.rope_theta, cfg.rope_scaling, max_length)
    attn = choose_attn_implementation(cfg.attn_implementation, config)  # refuses before the weights load
    if warning := dense_mask_warning(attn, max_length):
        logger.warning(warning)
    model = AutoModelForCausalLM.from_pretrained(
        path,
        config=config,
        dtype=resolve_dtype(cfg.dtype),
        attn_implementation=attn,
        trust_remote_code=cfg.trust_remote_code,
        **kwargs,
    )
    logger.info(
        "Loaded %s (%.1fM parameters, attention=%s, rope=%s)",
        path,
        model.num_parameters() / 1e6,
        attn,
        model.config.get_text_config().rope_parameters,
    )
    return model


def check_model_paths(cfg: ModelConfig, init_from: str | None = None) -> None:
    """Refuse at once (before any data or weights are read) a model, tokenizer or init_from path
    that does not exist, or a local model directory that holds no saved model."""
    _check_model_path(cfg.model_name_or_path)
    if cfg.tokenizer_name_or_path:
        _check_model_path(cfg.tokenizer_name_or_path, "tokenizer_name_or_path")
    if init_from:
        _check_model_path(init_from, "init_from")
    models = [("init_from", init_from)] if init_from else []
    if not cfg.gguf_file:
        models.append(("model_name_or_path", cfg.model_name_or_path))
    for field, path in models:
        saved = any(os.path.isfile(os.path.join(path, name)) for name in ("config.json", "adapter_config.json"))
        if os.path.isdir(path) and not saved:
            checkpoints = sorted(name for name in os.listdir(path) if name.startswith("checkpoint-"))
            raise RecipeError(
                f"{field}: {path} holds no saved model (no config.json)"
                + (f"; it has {checkpoints[-1]}: the run there did not finish. Resume it, or point {field} at "
                   f"{os.path.join(path, checkpoints[-1])}." if checkpoints else
                   "; give the directory a model was saved to (save_pretrained, or a run's output_dir).")
            )
