"""`prolong-data build RECIPE.yaml --tokenizer T --out DIR`: every domain of a data recipe, and its mixture.

For each source (domains reading the same source share one tokenization): read it (files, repository
folders, a Hub dataset, or an `hf://datasets/...` tokenized dataset), keep the rows `where` selects, join
rows into one document per `concat_by` value (code: one per repository, as ProLong built its data), tokenize
(tokenize.py), then pack each domain (pack.py) into DIR/<domain>. DIR/dataset_mixture.json is the
`dataset_mixture` a stage recipe trains on (JSON, so it is YAML too, and a command-line value).

Resumable: every tokenized and packed folder is written atomically (storage.atomic_output_dir), and
DIR/build.json records what each domain was built from. A second run keeps the domains whose folder is
complete and whose record and metadata match the recipe, builds the rest, and refuses a folder built from
another recipe or tokenizer (naming it) instead of mixing them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from pathlib import Path

import datasets

from .pack import pack_dataset
from .recipe import DataRecipe, DataRecipeError, DomainRecipe, domain_record
from .storage import METADATA_FILENAME, load_dataset_dir, read_metadata
from .tokenize import remove_scratch, scratch_cache_dir, special_token_ids, tokenize_to_disk, tokenizer_name

logger = logging.getLogger("prolong.data")

BUILD_FILENAME = "build.json"
MIXTURE_FILENAME = "dataset_mixture.json"
TOKENIZED_DIR = "tokenized"


def tokenizer_fingerprint(tokenizer, eos_token: str | None = None) -> str:
    """Changes when the token ids would: the vocabulary and the BOS/EOS each document gets."""
    vocab = sorted(tokenizer.get_vocab().items())
    specials = list(special_token_ids(tokenizer, eos_token))  # a tokenizer without EOS is refused here
    return hashlib.sha256(json.dumps([vocab, specials]).encode()).hexdigest()[:16]


def _write_json(path: Path, value) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(value, indent=2) + "\n", encoding="utf-8")
    tmp.replace(path)  # a killed run leaves the old file or the new one, never half of one


def _source_key(domain: DomainRecipe) -> str:
    digest = hashlib.sha256(json.dumps(domain.source(), sort_keys=True).encode()).hexdigest()[:8]
    return f"{source_label(domain)}-{digest}"


def source_label(domain: DomainRecipe) -> str:
    """The `domain` value of a source's rows: the name without a length suffix (book-65536 -> book), so the
    domains cut from one source (book-65536, book-524288) carry one label, as in ProLong's release."""
    return re.sub(r"-\d+$", "", domain.name) or domain.name


def _expected_metadata(domain: DomainRecipe, name_of_tokenizer: str) -> dict:
    expected = {"format": "prolong-packed", "mode": domain.mode, "length": domain.length,
                "tokenizer": name_of_tokenizer}
    if domain.mode == "long" and domain.document_length is None:
        expected["min_length"] = domain.min_length or domain.length
    return expected


def plan_build(recipe: DataRecipe, out: Path, name_of_tokenizer: str, fingerprint: str) -> tuple[dict, list[str]]:
    """(the build record to write, the domains already complete), or a DataRecipeError naming what is in the way.
    Reads only: nothing is written before every check has passed."""
    if out.exists() and not out.is_dir():
        raise DataRecipeError(f"--out {out} is a file; give a folder (created if missing)")
    record = {"tokenizer": name_of_tokenizer, "tokenizer_fingerprint": fingerprint, "recipe": recipe.path,
              "domains": {}}
    previous = None
    if (out / BUILD_FILENAME).is_file():
        try:
            previous = json.loads((out / BUILD_FILENAME).read_text(encoding="utf-8"))
        except ValueError as error:
            raise DataRecipeError(f"{out / BUILD_FILENAME} is not valid JSON ({error}); it was damaged: "
                                  "choose another --out") from None
        if previous.get("tokenizer_fingerprint") != fingerprint:
            raise DataRecipeError(f"--out {out} was built with another tokenizer ({previous.get('tokenizer')}); "
                                  "its token ids would mix with this one's. Choose another --out")
        record["domains"] = dict(previous.get("domains") or {})
    elif out.is_dir() and any(p for p in out.iterdir() if not p.name.startswith(".")):
        raise DataRecipeError(f"--out {out} holds files and is not a `prolong-data build` folder (no {BUILD_FILENAME}); "
                              "choose a new or empty folder")
    complete = []
    for domain in recipe.domains:
        folder = out / domain.name
        wanted = domain_record(domain)
        if folder.exists() and not (folder / METADATA_FILENAME).is_file():
            raise DataRecipeError(f"--out {out}: {folder} exists but is not a complete prolong-data output "
                                  f"(no {METADATA_FILENAME}); delete it to build domain '{domain.name}' again")
        if folder.exists():
            metadata = read_metadata(folder) or {}
            expected = _expected_metadata(domain, name_of_tokenizer)
            if "document_length" in metadata:  # recorded by `pack --document_length`
                expected["document_length"] = domain.document_length
            mismatched = {key: (metadata.get(key), value) for key, value in expected.items()
                          if metadata.get(key) != value}
            if record["domains"].get(domain.name) != wanted or mismatched:
                differences = ", ".join(f"{key} {got!r} (recipe: {want!r})" for key, (got, want) in mismatched.items())
                differences = differences or f"its source or filters differ from the record in {BUILD_FILENAME}"
                raise DataRecipeError(
                    f"--out {out}: domain '{domain.name}' was built from another recipe ({differences}); "
                    f"delete {folder} to build it again from this recipe, or choose another --out")
            complete.append(domain.name)
        record["domains"][domain.name] = wanted
    return record, complete


