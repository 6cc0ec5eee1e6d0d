"""Bad input through the real command lines: one clear message, no traceback, exit status 2.

ONE parametrised test, :func:`test_bad_input_is_refused_clearly`. A case is
``(id, argv, fragment)``: ``argv[0]`` names the CLI (``run_cpt``, ``run_sft``, ``prolong-data``,
``evaluation.run``, ``prolong.demo``; see tests/cli_driver.py), ``fragment`` must appear in its
stderr (case-insensitive). Each case's argv may use these placeholders, filled in by the test:

    {model}      a tiny real Llama + tokenizer directory     {tmp}    a scratch directory
    {mixture}    JSON mixture of two domains packed at 128    {short}  one of them (mode short, 128)
    {chat}       a chat .jsonl (messages)                      {file}   an existing regular file
    {repo}       the repository root                           {long}   a domain packed --mode long at 128
    {packed}     the folder of {mixture}'s two domains (long, short)

``{tmp}`` also holds bad data files and folders for ``prolong-data`` (made by the ``places`` fixture:
``{tmp}/latin1.jsonl``, ``{tmp}/truncated``, ...), and ``{tmp}/tokenized``, a valid tokenized dataset.
A refused case must leave ``{tmp}``, ``{model}``, ``{packed}`` and tests/fixtures as they were: nothing
added (no output, no temporary), removed or rewritten (tests/cli_driver.py compares them before and after).

Every case runs with the scratch directory ``{tmp}/cwd`` as working directory, which holds
``demo_data/base-model`` (a copy of {model}) and no ``outputs/``. Cases run in one Python process
(tests/cli_driver.py runs each exactly as ``python prolong/run_cpt.py ...`` / ``python -m ...``
would, ~5 s of imports saved per case); cases whose id starts with ``alone-`` run in a process of
their own, as typed.

Others append: ``CPT_CASES``/``SFT_CASES``, ``DATA_CASES`` (prolong-data), ``EVAL_CASES``
(evaluation.run), ``DEMO_CASES`` (prolong.demo). docs/bad-inputs.md lists every case and its message.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys

import datasets
import pytest

from conftest import bpe_tokenizer, random_documents, train_tiny_tokenizer, write_packed_dataset
from cli_driver import REPO, changes, command_line, snapshot
from prolong.data import pack_dataset
from prolong.data.mds import import_mds
from prolong.data.tokenize import tokenize_to_disk

TEST_NAME = "test_bad_input_is_refused_clearly"


VALID_CPT = {  # a valid tiny run_cpt command line; each case changes one thing
    "model_name_or_path": "{model}", "dataset_mixture": "{mixture}", "max_length": "128",
    "per_device_train_batch_size": "1", "max_steps": "1", "output_dir": "{tmp}/out-cpt",
    "report_to": "none", "disable_tqdm": "true",
}
VALID_SFT = {
    "model_name_or_path": "{model}", "dataset_name": "{chat}", "max_length": "128",
    "per_device_train_batch_size": "1", "max_steps": "1", "output_dir": "{tmp}/out-sft",
    "report_to": "none", "disable_tqdm": "true", "activation_checkpointing": "false",
}


def cpt(*extra: str, drop: tuple[str, ...] = (), **values) -> list[str]:
    """run_cpt argv: a valid tiny run, with ``values`` overridden, ``drop`` keys removed, ``extra`` appended."""
    base = dict(VALID_CPT)
    base.update(values)
    argv = ["run_cpt"]
    for key, value in base.items():
        if key not in drop:
            argv += [f"--{key}", str(value)]
    return argv + list(extra)


def sft(*extra: str, drop: tuple[str, ...] = (), **values) -> list[str]:
    base = dict(VALID_SFT)
    base.update(values)
    argv = ["run_sft"]
    for key, value in base.items():
        if key not in drop:
            argv += [f"--{key}", str(value)]
    return argv + list(extra)


CPT_CASES = [
    ("alone-cpt-recipe-file-missing", ["run_cpt", "recipes/nope.yaml"], "Recipe file not found: recipes/nope.yaml"),
    ("cpt-recipe-file-missing", ["run_cpt", "{tmp}/missing.yaml"], "not found"),
    ("cpt-unknown-key", cpt("--learning_rat", "1"), "Did you mean 'learning_rate'"),
    ("cpt-wrong-type", cpt(max_length="long"), "max_length"),
    ("cpt-batch-size-0", cpt(per_device_train_batch_size=0), "per_device_train_batch_size"),
    ("cpt-learning-rate-negative", cpt(learning_rate=-1), "learning_rate"),
    ("cpt-loss-chunk-size-0", cpt(loss_chunk_size=0), "loss_chunk_size"),
    ("cpt-save-steps-0", cpt(save_steps=0), "save_steps"),
    ("cpt-rope-theta-0", cpt(rope_theta=0), "rope_theta"),
    ("cpt-rope-theta-negative", cpt(rope_theta=-5), "rope_theta"),
    ("cpt-rope-factor-0", cpt(rope_scaling='{"rope_type": "linear", "factor": 0}'), "factor"),
    ("cpt-rope-scaling-not-json", cpt(rope_scaling="yarn factor 8"), "rope_scaling"),
    ("cpt-init-from-missing", cpt(init_from="{tmp}/no-stage1"), "init_from: not found"),
    ("cpt-output-dir-is-a-file", cpt(output_dir="{file}"), "output_dir"),
    ("cpt-init-from-unfinished-run", cpt(init_from="{tmp}/cwd/unfinished"), "did not finish"),
    ("cpt-model-dir-without-model", cpt(model_name_or_path="{tmp}/cwd/demo_data"), "holds no saved model"),
    ("cpt-model-typo-local", cpt(model_name_or_path="demo_data/base-modle"), "not found: demo_data/base-modle"),
    ("cpt-model-outputs-before-demo", cpt(model_name_or_path="outputs/tiny-cpt"), "not found: outputs/tiny-cpt"),
    ("cpt-model-dot-path", cpt(model_name_or_path="./nope"), "not found: ./nope"),
    ("cpt-tokenizer-dot-path", cpt(tokenizer_name_or_path="./nope"), "not found: ./nope"),
    ("cpt-mixture-path-missing", cpt(dataset_mixture='{"{tmp}/missing-domain": 1.0}'), "missing-domain"),
    ("cpt-mixture-shares", cpt(dataset_mixture='{"{short}": 0.7}'), "sum to 1"),
    ("cpt-mixture-not-json", cpt(dataset_mixture="{short}: 1"), "dataset_mixture"),
    ("cpt-global-batch-not-divisible", cpt(global_batch_size=3, per_device_train_batch_size=2), "global_batch_size=3"),
    ("cpt-sequence-parallel-not-dividing", cpt(sequence_parallel_size=2), "sequence_parallel_size"),
    ("cpt-max-steps-missing", cpt(drop=("max_steps",)), "max_steps"),
    ("cpt-model-missing", cpt(drop=("model_name_or_path",)), "model_name_or_path"),
    ("cpt-max-length-above-packed", cpt(max_length=512), "packed at 128 tokens"),
    ("cpt-long-domain-shorter", cpt(dataset_mixture='{"{long}": 1.0}', max_length=512, allow_packed_shorter="{long}"),
     "--mode long --length 512"),
    ("cpt-allow-shorter-unknown-path", cpt(allow_packed_shorter="{tmp}/elsewhere"), "allow_packed_shorter"),
    ("cpt-yaml-syntax", ["run_cpt", "{tmp}/bad.yaml"], "is not valid YAML"),
    ("cpt-yaml-list", ["run_cpt", "{tmp}/list.yaml"], "must be a mapping"),
    ("cpt-yaml-unknown-key", ["run_cpt", "{tmp}/typo.yaml"], "Did you mean 'rope_theta'"),
    ("cpt-dtype", cpt(dtype="fp16"), "dtype"),
    ("cpt-attn-implementation", cpt(attn_implementation="flash"), "attn_implementation"),
    ("cpt-rope-type-unknown", cpt(rope_scaling='{"rope_type": "ntk", "factor": 2}'), "rope_type"),
    ("cpt-rope-yarn-without-factor", cpt(rope_scaling='{"rope_type": "yarn"}'), "factor"),
    ("cpt-lr-scheduler-kwargs-not-json", cpt(lr_scheduler_kwargs="min_lr_rate=0.1"), "lr_scheduler_kwargs"),
    ("cpt-global-batch-0", cpt(global_batch_size=0), "global_batch_size"),
    ("cpt-max-length-0", cpt(max_length=0), "max_length"),
    ("cpt-sequence-parallel-0", cpt(sequence_parallel_size=0), "sequence_parallel_size"),
    ("cpt-tiled-mlp-negative", cpt(tiled_mlp_tokens=-1), "tiled_mlp_tokens"),
    ("cpt-loss-kernel", cpt(loss_kernel="fast"), "loss_kernel"),
    ("cpt-per-device-averaging", cpt(average_tokens_across_devices="false"), "average_tokens_across_devices"),
    ("cpt-optimizer-state-without-init", cpt(load_optimizer_state="true"), "needs init_from"),
    ("cpt-recall-eval-with-sp", cpt(eval_recall_lengths=512, sequence_parallel_size=2), "eval_recall_lengths"),
    ("cpt-recall-eval-with-fsdp", cpt(eval_recall_lengths=512, fsdp="full_shard"), "FSDP sharding cannot do"),
    ("cpt-bf16-weights-without-fsdp2", cpt(dtype="bfloat16"), "low_precision_master_weights: true"),
    ("cpt-mixture-share-string", cpt(dataset_mixture='{"{short}": "half"}'), "must be a number"),
    ("cpt-mixture-empty", cpt(dataset_mixture="{}"), "dataset_mixture"),
    ("cpt-mixture-not-a-dataset", cpt(dataset_mixture='{"{tmp}/cwd/demo_data": 1.0}'), "demo_data"),
    ("cpt-grad-accumulation-0", cpt(gradient_accumulation_steps=0), "gradient_accumulation_steps"),
    ("cpt-warmup-negative", cpt(warmup_steps=-1), "warmup_steps"),
    ("cpt-weight-decay-negative", cpt(weight_decay=-0.1), "weight_decay"),
    ("cpt-flag-without-value", cpt("--learning_rate"), "learning_rate"),
    ("cpt-bool-not-a-bool", cpt(balance_attention_cost="maybe"), "balance_attention_cost"),
    ("cpt-save-strategy", cpt(save_strategy="sometimes"), "save_strategy"),
]

SFT_CASES = [
    ("sft-recipe-file-missing", ["run_sft", "{tmp}/missing.yaml"], "not found"),
    ("sft-unknown-key", sft("--lora_alhpa", "8"), "Did you mean 'lora_alpha'"),
    ("sft-batch-size-0", sft(per_device_train_batch_size=0), "per_device_train_batch_size"),
    ("sft-bf16-weights-without-fsdp2", sft(dtype="float16"), "low_precision_master_weights: true"),
    ("sft-learning-rate-negative", sft(learning_rate=-1), "learning_rate"),
    ("sft-save-steps-0", sft(save_steps=0), "save_steps"),
    ("sft-rope-theta-0", sft(rope_theta=0), "rope_theta"),
    ("sft-model-outputs-before-demo", sft(model_name_or_path="outputs/tiny-cpt"), "not found: outputs/tiny-cpt"),
    ("sft-model-typo-local", sft(model_name_or_path="demo_data/base-modle"), "not found: demo_data/base-modle"),
    ("sft-tokenizer-dot-path", sft(tokenizer_name_or_path="./nope"), "not found: ./nope"),
    ("sft-dataset-dot-path", sft(dataset_name="./nope.jsonl"), "not found: ./nope.jsonl"),
    ("sft-dataset-local-typo", sft(dataset_name="demo_data/chatterbott"), "not found: demo_data/chatterbott"),
    ("sft-output-dir-is-a-file", sft(output_dir="{file}"), "output_dir"),
    ("sft-packing-wrapped", sft(packing_strategy="wrapped"), "use bfd"),
    ("sft-yaml-syntax", ["run_sft", "{tmp}/bad.yaml"], "is not valid YAML"),
    ("sft-max-length-0", sft(max_length=0), "max_length"),
    ("sft-assistant-only-loss", sft(assistant_only_loss="true"), "already masks"),
    ("sft-lora-rank-0", sft(use_peft="true", lora_r=0), "lora_r"),
    ("sft-per-device-averaging", sft(average_tokens_across_devices="false"), "average_tokens_across_devices"),
    ("sft-global-batch-not-divisible", sft(global_batch_size=3, per_device_train_batch_size=2), "global_batch_size=3"),
    ("sft-global-batch-0", sft(global_batch_size=0), "global_batch_size must be a positive"),
    ("sft-grad-accumulation-0", sft(gradient_accumulation_steps=0), "gradient_accumulation_steps"),
    ("sft-dataset-missing", sft(drop=("dataset_name",)), "dataset_name"),
    ("sft-dataset-wrong-columns", sft(dataset_name="{tmp}/text.jsonl"), "needs `messages`"),
    ("sft-dataset-unknown-role", sft(dataset_name="{tmp}/roles.jsonl"), "unknown role 'human'"),
    ("sft-dataset-unreadable-suffix", sft(dataset_name="{file}"), "dataset_name"),
    ("sft-chat-template-path-missing", sft(chat_template_path="./nope.jinja"), "not found: ./nope.jinja"),
    ("sft-rope-scaling-not-json", sft(rope_scaling="{factor: 8"), "rope_scaling"),
    ("sft-chatterbot-output-exists", ["prolong.demo", "chatterbot", "--out", "{file}"], "already exists"),
    ("sft-chatterbot-unknown-language", ["prolong.demo", "chatterbot", "--out", "{tmp}/cb", "--language", "klingon"],
     "klingon"),
]

def tok(*args: str, tokenizer: str = "{model}", out: str = "{tmp}/out") -> list[str]:
    """prolong-data tokenize argv: ``args`` are inputs and flags."""
    return ["prolong-data", "tokenize", *args, "--tokenizer", tokenizer, "--out", out]


def pack(source: str, *flags: str, mode: str = "short", length: str = "8", out: str = "{tmp}/out") -> list[str]:
    """prolong-data pack argv."""
    return ["prolong-data", "pack", source, "--mode", mode, "--length", length, *flags, "--out", out]


# prolong-data
MDS_RELEASED = "{repo}/tests/fixtures/mds/released"
DATA_CASES: list[tuple[str, list[str], str]] = [
    ("data-tokenize-input-missing", ["prolong-data", "tokenize", "{tmp}/nope.jsonl", "--tokenizer", "{model}",
                                     "--out", "{tmp}/d1"], "input not found: {tmp}/nope.jsonl"),
    ("data-tokenize-tokenizer-dot-path", ["prolong-data", "tokenize", "{chat}", "--text_field", "messages",
                                          "--tokenizer", "./nope", "--out", "{tmp}/d2"], "not found: ./nope"),
    ("data-tokenize-tokenizer-local-typo", ["prolong-data", "tokenize", "{chat}", "--text_field", "messages",
                                            "--tokenizer", "demo_data/base-modle", "--out", "{tmp}/d3"],
     "not found: demo_data/base-modle"),
    ("data-tokenize-wrong-text-field", ["prolong-data", "tokenize", "{chat}", "--tokenizer", "{model}",
                                        "--out", "{tmp}/d4"], "no field 'text'"),
    ("data-tokenize-binary-file", ["prolong-data", "tokenize", MDS_RELEASED + "/books/proc00-0/shard.00000.mds",
                                   "--tokenizer", "{model}", "--out", "{tmp}/d5"], "not UTF-8 text"),
    ("data-pack-packed-directory", ["prolong-data", "pack", "{short}", "--mode", "short", "--length", "64",
                                    "--out", "{tmp}/d6"], "is already packed"),
    ("data-pack-input-is-a-file", ["prolong-data", "pack", "{chat}", "--mode", "sft", "--length", "64",
                                   "--out", "{tmp}/d7"], "is a file"),
    ("data-pack-length-0", ["prolong-data", "pack", "{tmp}/nope", "--mode", "long", "--length", "0",
                            "--out", "{tmp}/d8"], "--length must be a positive"),
    ("data-inspect-missing", ["prolong-data", "inspect", "{tmp}/nope"], "not found: {tmp}/nope"),
    ("data-import-mds-no-index", ["prolong-data", "import-mds", "{tmp}/tokenized", "--out", "{tmp}/d9"], "no index.json"),
    ("data-import-mds-file", ["prolong-data", "import-mds", MDS_RELEASED + "/books/index.json", "--out", "{tmp}/d10"],
     "is a file"),
    ("data-import-mds-domain-over-several", ["prolong-data", "import-mds", MDS_RELEASED, "--domain", "x",
                                             "--out", "{tmp}/d11"], "books, fineweb-edu"),
    # import-mds --tokenizer (re-tokenization); tests/test_data_retokenize.py holds the cases that need SmolLM2
    ("data-import-mds-document-length-without-tokenizer", ["prolong-data", "import-mds", MDS_RELEASED + "/books",
                                                           "--document_length", "16", "--out", "{tmp}/d15"],
     "--document_length and --eos_token apply to re-tokenization: give the target --tokenizer"),
    ("data-import-mds-retokenize-sft", ["prolong-data", "import-mds", MDS_RELEASED + "/books", "--mode", "sft",
                                        "--tokenizer", "{model}", "--out", "{tmp}/d16"], "SFT data has loss masks"),
    ("data-import-mds-source-tokenizer-missing", ["prolong-data", "import-mds", MDS_RELEASED + "/books",
                                                  "--tokenizer", "{model}", "--source_tokenizer", "./nope",
                                                  "--out", "{tmp}/d17"], "--source_tokenizer: not found: ./nope"),
    ("data-import-mds-source-vocabulary-too-small", ["prolong-data", "import-mds", MDS_RELEASED + "/books",
                                                     "--tokenizer", "{model}", "--source_tokenizer", "{model}",
                                                     "--out", "{tmp}/d18"], "is beyond the vocabulary of --source_tokenizer"),
    ("data-import-mds-document-length-not-dividing", ["prolong-data", "import-mds", MDS_RELEASED + "/books",
                                                      "--tokenizer", "{model}", "--source_tokenizer", "{model}",
                                                      "--document_length", "12", "--out", "{tmp}/d19"],
     "books: its rows have 32 tokens, not a multiple of --document_length 12"),
    # prolong-data push: refused before any network call
    ("data-push-no-repo-id", ["prolong-data", "push", "{short}"], "--repo-id is required"),
    ("data-push-bad-repo-id", ["prolong-data", "push", "{short}", "--repo-id", "my org/x"],
     "'my org/x' is not a Hub repository id"),
    ("data-push-not-a-dataset", ["prolong-data", "push", "{model}", "--repo-id", "org/name"],
     "is not a prolong-data dataset"),
    ("data-inspect-bad-hub-address", ["prolong-data", "inspect", "hf://datasets/my-org"],
     "hf://datasets/my-org is not a Hub dataset address: use hf://datasets/ORG/NAME/CONFIG"),
    # bad files (made by `places`): one message naming the file, row or field and the fix
    ("data-tokenize-gguf-file-missing", tok("{tmp}/good.jsonl", "--gguf_file", "model.gguf"),
     "--gguf_file: not found: {model}/model.gguf"),
    ("data-tokenize-no-inputs", tok(), "give input files"),
    ("data-tokenize-jsonl-not-utf8", tok("{tmp}/latin1.jsonl"), "{tmp}/latin1.jsonl"),
    ("data-tokenize-jsonl-binary", tok("{tmp}/binary.jsonl"), "could not read {tmp}/binary.jsonl"),
    ("data-tokenize-jsonl-empty", tok("{tmp}/empty.jsonl"), "{tmp}/empty.jsonl is empty"),
    ("data-tokenize-jsonl-invalid", tok("{tmp}/invalid.jsonl"), "could not read {tmp}/invalid.jsonl as json"),
    ("data-tokenize-text-field-missing-in-a-row", tok("{tmp}/missing_field.jsonl"),
     "{tmp}/missing_field.jsonl row 2: field 'text' is missing"),
    ("data-tokenize-text-field-not-a-string", tok("{tmp}/number_text.jsonl"),
     "{tmp}/number_text.jsonl row 1: field 'text' is not a string"),
    ("data-tokenize-text-field-mixed-types", tok("{tmp}/mixed_text.jsonl"),
     "{tmp}/mixed_text.jsonl row 2: field 'text' is not a string"),
    ("data-tokenize-chat-turn-without-role", tok("{tmp}/chat_no_role.jsonl", "--text_field", "messages"),
     "{tmp}/chat_no_role.jsonl row 2, turn 1: a chat turn needs string 'role' and 'content'"),
    ("data-tokenize-chat-without-assistant", tok("{tmp}/chat_no_assistant.jsonl", "--text_field", "messages"),
     "no conversation of field 'messages' has an assistant turn"),
    ("data-tokenize-chat-template-raises", tok("{tmp}/chat_two_users.jsonl", "--text_field", "messages",
                                               tokenizer="{tmp}/tokenizer_strict_chat"),
     "the chat template of tokenizer {tmp}/tokenizer_strict_chat failed on a conversation"),
    ("data-tokenize-saved-dataset-null-text", tok("{tmp}/saved_nulls"),
     "{tmp}/saved_nulls row 3: field 'text' is missing"),
    ("data-tokenize-saved-dataset-empty", tok("{tmp}/saved_empty"),
     "input directory {tmp}/saved_empty holds an empty dataset (no rows)"),
    ("data-tokenize-only-empty-txt", tok("{tmp}/empty.txt"), "no document to tokenize"),
    ("data-tokenize-directory-not-a-dataset", tok("{tmp}/plain_dir"), "is a directory but not a saved dataset"),
    ("data-tokenize-tokenizer-without-eos", tok("{tmp}/good.jsonl", tokenizer="{tmp}/tokenizer_no_eos"), "--eos_token"),
    ("data-tokenize-num-proc-0", tok("{tmp}/good.jsonl", "--num_proc", "0"), "--num_proc"),
    ("data-tokenize-single-repo-without-repos", tok("{tmp}/good.jsonl", "--single_repo"), "--single_repo"),
    ("data-tokenize-lines-with-repos", tok("--repos", "{tmp}/plain_dir", "--lines"), "--lines applies to"),
    ("data-tokenize-repos-missing", tok("--repos", "{tmp}/no_repos"), "--repos directory not found: {tmp}/no_repos"),
    ("data-tokenize-csv-without-text-column", tok("{tmp}/table.csv"), "input {tmp}/table.csv has no field 'text'"),
    ("data-pack-input-missing", pack("{tmp}/nope"), "--input directory not found: {tmp}/nope"),
    ("data-pack-long-nothing-long-enough", pack("{tmp}/tokenized", mode="long", length="4096"),
     "no document of {tmp}/tokenized has 4096 tokens or more"),
    ("data-pack-short-corpus-below-one-row", pack("{tmp}/tokenized", length="1000000"), "less than one row"),
    ("data-pack-sft-every-conversation-too-long", pack("{tmp}/tokenized", mode="sft", length="2"),
     "give a larger --length"),
    ("data-pack-length-negative", pack("{tmp}/tokenized", length="-8"), "--length must be a positive"),
    ("data-pack-min-length-in-short-mode", pack("{tmp}/tokenized", "--min_length", "4"),
     "--min_length applies to --mode long"),
    ("data-pack-truncated-arrow", pack("{tmp}/truncated"), "{tmp}/truncated/data-00000-of-00001.arrow"),
    ("data-pack-mds-directory", pack("{tmp}/mds_truncated"), "holds MDS shards (index.json): convert them with"),
    ("data-pack-directory-not-a-dataset", pack("{tmp}/plain_dir"), "not a dataset saved with save_to_disk"),
    ("data-pack-dataset-without-domain", pack("{tmp}/raw_saved"), "no `domain` column"),
    ("data-pack-output-exists", pack("{tmp}/tokenized", out="{tmp}/packed-short"), "--overwrite"),
    ("data-pack-output-is-a-file", pack("{tmp}/tokenized", out="{file}"), "already exists"),
    ("data-inspect-truncated-arrow", ["prolong-data", "inspect", "{tmp}/truncated"],
     "{tmp}/truncated/data-00000-of-00001.arrow"),
    ("data-inspect-folder-of-domains", ["prolong-data", "inspect", "{tmp}/domains"],
     "but holds datasets (books, fineweb-edu, thestackv1_concat_by_repo-65536; e.g. one per domain)"),
    ("data-import-mds-missing", ["prolong-data", "import-mds", "{tmp}/nope", "--out", "{tmp}/out"],
     "not found: {tmp}/nope"),
    ("data-import-mds-truncated-shard", ["prolong-data", "import-mds", "{tmp}/mds_truncated", "--out", "{tmp}/out"],
     "{tmp}/mds_truncated/proc00-0/shard.00001.mds"),
]
EVAL_CASES: list[tuple[str, list[str], str]] = [  # evaluation.run
    ("eval-no-model", ["evaluation.run", "--tasks", "json_kv"], "no model given (--model PATH"),
    ("eval-unknown-task", ["evaluation.run", "--model", "{model}", "--tasks", "json_kvv"],
     "Unknown task 'json_kvv'. Known tasks: alce_asqa"),
    ("eval-bad-length", ["evaluation.run", "--model", "{model}", "--lengths", "8k,8q"],
     "lengths: '8q' is not a length; use token counts such as 8192 or 8k"),
    ("eval-bad-mode", ["evaluation.run", "--model", "{model}", "--mode", "fast"], "'mode' must be one of helmet, fixed"),
    ("eval-unknown-option", ["evaluation.run", "--model", "{model}", "--max_sample", "3"],
     "unknown option(s) --max_sample"),
    ("eval-config-missing", ["evaluation.run", "--config", "{tmp}/nope.yaml", "--model", "{model}"],
     "not found: {tmp}/nope.yaml"),
    ("eval-model-not-found", ["evaluation.run", "--model", "{tmp}/no-model", "--output_dir", "{tmp}/eval-out"],
     "model: not found: {tmp}/no-model. Pass --model (and --tokenizer) pointing at a folder saved with"),
    ("eval-data-missing", ["evaluation.run", "--model", "{model}", "--tasks", "json_kv,kilt_nq,icl_banking77",
                           "--lengths", "1k", "--data_dir", "{tmp}/no-data", "--output_dir", "{tmp}/eval-out"],
     "data missing for 2 task(s); nothing was run"),
    ("eval-nli-model-not-found", ["evaluation.run", "--model", "{model}", "--tasks", "alce_asqa", "--lengths", "1k",
                                  "--data_dir", "{repo}/tests/fixtures/alce", "--nli_model", "{tmp}/no-nli",
                                  "--output_dir", "{tmp}/eval-out"], "nli_model: not found: {tmp}/no-nli"),
    ("eval-update-card-missing", ["evaluation.run", "--model", "{model}", "--update-card", "{tmp}/nope"],
     "not found: {tmp}/nope/README.md"),
]
DEMO_CASES: list[tuple[str, list[str], str]] = [  # prolong.demo
    ("demo-export-out-not-empty", ["prolong.demo", "export-smollm2", "--out", "{tmp}/cwd"],
     "is not empty; pass --overwrite"),
    ("demo-export-out-is-a-file", ["prolong.demo", "export-smollm2", "--out", "{file}"], "is a file, not a directory"),
    ("demo-model-out-not-empty", ["prolong.demo", "model", "--out", "{tmp}/cwd"], "is not empty; pass --overwrite"),
    ("demo-report-stage-without-model", ["prolong.demo", "report", "--stage", "base={tmp}", "--data", "{tmp}",
                                         "--out", "{tmp}/report"], "expected NAME=MODEL_DIR"),
]

# resume_from_checkpoint / overwrite_output_dir; {tmp}/cwd/unfinished holds an
# incomplete checkpoint-10 (a save that never finished: no checkpoint_complete.json)
RESUME_CASES: list[tuple[str, list[str], str]] = [
    ("cpt-output-dir-with-checkpoints-no-resume", cpt(output_dir="{tmp}/cwd/unfinished", resume_from_checkpoint="none"),
     "already holds checkpoint-10"),
    ("cpt-resume-incomplete-checkpoint", cpt(resume_from_checkpoint="{tmp}/cwd/unfinished/checkpoint-10"),
     "not a complete checkpoint: no checkpoint_complete.json"),
    ("cpt-resume-not-found", cpt(resume_from_checkpoint="{tmp}/no-checkpoint"), "resume_from_checkpoint: not found"),
    ("cpt-overwrite-and-resume-path", cpt(overwrite_output_dir="true", resume_from_checkpoint="{tmp}/cwd/unfinished/checkpoint-10"),
     "overwrite_output_dir: true starts over"),
    ("sft-output-dir-with-checkpoints-no-resume", sft(output_dir="{tmp}/cwd/unfinished", resume_from_checkpoint="false"),
     "already holds checkpoint-10"),
]

# values that would make a run meaningless or fail late, refused while the recipe is parsed
PARSE_CASES = [
    ("cpt-yaml-duplicate-key", ["run_cpt", "{tmp}/twice.yaml"], "duplicate key 'max_length'"),
    ("cpt-recipe-without-yaml-suffix", ["run_cpt", "{tmp}/recipe.txt"], "must be a .yaml or .yml file"),
    ("cpt-recipe-is-a-directory", ["run_cpt", "{tmp}/folder.yaml"], "(a directory)"),
    ("cpt-bf16-and-fp16", cpt(bf16="true", fp16="true"), "bf16 and fp16 are both true"),
    ("cpt-credentials-in-a-path", cpt(model_name_or_path="https://user:sk-abc123@example.com/m?token=sk-zzz"),
     "not found: https://<redacted>@example.com/m?token=<redacted>"),
    ("cpt-max-length-1", cpt(max_length=1), "max_length must be at least 2"),
    ("sft-max-length-1", sft(max_length=1), "max_length must be at least 2"),
    ("cpt-recall-samples-0", cpt(eval_recall_samples=0), "eval_recall_samples must be at least 1"),
    ("cpt-linear-scheduler-with-min-lr", cpt(lr_scheduler_type="linear", lr_scheduler_kwargs='{"min_lr_rate": 0.1}'),
     "not parameters of lr_scheduler_type linear"),
    ("cpt-scheduler-kwarg-unknown", cpt(lr_scheduler_kwargs='{"min_lr_rate": 0.1, "cycles": 2}'), "['cycles'] are not parameters"),
    ("cpt-report-to-not-installed", cpt(report_to="wandb"), "wandb is not installed"),
    ("sft-report-to-unknown", sft(report_to="tensorbord"), "are not integrations"),
]

# prolong-data and evaluation.run safety (issue 25: nothing lost or leaked, values checked before any work);
# tests/test_data_safety.py and tests/test_redaction_eval.py hold more, on files they make
DATA_EVAL_SAFETY_CASES: list[tuple[str, list[str], str]] = [
    ("data-tokenize-out-inside-input", ["prolong-data", "tokenize", "--repos", "{tmp}/cwd", "--tokenizer", "{model}",
                                        "--out", "{tmp}/cwd/tokenized"], "is inside the input"),
    ("data-pack-length-1", ["prolong-data", "pack", "{tmp}/nope", "--mode", "short", "--length", "1",
                            "--out", "{tmp}/d12"], "2 or more"),
    ("data-pack-seed-negative", ["prolong-data", "pack", "{short}", "--mode", "sft", "--length", "64", "--seed", "-1",
                                 "--out", "{tmp}/d13"], "--seed must be 0 or more"),
    ("data-demo-max-mb-0", ["prolong-data", "demo", "--tokenizer", "{model}", "--max_mb", "0", "--out", "{tmp}/d14"],
     "--max_mb must be a positive number"),
    ("eval-lengths-1e9", ["evaluation.run", "--model", "{model}", "--tasks", "json_kv", "--lengths", "1e9"],
     "is 1,000,000,000 tokens, more than any model's window"),
    ("eval-lengths-fraction", ["evaluation.run", "--model", "{model}", "--tasks", "json_kv", "--lengths", "1.5"],
     "lengths: '1.5' is not a length; use token counts such as 8192"),
    ("eval-lengths-beyond-window", ["evaluation.run", "--model", "{model}", "--tasks", "json_kv", "--lengths", "64k",
                                    "--output_dir", "{tmp}/eval-out"],
     "every length (65536) exceeds the model window (max_position_embeddings=256)"),
    ("eval-lengths-no-room-for-prompt", ["evaluation.run", "--model", "{model}", "--tasks", "json_kv", "--lengths", "64",
                                         "--generation_max_length", "64", "--output_dir", "{tmp}/eval-out"],
     "leave no room for the prompt"),
    ("eval-max-samples-0", ["evaluation.run", "--model", "{model}", "--max_samples", "0"],
     "'max_samples' must be 1 or more, got 0"),
    ("eval-max-samples-negative", ["evaluation.run", "--model", "{model}", "--max_samples", "-3"],
     "'max_samples' must be 1 or more, got -3"),
    ("eval-num-depths-0", ["evaluation.run", "--model", "{model}", "--num_depths", "0"], "'num_depths' must be 1 or more"),
    ("eval-shots-for-a-needle-task", ["evaluation.run", "--model", "{model}", "--tasks", "json_kv,ruler_mv",
                                      "--shots", "3"], "Config key 'shots' (3, in the command line) is not read by task(s) ruler_mv"),
    ("eval-judge-key-as-variable-name", ["evaluation.run", "--model", "{model}", "--tasks", "narrativeqa",
                                         "--judge_base_url", "https://judge.example.com/v1",
                                         "--judge_api_key_env", "sk-live-0123456789abcdef"],
     "it looks like the key itself, so it is not shown"),
    ("eval-judge-key-variable-unset", ["evaluation.run", "--model", "{model}", "--tasks", "narrativeqa",
                                       "--judge_base_url", "https://judge.example.com/v1",
                                       "--judge_api_key_env", "PROLONG_UNSET_JUDGE_KEY"],
     "the environment variable PROLONG_UNSET_JUDGE_KEY is not set"),
    ("eval-judge-url-not-http", ["evaluation.run", "--model", "{model}", "--tasks", "narrativeqa",
                                 "--judge_base_url", "judge.example.com/v1"], "is not an http(s) URL"),
]

# where a run may write (prolong/checkpoint/ownership.py): never over its inputs, never into the user's folder
OWNERSHIP_CASES: list[tuple[str, list[str], str]] = [
    ("cpt-output-dir-is-the-model", cpt(output_dir="{model}"), "is this run's model_name_or_path"),
    ("cpt-output-dir-holds-the-model", cpt(model_name_or_path="demo_data/base-model", output_dir="demo_data"),
     "contains this run's model_name_or_path"),
    ("cpt-output-dir-is-a-mixture-domain", cpt(output_dir="{short}"), "is this run's dataset_mixture"),
    ("cpt-output-dir-holds-the-mixture", cpt(output_dir="{packed}"), "contains this run's dataset_mixture"),
    ("cpt-init-from-is-output-dir", cpt(init_from="demo_data/base-model", output_dir="demo_data/base-model"),
     "is also this run's output_dir"),
    ("cpt-output-dir-of-the-users-files", cpt(output_dir="."), "which no run of ours wrote there"),
    ("sft-output-dir-holds-the-dataset", sft(output_dir="{tmp}"), "contains this run's dataset_name"),
    ("sft-output-dir-is-the-tokenizer", sft(tokenizer_name_or_path="demo_data/base-model",
                                            output_dir="demo_data/base-model"), "is this run's tokenizer_name_or_path"),
]

# prolong-data build (issue 23): a data recipe is checked whole before anything is read or written
BUILD_RECIPES = "{repo}/tests/fixtures/data_build"
BUILD_CASES: list[tuple[str, list[str], str]] = [
    ("build-recipe-missing", ["prolong-data", "build", "{tmp}/nope.yaml", "--tokenizer", "{model}", "--out", "{tmp}/b0"],
     "data recipe not found: {tmp}/nope.yaml"),
    ("build-unknown-key", ["prolong-data", "build", BUILD_RECIPES + "/unknown-key.yaml", "--tokenizer", "{model}",
                           "--out", "{tmp}/b1"], "unknown key 'min_lenght'; did you mean 'min_length'?"),
    ("build-shares-not-1", ["prolong-data", "build", BUILD_RECIPES + "/shares.yaml", "--tokenizer", "{model}",
                            "--out", "{tmp}/b2"], "the shares sum to 0.9, not 1"),
    ("build-source-missing", ["prolong-data", "build", BUILD_RECIPES + "/missing-source.yaml", "--tokenizer", "{model}",
                              "--out", "{tmp}/b3"], "domain 'web': files: not found:"),
    ("build-bad-mode", ["prolong-data", "build", BUILD_RECIPES + "/bad-mode.yaml", "--tokenizer", "{model}",
                        "--out", "{tmp}/b4"], "mode must be long or short, got 'sft'"),
    ("build-document-length-on-short", ["prolong-data", "build", BUILD_RECIPES + "/document-length-short.yaml",
                                        "--tokenizer", "{model}", "--out", "{tmp}/b5"],
     "document_length applies to mode long only"),
    ("build-out-not-a-build", ["prolong-data", "build", "{repo}/recipes/prolong-8b/data-64k.yaml", "--tokenizer",
                               "{model}", "--out", "{model}"], "is not a `prolong-data build` folder"),
]

ALL_CASES = (PARSE_CASES + CPT_CASES + SFT_CASES + DATA_CASES + EVAL_CASES + DEMO_CASES + RESUME_CASES
             + DATA_EVAL_SAFETY_CASES + OWNERSHIP_CASES + BUILD_CASES)


def _fill(argv: list[str], places: dict[str, str]) -> list[str]:
    filled = []
    for arg in argv:
        for key, value in places.items():
            arg = arg.replace("{" + key + "}", value)
        filled.append(arg)
    return filled


DOCUMENTS = [f"document {i} " + "the of and to in is " * (i % 17 + 1) for i in range(200)]
CHAT = [{"role": "user", "content": "the of and"}, {"role": "assistant", "content": "to in"}]


def write_bad_data(tmp) -> None:
    """The bad files and folders of the prolong-data cases, next to ``{tmp}/tokenized`` (a valid one)."""
    bpe_tokenizer(DOCUMENTS, 300, ["<|endoftext|>"]).save_pretrained(tmp / "tokenizer_no_eos")
    strict = train_tiny_tokenizer()
    strict.chat_template = ("{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
                            "{{ raise_exception('roles must alternate user/assistant') }}{% endif %}"
                            "{{ m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}")  # as Llama-2's does
    strict.save_pretrained(tmp / "tokenizer_strict_chat")
    (tmp / "good.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in DOCUMENTS[:20]))
    (tmp / "latin1.jsonl").write_bytes(b'{"text": "caf\xe9"}\n')
    (tmp / "binary.jsonl").write_bytes(bytes(range(256)) * 8)
    (tmp / "empty.jsonl").write_bytes(b"")
    (tmp / "invalid.jsonl").write_text('{"text": "a"}\n{"text": \n')
    (tmp / "missing_field.jsonl").write_text('{"text": "a b"}\n{"body": "c"}\n{"text": "d"}\n')
    (tmp / "number_text.jsonl").write_text('{"text": 42}\n{"text": 7}\n')
    (tmp / "mixed_text.jsonl").write_text('{"text": "a b"}\n{"text": 7}\n')
    (tmp / "chat_no_role.jsonl").write_text(json.dumps({"messages": CHAT}) + "\n"
                                            + json.dumps({"messages": [{"content": "x"}] + CHAT[1:]}) + "\n")
    (tmp / "chat_two_users.jsonl").write_text(json.dumps({"messages": CHAT[:1] + CHAT}) + "\n")
    (tmp / "chat_no_assistant.jsonl").write_text(json.dumps({"messages": CHAT[:1]}) + "\n")
    (tmp / "table.csv").write_text("id,body\n1,hello world\n")
    (tmp / "empty.txt").write_bytes(b"")
    (tmp / "plain_dir").mkdir()
    (tmp / "plain_dir" / "notes.txt").write_text("hello\n")
    datasets.Dataset.from_dict({"text": ["a", "b", None, "c"]}).save_to_disk(str(tmp / "saved_nulls"))
    datasets.Dataset.from_dict({"text": []}).save_to_disk(str(tmp / "saved_empty"))
    datasets.Dataset.from_dict({"input_ids": [[1, 2, 3]] * 4}).save_to_disk(str(tmp / "raw_saved"))
    tokenize_to_disk(datasets.Dataset.from_dict({"text": DOCUMENTS}), train_tiny_tokenizer(), tmp / "tokenized",
                     domain="d")
    pack_dataset(tmp / "tokenized", tmp / "packed-short", mode="short", length=16)
    shutil.copytree(tmp / "tokenized", tmp / "truncated")
    arrow = tmp / "truncated" / "data-00000-of-00001.arrow"
    arrow.write_bytes(arrow.read_bytes()[: arrow.stat().st_size // 2])
    released = MDS_RELEASED.replace("{repo}", REPO)
    import_mds(released, tmp / "domains")  # one packed dataset per domain
    shutil.copytree(os.path.join(released, "books"), tmp / "mds_truncated")
    shard = tmp / "mds_truncated" / "proc00-0" / "shard.00001.mds"
    shard.write_bytes(shard.read_bytes()[:-10])


@pytest.fixture(scope="module")
def places(tmp_path_factory, tiny_model_dir, packed_mixture) -> dict[str, str]:
    tmp = tmp_path_factory.mktemp("bad-inputs")
    cwd = tmp / "cwd"
    (cwd / "demo_data").mkdir(parents=True)
    (cwd / "unfinished" / "checkpoint-10").mkdir(parents=True)  # a stage stopped before its final save
    shutil.copytree(tiny_model_dir, cwd / "demo_data" / "base-model")
    (tmp / "a-file").write_text("not a directory\n")
    with open(tmp / "chat.jsonl", "w") as f:
        for i in range(8):
            f.write(json.dumps({"messages": [{"role": "user", "content": "the of and to " * (i + 1)},
                                             {"role": "assistant", "content": "in is that"}]}) + "\n")
    (tmp / "bad.yaml").write_text("model_name_or_path: [unclosed\nmax_length: 128\n")
    (tmp / "list.yaml").write_text("- model_name_or_path\n- max_length\n")
    (tmp / "typo.yaml").write_text("model_name_or_path: demo_data/base-model\nrope_thetta: 1.0e6\n")
    (tmp / "twice.yaml").write_text("model_name_or_path: demo_data/base-model\nmax_length: 128\nmax_length: 512\n")
    (tmp / "recipe.txt").write_text("model_name_or_path: demo_data/base-model\n")
    (tmp / "folder.yaml").mkdir()
    (tmp / "text.jsonl").write_text('{"text": "the of and"}\n{"text": "to in is"}\n')
    (tmp / "roles.jsonl").write_text(json.dumps({"messages": [{"role": "human", "content": "the"},
                                                              {"role": "gpt", "content": "of"}]}) + "\n")
    long_dir = write_packed_dataset(str(tmp / "long"), random_documents(8, 300, 130, 200, 3), 128, "long")
    with open(os.path.join(long_dir, "prolong_data.json")) as f:
        meta = json.load(f)
    meta["mode"] = "long"
    with open(os.path.join(long_dir, "prolong_data.json"), "w") as f:
        json.dump(meta, f)
    write_bad_data(tmp)
    short = next(p for p in packed_mixture if p.endswith("short"))
    return {"model": tiny_model_dir, "mixture": json.dumps(packed_mixture), "short": short, "long": long_dir,
            "chat": str(tmp / "chat.jsonl"), "file": str(tmp / "a-file"), "tmp": str(tmp), "repo": REPO,
            "cwd": str(cwd), "packed": os.path.dirname(short)}


def _env() -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([REPO, os.path.join(REPO, "tests")]),
               TOKENIZERS_PARALLELISM="false", PYTHONHASHSEED="0")  # a message that prints a set: one order
    env.pop("PROLONG_TRACEBACK", None)
    return env


@pytest.fixture(scope="module")
def results(request, tmp_path_factory, places) -> dict[str, dict]:
    """Run every selected case once: the batched ones in one process, the `alone-` ones in their own."""
    selected = {item.callspec.id for item in request.session.items
                if getattr(item, "originalname", None) == TEST_NAME and hasattr(item, "callspec")}
    watch = [places["tmp"], places["model"], places["packed"], os.path.join(REPO, "tests", "fixtures")]
    cases = [{"id": case_id, "argv": _fill(argv, places), "watch": watch}
             for case_id, argv, _ in ALL_CASES if case_id in selected]
    batched = [case for case in cases if not case["id"].startswith("alone-")]
    out: dict[str, dict] = {}
    if batched:
        driver_dir = str(tmp_path_factory.mktemp("cli-driver"))  # outside the watched folders
        cases_file, results_file = os.path.join(driver_dir, "cases.json"), os.path.join(driver_dir, "results.json")
        with open(cases_file, "w") as f:
            json.dump(batched, f)
        driver = subprocess.run([sys.executable, os.path.join(REPO, "tests", "cli_driver.py"), cases_file, results_file],
                                cwd=places["cwd"], env=_env(), capture_output=True, text=True, timeout=600)
        if os.path.exists(results_file):
            with open(results_file) as f:
                out.update(json.load(f))
        for case in batched:
            out.setdefault(case["id"], {"code": driver.returncode, "stdout": driver.stdout, "stderr": driver.stderr,
                                        "changed": []})
    for case in cases:
        if case["id"].startswith("alone-"):
            before = snapshot(watch)
            run = subprocess.run(command_line(case["argv"]), cwd=places["cwd"], env=_env(), capture_output=True,
                                 text=True, timeout=300)
            out[case["id"]] = {"code": run.returncode, "stdout": run.stdout, "stderr": run.stderr,
                               "changed": changes(before, snapshot(watch))}
    return out


def _message(stderr: str, places: dict[str, str]) -> str:
    """The error line a user sees, with this run's temporary paths written back as placeholders."""
    lines = [line for line in stderr.splitlines() if "error:" in line] or stderr.strip().splitlines()[-1:]
    message = lines[-1] if lines else ""
    for key, value in sorted(places.items(), key=lambda kv: -len(kv[1])):
        if key not in ("mixture",) and value:
            message = message.replace(value, "{" + key + "}")
    return message


