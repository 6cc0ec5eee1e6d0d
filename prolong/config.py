"""Recipe configuration: the dataclasses every entry point shares, and the YAML + CLI parser.

A recipe is ONE flat YAML file holding model, data, RoPE and any ``TrainingArguments`` field.
Command-line flags (``--learning_rate 2e-5``) override it. Unknown keys are errors that name
the closest valid key, and values are type-checked by the same argparse machinery transformers
uses (``HfArgumentParser``), so a wrong type names its field too.
"""

from __future__ import annotations

import difflib
import json
import os
import sys
from dataclasses import dataclass, field, fields
from typing import Any

import yaml
from transformers import HfArgumentParser, TrainingArguments
from transformers.trainer_utils import SchedulerType
import trl
from trl import SFTConfig

from prolong.yaml_files import load_yaml
from prolong.errors import RecipeError  # defined there, without heavy imports, for every CLI
from prolong.training.arguments import (apply_machine_defaults, check_scheduler_kwargs, check_training_values,
                                       refuse_generation_under_sharding, refuse_per_device_loss_averaging)


@dataclass
class ModelConfig:
    model_name_or_path: str = field(metadata={"help": "Local directory or Hub id of the causal LM to start from."})
    gguf_file: str | None = field(default=None, metadata={"help": "GGUF file name inside model_name_or_path."})
    tokenizer_name_or_path: str | None = field(default=None, metadata={"help": "Defaults to model_name_or_path."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Run modeling code shipped with the model."})
    dtype: str = field(
        default="auto",
        metadata={"help": "Weights as loaded: auto = float32 (the optimizer's master weights; bf16: true computes in "
                  "bf16), bfloat16 or float16 (under FSDP2, which keeps fp32 master weights, or for LoRA), float32."},
    )
    low_precision_master_weights: bool = field(
        default=False,
        metadata={"help": "true: let the optimizer step bfloat16/float16 weights with no fp32 copy (most updates "
                  "at lr 1e-5 round away; the log states the share). Otherwise such a recipe is refused."},
    )
    attn_implementation: str = field(
        default="auto",
        metadata={"help": "auto | flash_attention_2 | varlen | flex_attention | sdpa | eager (see prolong/training/attention.py)."},
    )
    rope_theta: float | None = field(default=None, metadata={"help": "New RoPE base (ProLong: 8e6 at 64K)."})
    rope_scaling: dict | str | None = field(
        default=None,
        metadata={"help": "Extra rope_parameters, e.g. {rope_type: yarn, factor: 8, original_max_position_embeddings: 8192}."},
    )

    def __post_init__(self):
        self.rope_scaling = _json_mapping(
            self.rope_scaling, "rope_scaling",
            '{"rope_type": "yarn", "factor": 8, "original_max_position_embeddings": 8192}')
        if self.dtype not in ("auto", "bfloat16", "float16", "float32"):
            raise RecipeError(f"dtype: '{self.dtype}' is not one of auto, bfloat16, float16, float32.")
        if self.attn_implementation not in ATTN_IMPLEMENTATIONS:
            raise RecipeError(
                f"attn_implementation: '{self.attn_implementation}' is not one of {', '.join(ATTN_IMPLEMENTATIONS)}."
            )
        if self.rope_theta is not None and not self.rope_theta > 0:
            raise RecipeError(f"rope_theta must be a positive RoPE base (ProLong: 8e6 at 64K), got {self.rope_theta:g}.")
        for key in ("factor", "rope_theta", "original_max_position_embeddings"):
            value = (self.rope_scaling or {}).get(key)
            if value is not None and not (isinstance(value, (int, float)) and value > 0):
                raise RecipeError(f"rope_scaling: {key} must be a positive number, got {value!r}.")


@dataclass
class DataConfig:
    dataset_mixture: dict | str | None = field(
        default=None,
        metadata={"help": "Packed dataset directories (from `prolong-data pack`) -> share of training tokens."},
    )
    max_length: int = field(default=65536, metadata={"help": "Tokens per packed training sequence."})
    balance_attention_cost: bool = field(
        default=False,
        metadata={"help": "Order each optimizer step's sequences by sum(doc_len^2) so devices get equal attention work."},
    )
    allow_packed_shorter: list[str] | None = field(
        default=None,
        metadata={
            "help": "Short-data domains (dataset_mixture paths) packed shorter than max_length on purpose: their "
            "rows train at their packed length. Any other domain packed shorter than max_length is refused."
        },
    )

    def __post_init__(self):
        self.dataset_mixture = _json_mapping(self.dataset_mixture, "dataset_mixture", '{"data/books": 0.6, "data/web": 0.4}')
        for path, share in (self.dataset_mixture or {}).items():
            if isinstance(share, bool) or not isinstance(share, (int, float)):
                raise RecipeError(f"dataset_mixture: the share of '{path}' must be a number, got {share!r}.")
        unknown = [path for path in self.allow_packed_shorter or [] if path not in (self.dataset_mixture or {})]
        if unknown:
            raise RecipeError(
                f"allow_packed_shorter: {unknown} are not dataset_mixture paths; list paths exactly as in dataset_mixture."
            )
        if self.max_length < 2:
            raise RecipeError(f"max_length must be at least 2 tokens (a row needs a token to predict), got {self.max_length}.")


ATTN_IMPLEMENTATIONS = ("auto", "flash_attention_2", "varlen", "flex_attention", "sdpa", "eager")


def _json_mapping(value, name: str, example: str) -> dict | None:
    """A mapping given in YAML, or as JSON text on the command line."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as error:
            raise RecipeError(f"{name}: {value!r} is not JSON ({error.msg}); write a mapping, e.g. {example}.") from None
    if value is not None and not isinstance(value, dict):
        raise RecipeError(f"{name} must be a mapping, e.g. {example}; got {value!r}.")
    return value


@dataclass
class ProLongTrainingDefaults:
    """The TrainingArguments defaults CPT and SFT share (mixed in before TrainingArguments / SFTConfig).

    ProLong's optimisation: AdamW (0.9, 0.95), wd 0.1, clip 1.0, cosine to 10% of peak; bf16 when
    CUDA is there; checkpoints every 125 steps, resumed automatically.
    """

    adam_beta2: float = 0.95
    weight_decay: float = 0.1
    max_grad_norm: float = 1.0
    lr_scheduler_type: SchedulerType | str = "cosine_with_min_lr"
    lr_scheduler_kwargs: dict | str | None = field(
        default=None, metadata={"help": "Default {min_lr_rate: 0.1} with cosine_with_min_lr; checked against the scheduler."}
    )
    bf16: bool | None = field(default=None, metadata={"help": "Defaults to True when CUDA is available."})
    save_steps: float = 125
    logging_steps: float = 1
    report_to: None | str | list[str] = "tensorboard"
    resume_from_checkpoint: str | None = field(
        default="auto",
        metadata={"help": "auto: continue from the newest complete checkpoint in output_dir if there is one "
                  "(prolong/checkpoint/checkpoints.py); or a checkpoint path."},
    )
    overwrite_output_dir: bool = field(
        default=False, metadata={"help": "Start at step 0 in an output_dir that holds checkpoints (removes them)."}
    )
    global_batch_size: int | None = field(
        default=None,
        metadata={
            "help": "Sequences (packed rows) per optimizer step, over all devices. Sets gradient_accumulation_steps "
            "= global_batch_size / (per_device_train_batch_size x data-parallel size)."
        },
    )

    def __post_init__(self):
        self.lr_scheduler_kwargs = _json_mapping(self.lr_scheduler_kwargs, "lr_scheduler_kwargs", '{"min_lr_rate": 0.1}')
        if self.lr_scheduler_kwargs is None and str(getattr(self.lr_scheduler_type, "value", self.lr_scheduler_type)) == "cosine_with_min_lr":
            self.lr_scheduler_kwargs = {"min_lr_rate": 0.1}  # ProLong: cosine to 10% of the peak
        check_scheduler_kwargs(self)
        apply_machine_defaults(self)
        check_training_values(self)
        super().__post_init__()  # TrainingArguments' / SFTConfig's
        refuse_per_device_loss_averaging(self)


@dataclass
class CPTConfig(ProLongTrainingDefaults, TrainingArguments):
    """TrainingArguments with ProLong's continued pre-training defaults and our additions."""

    # ProLong optimisation defaults (the rest in ProLongTrainingDefaults): 10% warmup.
    warmup_steps: float = 0.1
    remove_unused_columns: bool = False  # the collator needs `indices` and `mask`
    output_dir: str | None = "outputs/run"

    # Stage hand-off and loss
    init_from: str | None = field(
        default=None, metadata={"help": "Output directory of a previous stage to start from (weights)."}
    )
    load_optimizer_state: bool = field(
        default=False,
        metadata={"help": "With init_from: also load that stage's optimizer state (the schedule starts fresh)."},
    )
    loss_chunk_size: int = field(default=4096, metadata={"help": "Tokens per chunk of the cross-entropy."})
    sequence_parallel_size: int = field(default=1, metadata={"help": "GPUs that share one sequence (Ulysses)."})
    check_document_masking: bool = field(
        default=True, metadata={"help": "Probe the real model at start-up: documents must not see each other."}
    )
    activation_offload: bool = field(
        default=False, metadata={"help": "Keep saved activations in CPU memory during the forward (longer rows)."}
    )
    tiled_mlp_tokens: int = field(
        default=0,
        metadata={"help": "0: off. Run each MLP on tiles of this many tokens, recomputed in the backward "
                  "(ALST's TiledMLP: frees the MLP's intermediate activations at 256K+ tokens per GPU)."},
    )
    loss_kernel: str = field(
        default="auto",
        metadata={"help": "auto: a fused linear cross-entropy on CUDA (Liger's if installed, else TRL's chunked "
                  "log-prob kernel), our chunked fp32 loss elsewhere; or liger | trl | chunked."},
    )
    compile_decoder_layers: str | None = field(
        default=None,
        metadata={"help": "torch.compile backend for the decoder layers (inductor on GPU; one compiled graph "
                  "shared by every layer, dynamic lengths). None: off."},
    )
    eval_recall_lengths: list[int] | None = field(
        default=None, metadata={"help": "Run a small recall evaluation at these lengths at every checkpoint."}
    )
    eval_recall_samples: int = field(default=10, metadata={"help": "Samples per recall task and length."})

    def __post_init__(self):
        if self.loss_chunk_size <= 0:
            raise RecipeError(f"loss_chunk_size must be a positive number of tokens (default 4096), got {self.loss_chunk_size}.")
        refuse_generation_under_sharding(self)  # before TrainingArguments imports the DeepSpeed it names
        super().__post_init__()
        if self.eval_recall_lengths and self.sequence_parallel_size > 1:
            raise RecipeError(
                "eval_recall_lengths runs generation on the main process alone, which sequence-parallel "
                "attention cannot do; drop it and evaluate checkpoints with `python -m evaluation.run`."
            )
        if self.eval_recall_samples < 1:
            raise RecipeError(f"eval_recall_samples must be at least 1 sample per task and length, got {self.eval_recall_samples}.")
        if self.load_optimizer_state and not self.init_from:
            raise RecipeError("load_optimizer_state: true needs init_from: <previous stage output_dir>.")
        if self.sequence_parallel_size < 1:
            raise RecipeError(f"sequence_parallel_size must be >= 1, got {self.sequence_parallel_size}.")
        if self.tiled_mlp_tokens < 0:
            raise RecipeError(f"tiled_mlp_tokens must be 0 (off) or a number of tokens, got {self.tiled_mlp_tokens}.")
        if self.loss_kernel not in ("auto", "liger", "trl", "chunked"):
            raise RecipeError(f"loss_kernel must be auto, liger, trl or chunked, got {self.loss_kernel!r}.")


# ---------------------------------------------------------------------------------------------
# Parsing. On transformers' HfArgumentParser, not trl.TrlParser (checked in trl 1.16): TrlParser
# takes the recipe as `--config FILE` and sets its values as argparse defaults, so a YAML value
# that is not a string is never type-checked (`max_steps: [1, 2]`, `use_peft: 3` pass); an
# unknown key is a ValueError listing flags, with no closest-key hint; and it keeps no record of
# the recipe as written. We turn every YAML value into a flag instead (checked like one), name
# the closest key, and return the recipe as written for the model card.


def _field_names(types) -> dict[str, Any]:
    names = {}
    for dtype in types:
        for f in fields(dtype):
            if f.init:
                names[f.name] = f
    return names


def _unknown_key_error(key: str, valid: dict, where: str) -> RecipeError:
    close = difflib.get_close_matches(key, list(valid), n=1, cutoff=0.6)
    hint = f" Did you mean '{close[0]}'?" if close else " See the dataclasses in prolong/config.py for valid keys."
    return RecipeError(f"Unknown key '{key}' in {where}.{hint}")


def _yaml_to_argv(recipe: dict, valid: dict) -> list[str]:
    """Turn YAML values into the flags HfArgumentParser understands, so it type-checks them."""
    argv = []
    for key, value in recipe.items():
        if value is None:
            continue  # keep the dataclass default
        if isinstance(value, dict):
            argv += [f"--{key}", json.dumps(value)]
        elif isinstance(value, (list, tuple)):
            argv += [f"--{key}", *[str(v) for v in value]]
        elif isinstance(value, bool):
            argv += [f"--{key}", str(value).lower()]
        else:
            argv += [f"--{key}", str(value)]
    return argv


class _RaisingParser(HfArgumentParser):
    def error(self, message):  # argparse exits the process; we want an exception naming the field
        raise RecipeError(f"Invalid recipe value: {message}")


def parse_recipe(types: tuple, args: list[str] | None = None, return_recipe: bool = False):
    """Parse ``RECIPE.yaml [--field value ...]`` into instances of ``types``.

    The first argument ending in .yaml/.yml is the recipe; the remaining flags override it.
    With ``return_recipe``, also returns the recipe as written (YAML merged with the flags),
    which the model card records.
    """
    args = list(sys.argv[1:] if args is None else args)
    if {"-h", "--help"} & set(args):  # argparse lists every field with its help and exits 0
        _RaisingParser(types).parse_args(["--help"])
    valid = _field_names(types)
    recipe_path = next((a for a in args if a.endswith((".yaml", ".yml")) and not a.startswith("-")), None)
    if recipe_path is None and args and not args[0].startswith("-"):  # a recipe given without the suffix
        recipe_path = args[0]
        if not os.path.isfile(recipe_path):
            raise RecipeError(f"Recipe file not found: {recipe_path}" + (" (a directory)" if os.path.isdir(recipe_path) else ""))
        raise RecipeError(f"The recipe must be a .yaml or .yml file, got {recipe_path}; rename it or give the YAML recipe.")
    recipe: dict = {}
    if recipe_path is not None:
        args.remove(recipe_path)
        if not os.path.isfile(recipe_path):
            raise RecipeError(f"Recipe file not found: {recipe_path}" + (" (a directory)" if os.path.isdir(recipe_path) else ""))
        try:
            with open(recipe_path, encoding="utf-8") as f:
                recipe = load_yaml(f) or {}
        except (yaml.YAMLError, UnicodeDecodeError) as error:
            raise RecipeError(f"{recipe_path} is not valid YAML: {error}".strip()) from None
        if not isinstance(recipe, dict):
            raise RecipeError(f"{recipe_path} must be a mapping of field: value.")
        for key in recipe:
            if key not in valid:
                raise _unknown_key_error(key, valid, recipe_path)
    for arg in args:
        if arg.startswith("--"):
            key = arg[2:].split("=", 1)[0]
            if key not in valid:
                raise _unknown_key_error(key, valid, "the command line")
    parser = _RaisingParser(types)
    parsed = parser.parse_args_into_dataclasses(args=_yaml_to_argv(recipe, valid) + args)
    if not return_recipe:
        return parsed
    written = dict(recipe)
    key = None
    for arg in args:  # flags as given, for the record
        if arg.startswith("--"):
            key, _, value = arg[2:].partition("=")
            written[key] = value or True
        elif key is not None:
            written[key] = arg if written[key] is True else f"{written[key]} {arg}"
    return (*parsed, written)


# ---------------------------------------------------------------------------------------------
# Supervised fine-tuning (prolong/run_sft.py). Parsed together with SFTModelConfig, without
# DataConfig: SFTConfig has its own max_length (tokens per packed sequence).


@dataclass
class SFTModelConfig(ModelConfig, trl.ModelConfig):
    """ModelConfig with trl.ModelConfig's LoRA fields (use_peft, lora_r, lora_alpha, lora_dropout,
    lora_target_modules, use_rslora, use_dora, ...), which ``trl.get_peft_config`` turns into the
    adapter. TRL's fields that ``model.load_model`` does not read (revision, 4/8-bit loading) are
    not recipe keys: a recipe setting them would silently train the plain model."""

    lora_target_modules: list[str] = field(
        default_factory=lambda: ["all-linear"], metadata={"help": "Module names, or all-linear."}
    )
    model_revision: str = field(default="main", init=False)
    lora_task_type: str = field(default="CAUSAL_LM", init=False)
    load_in_8bit: bool = field(default=False, init=False)
    load_in_4bit: bool = field(default=False, init=False)
    bnb_4bit_quant_type: str = field(default="nf4", init=False)
    use_bnb_nested_quant: bool = field(default=False, init=False)
    bnb_4bit_quant_storage: str | None = field(default=None, init=False)

    def __post_init__(self):
        # ModelConfig's checks, not trl.ModelConfig's: it turns a one-name list into a string, which
        # peft reads as a regex matched against the whole module path ([q_proj] would match nothing)
        super().__post_init__()
        if self.lora_target_modules in (["all-linear"], "all-linear"):
            self.lora_target_modules = "all-linear"  # peft's shorthand only as a string
        if self.use_peft and not self.lora_r > 0:
            raise RecipeError(f"lora_r must be a positive rank, got {self.lora_r}.")


@dataclass
class SFTRecipeConfig(ProLongTrainingDefaults, SFTConfig):
    """trl.SFTConfig with ProLong's SFT defaults (UltraChat, lr 2e-5 cosine to 2e-6, 5% warmup,
    conversations packed whole into 64K padding-free rows) and our data fields."""

    learning_rate: float = 2e-5
    warmup_steps: float = 0.05
    # TRL's default (True) under transformers' new name: the deprecated `gradient_checkpointing`
    # alias would warn on every run
    activation_checkpointing: bool | None = True
    max_length: int | None = field(default=65536, metadata={"help": "Tokens per packed training row."})
    packing: bool = True
    packing_strategy: str = "bfd"  # whole conversations, padding-free, attention kept inside each one
    completion_only_loss: bool | None = True  # prompt/completion data: loss on the completion only
    output_dir: str | None = "outputs/sft"
    # ModelConfig.trust_remote_code is the one recipe key; this copy is filled from it by run_sft.
    trust_remote_code: bool = field(default=False, init=False)

    dataset_name: str | None = field(
        default=None,
        metadata={
            "help": "Hub id (HuggingFaceH4/ultrachat_200k), a save_to_disk directory, a .jsonl/.json/.parquet "
            "file, or a `prolong-data pack --mode sft` directory. Rows hold `messages`, or `prompt` + "
            "`completion`, or packed `input_ids`/`indices`/`mask`."
        },
    )
    dataset_config: str | None = field(default=None, metadata={"help": "Hub dataset configuration (subset)."})
    dataset_split: str = field(default="train", metadata={"help": "Split to train on (UltraChat: train_sft)."})
    check_document_masking: bool = field(
        default=True, metadata={"help": "Probe the real model at start-up: conversations must not see each other."}
    )

    def __post_init__(self):
        super().__post_init__()
        if self.assistant_only_loss:
            raise RecipeError(
                "assistant_only_loss: prolong/sft_data.py already masks every non-assistant token for any chat "
                "template (no {% generation %} markers needed); remove assistant_only_loss from the recipe."
            )
        if self.packing and self.packing_strategy == "wrapped":
            raise RecipeError(
                "packing_strategy: wrapped cuts conversations and lets them attend to each other; use bfd."
            )
        if self.max_length is None or self.max_length < 2:
            raise RecipeError(f"max_length must be at least 2 tokens (a row needs a token to predict), got {self.max_length}.")