def _column(values: list, dotted: str) -> list:
    for part in dotted.split(".")[1:]:
        values = [value.get(part) if isinstance(value, dict) else None for value in values]
    return values


def _select_rows(raw: datasets.Dataset, domain: DomainRecipe, cache_dir: str) -> datasets.Dataset:
    """The rows whose `where` fields hold the given values (dotted names reach into struct columns)."""
    conditions = list((domain.where or {}).items())
    tops = sorted({name.split(".")[0] for name, _ in conditions})

    def keep(batch):
        mask = [True] * len(batch[tops[0]])
        for name, value in conditions:
            column = _column(batch[name.split(".")[0]], name)
            mask = [m and got == value for m, got in zip(mask, column)]
        return mask

    selected = raw.filter(keep, batched=True, desc=f"where {domain.name}",
                          cache_file_name=os.path.join(cache_dir, "selected.arrow"))
    if not len(selected):
        raise DataRecipeError(f"domain '{domain.name}': no row of its source matches where {domain.where}; "
                              "check the field names and values")
    return selected.remove_columns([t for t in tops if t not in (domain.concat_by, domain.path_field)])


def _concatenated(rows: datasets.Dataset, text_field: str, key: str, path: str | None):
    """One document per `key` value: its rows in `path` order, each under a header line with its path,
    joined by blank lines (what sources.read_repository makes of a repository folder)."""
    current, parts = None, []
    for start in range(0, len(rows), 4096):
        batch = rows[start:start + 4096]
        paths = batch[path] if path else [None] * len(batch[key])
        for group, name, text in zip(batch[key], paths, batch[text_field]):
            if group != current and parts:
                yield {"text": "\n\n".join(parts), "source": str(current)}
                parts = []
            current = group
            if isinstance(text, str) and text.strip():
                parts.append(f"{name}\n{text}" if name is not None else text)
    if parts:
        yield {"text": "\n\n".join(parts), "source": str(current)}


def _group_documents(raw: datasets.Dataset, domain: DomainRecipe, cache_dir: str) -> datasets.Dataset:
    order = [domain.concat_by] + ([domain.path_field] if domain.path_field else [])
    rows = raw.sort(order, indices_cache_file_name=os.path.join(cache_dir, "sorted-indices.arrow"))
    features = datasets.Features({"text": datasets.Value("string"), "source": datasets.Value("string")})
    return datasets.Dataset.from_generator(
        _concatenated, gen_kwargs={"rows": rows, "text_field": domain.text_field, "key": domain.concat_by,
                                   "path": domain.path_field}, features=features, cache_dir=cache_dir)


def load_source(domain: DomainRecipe, num_proc: int, cache_dir: str) -> tuple[datasets.Dataset, str]:
    """The source's documents as a raw dataset, and its text field."""
    from .sources import load_raw_inputs, load_repositories

    if domain.repos is not None:
        return load_repositories([domain.repos], num_proc=num_proc, cache_dir=cache_dir), "text"
    needed = tuple(sorted({name.split(".")[0] for name in domain.where or {}}
                          | {c for c in (domain.concat_by, domain.path_field) if c}))
    inputs = domain.files if domain.files is not None else [domain.hub]
    raw = load_raw_inputs(inputs, text_field=domain.text_field, split=domain.split, hub_config=domain.config,
                          num_proc=num_proc, cache_dir=cache_dir, keep_columns=needed)
    missing = [c for c in needed if c not in raw.column_names]
    if missing:
        raise DataRecipeError(f"domain '{domain.name}': its source has no field {missing[0]!r} (fields: "
                              f"{raw.column_names}); fix where / concat_by / path_field")
    if domain.where:
        raw = _select_rows(raw, domain, cache_dir)
    if domain.concat_by:
        return _group_documents(raw, domain, cache_dir), "text"
    return raw, domain.text_field


def _tokenized_source(domain: DomainRecipe, tokenizer, out: Path, num_proc: int, eos_token: str | None) -> Path:
    """The source's tokenized folder: a pushed one (hf://datasets/...), or DIR/tokenized/<source>, made
    (atomically) if a previous run did not finish it."""
    if domain.hub is not None and domain.hub.startswith("hf://"):
        return Path(_hub_tokenized(domain, tokenizer))
    folder = out / TOKENIZED_DIR / _source_key(domain)
    if (folder / METADATA_FILENAME).is_file():
        logger.info("source of %s: tokenized already (%s)", domain.name, folder)
        return folder
    cache = scratch_cache_dir(folder)
    try:
        raw, text_field = load_source(domain, num_proc, cache)
        tokenize_to_disk(raw, tokenizer, folder, text_field=text_field, domain=source_label(domain),
                         num_proc=num_proc, eos_token=eos_token, cache_dir=cache)
    finally:
        remove_scratch(cache)
    return folder