def _shown(argv: list[str]) -> str:
    """A case as typed, with the valid tiny run's unchanged flags shown as `...`."""
    valid = {"run_cpt": VALID_CPT, "run_sft": VALID_SFT}.get(argv[0])
    if valid is None or len(argv) < 3 or not argv[1].startswith("--"):
        return " ".join(argv)
    kept, i = [], 1
    while i < len(argv):
        key = argv[i][2:] if argv[i].startswith("--") else None
        if key in valid and i + 1 < len(argv) and argv[i + 1] == valid[key]:
            i += 2
            continue
        kept.append(argv[i])
        i += 1
    missing = [key for key in valid if f"--{key}" not in argv]
    return " ".join([argv[0], "..."] + kept) + (f"  (without --{', --'.join(missing)})" if missing else "")


def write_table(path: str, results: dict[str, dict], places: dict[str, str]) -> None:
    """docs/bad-inputs.md: every case, as typed, and the message it gives (regenerate with
    ``BAD_INPUTS_TABLE=docs/bad-inputs.md pytest tests/test_bad_inputs.py``)."""
    rows = ["| case | command line | exit | message |", "| --- | --- | --- | --- |"]
    for case_id, argv, _ in ALL_CASES:
        if case_id in results:
            cell = lambda text: text.replace("|", "\\|").replace("\n", " ")  # noqa: E731
            rows.append(f"| {case_id} | `{cell(_shown(argv))}` | {results[case_id]['code']} | "
                        f"{cell(_message(results[case_id]['stderr'], places))} |")
    with open(path) as f:
        head = f.read().split("<!-- table -->")[0]
    with open(path, "w") as f:
        f.write(head + "<!-- table -->\n\n" + "\n".join(rows) + "\n")


@pytest.fixture(scope="module", autouse=True)
def _table(results, places):
    yield
    if os.environ.get("BAD_INPUTS_TABLE"):
        write_table(os.environ["BAD_INPUTS_TABLE"], results, places)


@pytest.mark.parametrize("argv, fragment", [pytest.param(argv, fragment, id=case_id)
                                            for case_id, argv, fragment in ALL_CASES])
def test_bad_input_is_refused_clearly(request, results, places, argv, fragment):
    result = results[request.node.callspec.id]
    stderr = result["stderr"]
    shown = f"exit {result['code']}\n--- stderr ---\n{stderr[-3000:]}\n--- stdout ---\n{result['stdout'][-1000:]}"
    assert "Traceback" not in stderr, shown
    assert result["code"] == 2, shown
    assert _fill([fragment], places)[0].lower() in stderr.lower(), shown
    # one form for every CLI (prolong.errors.cli_errors, argparse): PROG[ SUBCOMMAND]: error: MESSAGE
    assert re.match(r"[\w.-]+( [\w-]+)?: error: ", _message(stderr, places)), shown
    changed = result["changed"]
    assert changed == [], "a refused input changed files (+ added, - removed, ~ rewritten):\n" + "\n".join(changed)
