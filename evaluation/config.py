"""Run settings: defaults, YAML config files, and `--key value` command-line overrides.

A key set to null means "the task's own (HELMET) default" for per-task settings such as
`use_chat_template`, `stop_newline`, `shots`, `max_samples` and `generation_max_length`.
"""
import typing
from dataclasses import asdict, dataclass, field, fields

import yaml

from prolong.yaml_files import load_yaml

MODES = ("helmet", "fixed")
BACKENDS = ("hf", "vllm")
MAX_LENGTH = 1 << 24  # 16M tokens: beyond any model's window; a larger length is a typo (1e9), not a plan


def _setting(default, doc: str, *, default_factory=None, as_text: bool = False, comma_list: bool = False,
             minimum: int | None = None):
    """One run setting: its help text (argparse's --help), and how a `--key VALUE` string is read:
    `as_text` keeps it a string (paths, names), else it is a YAML scalar ("true", "3", "null");
    `comma_list` also splits a string into a list (YAML lists stay lists); `minimum`: the smallest
    integer that gives a meaningful run."""
    metadata = {"help": doc, "as_text": as_text or comma_list, "comma_list": comma_list, "minimum": minimum}
    if default_factory is not None:
        return field(default_factory=default_factory, metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass
class EvalSettings:
    """Every run setting: the YAML keys, the `evaluate(...)` keywords and `evaluation.run`'s --flags."""
    mode: str = _setting(
        "helmet", "helmet: reproduce HELMET's prompts, filters and scoring exactly (its known bugs included where "
        "they change scores) so numbers sit next to published tables; fixed: our documented fixes "
        "(every difference is listed in docs/evaluation.md)")
    tasks: list = _setting(None, "task names, comma-separated",
                           default_factory=lambda: ["json_kv", "ruler_mk_needle", "ruler_mk_uuid", "ruler_mv"],
                           comma_list=True)
    lengths: list = _setting(None, "total budgets (input + generation, as HELMET), e.g. 8k,16k (k = 1024)",
                             default_factory=lambda: [8192, 16384, 32768, 65536, 131072], comma_list=True)
    model: str | None = _setting(None, "model folder or Hub id", as_text=True)
    tokenizer: str | None = _setting(None, "tokenizer folder or Hub id (default: the model's)", as_text=True)
    output_dir: str = _setting("eval_results", "where the per-sample records, report.md and scores.json go",
                               as_text=True)
    data_dir: str = _setting("data", "HELMET's extracted data/ folder (plus icl/, narrativeqa/, ...)", as_text=True)
    max_samples: int | None = _setting(None, "per task and length; null = HELMET's 100 (ICL 500)", minimum=1)
    seed: int = _setting(42, "seed of sampling and demonstrations")
    length_tokenizer: str | None = _setting(
        None, "tokenizer measuring LongQA/Summ documents for HELMET's length filters and context cut; null = the "
        "model's. HELMET uses meta-llama/Llama-2-7b-hf for every model (set it to match exactly)")
    shots: int | None = _setting(None, "demonstrations per sample; null = the task's (HELMET) default", minimum=0)
    use_chat_template: bool | None = _setting(None, "null = the task's (HELMET) default")
    stop_newline: bool | None = _setting(None, "stop generating at a newline; null = the task's default")
    generation_max_length: int | None = _setting(None, "new tokens at most; null = the task's (HELMET) default",
                                                 minimum=1)
    num_depths: int = _setting(11, "needle depths 0%, 10%, ..., 100%, spread evenly over recall samples", minimum=1)
    backend: str = _setting("hf", "hf | vllm")
    prefill_chunk_size: int = _setting(8192, "longer prompts are prefilled into the KV cache in chunks", minimum=1)
    attn_implementation: str | None = _setting(None, "transformers' attn_implementation (default: the model's)")
    allow_beyond_window: bool = _setting(False, "run lengths above max_position_embeddings (e.g. RoPE-scaled)")
    resume: bool = _setting(True, "skip samples already in the per-sample jsonl (same model and settings only)")
    plots: bool = _setting(True, "write plots/score_vs_length.png and the recall depth heatmap")
    progress: bool = _setting(True, "a progress bar per task and length (samples, tokens/s, ETA)")
    save_prompts: bool = _setting(False, "the exact prompt text in each record (else its head, tail and ids hash)")
    nli_model: str | None = _setting(None, "Cite: NLI model for citation recall/precision (HELMET: "
                                     "google/t5_xxl_true_nli_mixture)")
    judge_base_url: str | None = _setting(None, "OpenAI-compatible judge for NarrativeQA and summarisation "
                                          "(else \"skipped\")")
    judge_model: str | None = _setting(None, "the judge's model name (default gpt-4o-2024-05-13)")
    judge_api_key_env: str | None = _setting(
        None, "NAME of the env var holding the judge's API key; it must be set (null: OPENAI_API_KEY, which may be "
        "unset for a judge on this machine); none for a judge that takes no key", as_text=True)


SETTINGS = {f.name: f for f in fields(EvalSettings)}
DEFAULTS = asdict(EvalSettings())  # a fresh dict (and lists) per import; load_config copies it again
LIST_KEYS = {name for name, f in SETTINGS.items() if f.metadata["comma_list"]}
TEXT_KEYS = {name for name, f in SETTINGS.items() if f.metadata["as_text"]}


def parse_length(value) -> int:
    """8192, "8192", "8k", "1m", "1.5k" -> tokens (k = 1024, as HELMET's 128k = 131072); a whole number of tokens."""
    text = str(value).strip().lower()
    multiplier = {"k": 1024, "m": 1024 * 1024}.get(text[-1:], 1)
    try:
        number = float(text[:-1] if multiplier > 1 else text) * multiplier
    except ValueError:
        number = float("nan")
    if isinstance(value, bool) or not (number == number and number >= 1 and number == int(number)):
        raise ValueError(f"lengths: {value!r} is not a length; use token counts such as 8192 or 8k, 128k, 1m "
                         "(k = 1024; a whole number of tokens), comma-separated")
    if number > MAX_LENGTH:
        raise ValueError(f"lengths: {value!r} is {int(number):,} tokens, more than any model's window (the most "
                         f"accepted is {MAX_LENGTH:,} = 16m); use token counts such as 8k, 128k")
    return int(number)


def _check_value(key: str, value):
    """`value` of `key` against the setting's type (int, bool, str; null where allowed) and minimum."""
    allowed = typing.get_args(SETTINGS[key].type) or (SETTINGS[key].type,)
    if value is None:
        if type(None) in allowed:
            return None
        raise ValueError(f"Config key {key!r} cannot be null (default: {DEFAULTS[key]!r}).")
    if bool in allowed:
        if not isinstance(value, bool):
            raise ValueError(f"Config key {key!r} must be true or false, got {value!r}.")
    elif int in allowed:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"Config key {key!r} must be a whole number, got {value!r}.")
        minimum = SETTINGS[key].metadata["minimum"]
        if minimum is not None and value < minimum:
            raise ValueError(f"Config key {key!r} must be {minimum} or more, got {value}"
                             + (" (null = the task's default)" if type(None) in allowed else "") + ".")
    elif str in allowed and isinstance(value, (int, float)):
        value = str(value)  # a name YAML read as a number (judge_model: 4); objects pass (Python API)
    return value