def _hub_tokenized(domain: DomainRecipe, tokenizer) -> str:
    from .hub import resolve_dataset_dir

    local = resolve_dataset_dir(domain.hub)
    metadata = read_metadata(local) or {}
    if metadata.get("format") != "prolong-tokenized":
        raise DataRecipeError(f"domain '{domain.name}': {domain.hub} holds a {metadata.get('format') or 'non-prolong'} "
                              "dataset; an hf://datasets address in a data recipe names a `prolong-data tokenize` "
                              "output pushed with `prolong-data push` (or give the raw data's Hub id)")
    if metadata.get("tokenizer") != tokenizer_name(tokenizer):
        raise DataRecipeError(f"domain '{domain.name}': {domain.hub} was tokenized with {metadata.get('tokenizer')}, "
                              f"not {tokenizer_name(tokenizer)}; give its raw source to tokenize it again")
    return local


def _pack_domain(domain: DomainRecipe, tokenized: Path, out: Path, name_of_tokenizer: str) -> dict:
    data: datasets.Dataset | Path = tokenized
    if (read_metadata(tokenized) or {}).get("chat"):
        # continued pre-training learns every token of a conversation (ProLong's Tulu-v2 rows have no mask)
        data = load_dataset_dir(tokenized).remove_columns(["mask"])
    extra = {"document_length": domain.document_length} if domain.document_length is not None else {}
    return pack_dataset(data, out / domain.name, mode=domain.mode, length=domain.length,
                        min_length=domain.min_length, tokenizer_name=name_of_tokenizer, **extra)


def mixture_paths(recipe: DataRecipe, out_as_given: str) -> dict[str, float]:
    """`dataset_mixture` of the built domains: paths as --out was given (relative stays relative)."""
    return {os.path.join(out_as_given, domain.name): domain.share for domain in recipe.domains}


def build(recipe: DataRecipe, tokenizer, out_dir: str | os.PathLike, *, num_proc: int = 1,
          keep_tokenized: bool = False, eos_token: str | None = None) -> dict:
    """Build every domain of `recipe` into `out_dir`; returns the dataset_mixture written beside them."""
    out = Path(out_dir).absolute()
    name = tokenizer_name(tokenizer)
    record, complete = plan_build(recipe, out, name, tokenizer_fingerprint(tokenizer, eos_token))
    for domain in recipe.domains:
        if domain.document_length is not None and not _pack_takes_document_length():
            raise DataRecipeError(f"domain '{domain.name}': document_length needs `pack --document_length`, "
                                  "which this version of prolong-data does not have")
    out.mkdir(parents=True, exist_ok=True)
    _write_json(out / BUILD_FILENAME, record)
    for domain_name in complete:
        logger.info("domain %s: complete, kept (%s)", domain_name, out / domain_name)
    by_source: dict[str, list[DomainRecipe]] = {}
    for domain in recipe.domains:
        by_source.setdefault(_source_key(domain), []).append(domain)
    for domains in by_source.values():
        todo = [d for d in domains if d.name not in complete]
        if not todo:
            continue
        tokenized = _tokenized_source(todo[0], tokenizer, out, num_proc, eos_token)
        for domain in todo:
            logger.info("domain %s: packing %s mode, length %d", domain.name, domain.mode, domain.length)
            _pack_domain(domain, tokenized, out, name)
        if not keep_tokenized and tokenized.is_relative_to(out):
            shutil.rmtree(tokenized, ignore_errors=True)  # every domain of this source is complete
    tokenized_root = out / TOKENIZED_DIR
    if tokenized_root.is_dir() and not any(tokenized_root.iterdir()):
        tokenized_root.rmdir()
    mixture = mixture_paths(recipe, str(out_dir))
    _write_json(out / MIXTURE_FILENAME, mixture)
    return mixture


def _pack_takes_document_length() -> bool:
    import inspect

    return "document_length" in inspect.signature(pack_dataset).parameters


def summary(out_dir: str | os.PathLike, recipe: DataRecipe) -> dict:
    """Per domain: rows, tokens and share, read back from the packed folders (printed by the CLI)."""
    out = Path(out_dir)
    domains = {}
    for domain in recipe.domains:
        metadata = read_metadata(out / domain.name) or {}
        domains[domain.name] = {"share": domain.share, "mode": domain.mode, "length": domain.length,
                                "num_sequences": metadata.get("num_sequences"), "num_tokens": metadata.get("num_tokens")}
    return {"dataset_mixture": str(out / MIXTURE_FILENAME), "domains": domains}