def normalise(key: str, value):
    if key in LIST_KEYS and isinstance(value, str):
        value = [v.strip() for v in value.split(",") if v.strip()]
    elif key in LIST_KEYS and isinstance(value, (int, float)) and not isinstance(value, bool):
        value = [value]  # `lengths: 512` in a YAML file
    if key in LIST_KEYS:
        if not isinstance(value, list) or not value:
            raise ValueError(f"Config key {key!r} must be a non-empty list (comma-separated on the command line), "
                             f"got {value!r}.")
        if key == "lengths":
            value = [parse_length(v) for v in value]
        return value
    value = _check_value(key, value)
    if key == "mode":
        value = str(value).strip().lower()
        if value not in MODES:
            raise ValueError(f"Config key 'mode' must be one of {', '.join(MODES)}, got {value!r}.")
    if key == "backend" and value not in BACKENDS:
        raise ValueError(f"Config key 'backend' must be one of {', '.join(BACKENDS)}, got {value!r}.")
    return value


def check_keys(keys, where: str):
    unknown = sorted(set(keys) - set(DEFAULTS))
    if unknown:
        raise ValueError(f"Unknown config key(s) {unknown} in {where}. Known keys: {', '.join(sorted(DEFAULTS))}")


def read_config_file(path: str) -> dict:
    """The settings of a YAML config file; every error names the file."""
    with open(path, encoding="utf-8") as f:
        try:
            from_file = load_yaml(f)
        except yaml.YAMLError as error:
            raise ValueError(f"--config {path} is not valid YAML: {error}") from None
    if from_file is None:
        return {}
    if not isinstance(from_file, dict):
        raise ValueError(f"--config {path} must be a mapping of config keys (key: value lines), got a "
                         f"{type(from_file).__name__}")
    check_keys(from_file, path)
    return from_file


def load_config(path: str | None = None, overrides: dict | None = None) -> dict:
    cfg = asdict(EvalSettings())
    where = dict.fromkeys(cfg, "the defaults")
    if path:
        from_file = read_config_file(path)
        cfg.update(from_file)
        where.update(dict.fromkeys(from_file, path))
    if overrides:
        check_keys(overrides, "overrides")
        cfg.update(overrides)
        where.update(dict.fromkeys(overrides, "the command line"))
    normalised = {}
    for key, value in cfg.items():
        try:
            normalised[key] = normalise(key, value)
        except ValueError as error:
            raise ValueError(f"{str(error).rstrip('.')} (in {where[key]})." if where[key] != "the command line"
                             else str(error)) from None
    check_unread_settings(normalised, where)
    return normalised


def check_unread_settings(cfg: dict, where: dict) -> None:
    """A setting given for a task that never reads it would be silently ignored: refuse it instead."""
    from .tasks import TASKS  # the registry imports no config: only here, where a parsed config needs it
    for key in SETTINGS:
        if cfg.get(key) is None or where[key] == "the defaults":
            continue
        unread = [name for name in cfg["tasks"] if key in getattr(TASKS.get(name), "unread_settings", ())]
        if unread:
            raise ValueError(f"Config key {key!r} ({cfg[key]!r}, in {where[key]}) is not read by task(s) "
                             f"{', '.join(unread)}: they take no {key}. Remove {key!r}, or run those tasks with "
                             "a config of their own.")
