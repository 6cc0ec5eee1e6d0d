"""A data recipe: the domains of one training stage, each with its public source, filters, packing and share.

`prolong-data build RECIPE.yaml --tokenizer T --out DIR` (prolong/data/build.py) turns it into one packed
dataset per domain plus the `dataset_mixture` a stage recipe trains on. The file is checked here, before
anything is read or written: one message per problem, naming the domain and the key.

    length: 65536                      # the stage's sequence length (a domain may set its own)
    domains:
      book-65536:
        share: 0.30                    # share of training tokens; the shares sum to 1
        hub: cerebras/SlimPajama-627B  # or files: [a.jsonl, b.parquet], or repos: DIR (one folder per repository)
        split: train
        text_field: text
        where: {meta.redpajama_set_name: RedPajamaBook}   # keep rows whose field has this value
        mode: long                     # long: documents of >= min_length tokens; short: concatenated
        min_length: 65536
"""

from __future__ import annotations

import difflib
import math
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import yaml

from prolong.io.hub import looks_like_hub_id
from prolong.yaml_files import load_yaml

BUILD_MODES = ("long", "short")  # sft rows (conversations packed whole, shorter rows) train through run_sft
SOURCE_KEYS = ("hub", "files", "repos")


class DataRecipeError(ValueError):
    """The data recipe is wrong; the message names the domain, the key and the fix."""


@dataclass
class DomainRecipe:
    name: str
    share: float
    mode: str
    hub: str | None = None            # a Hub dataset id, read with datasets.load_dataset
    files: list[str] | None = None    # local jsonl/json/parquet/csv/txt files or save_to_disk folders
    repos: str | None = None          # a local folder: each immediate entry is one code repository
    config: str | None = None         # the Hub dataset's config
    split: str = "train"
    text_field: str = "text"          # a string column, or chat `messages` (rendered with the chat template)
    where: dict | None = None         # keep only rows whose field equals the value (dotted names reach into structs)
    concat_by: str | None = None      # one document per value of this field (code: the repository name) ...
    path_field: str | None = None     # ... its rows in this field's order, each under a header line with it
    length: int | None = None         # tokens per packed row (default: the recipe's length)
    min_length: int | None = None     # long: documents shorter than this are dropped (default: document or row length)
    document_length: int | None = None  # long: rows of length / document_length documents of this many tokens

    def source(self) -> dict:
        """What the tokenized documents depend on: domains with the same source share one tokenization."""
        keys = ("hub", "files", "repos", "config", "split", "text_field", "where", "concat_by", "path_field")
        return {key: getattr(self, key) for key in keys if getattr(self, key) is not None}

    def packing(self) -> dict:
        return {"mode": self.mode, "length": self.length, "min_length": self.min_length,
                "document_length": self.document_length}


@dataclass
class DataRecipe:
    path: str
    length: int
    domains: list[DomainRecipe] = field(default_factory=list)

    def mixture(self) -> dict[str, float]:
        return {domain.name: domain.share for domain in self.domains}


_DOMAIN_FIELDS = {f.name: f for f in fields(DomainRecipe) if f.name != "name"}
_TOP_KEYS = ("length", "domains")


def _unknown(key: str, valid, where: str) -> DataRecipeError:
    close = difflib.get_close_matches(key, list(valid), n=1, cutoff=0.6)
    hint = f"; did you mean '{close[0]}'?" if close else f"; valid keys: {', '.join(valid)}"
    return DataRecipeError(f"{where}: unknown key '{key}'{hint}")


def _positive_int(value, where: str, minimum: int = 2) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise DataRecipeError(f"{where} must be a whole number of tokens, {minimum} or more, got {value!r}")
    return value


def _domain(name, spec, recipe_dir: Path, default_length: int) -> DomainRecipe:
    where = f"domain '{name}'"
    if not isinstance(name, str) or not name or "/" in name or name.startswith("."):
        raise DataRecipeError(f"domain name {name!r}: a domain is a folder name (no '/', not starting with '.')")
    if not isinstance(spec, dict):
        raise DataRecipeError(f"{where} must be a mapping of key: value (share, hub/files/repos, mode, ...)")
    for key in spec:
        if key not in _DOMAIN_FIELDS:
            raise _unknown(key, _DOMAIN_FIELDS, where)
    for key in ("share", "mode"):
        if key not in spec:
            raise DataRecipeError(f"{where} has no '{key}'" + (": give its share of training tokens, e.g. share: 0.1"
                                                                if key == "share" else ": give mode: long or mode: short"))
    sources = [key for key in SOURCE_KEYS if spec.get(key) is not None]
    if len(sources) != 1:
        raise DataRecipeError(f"{where} needs exactly one source, hub: ID, files: [PATHS] or repos: DIR "
                              f"(it gives {', '.join(sources) or 'none'})")
    domain = DomainRecipe(name=name, **spec)
    share = domain.share
    if isinstance(share, bool) or not isinstance(share, (int, float)) or not share >= 0:
        raise DataRecipeError(f"{where}: share must be a number >= 0, got {share!r}")
    if domain.mode not in BUILD_MODES:
        raise DataRecipeError(f"{where}: mode must be long or short, got {domain.mode!r} (conversations for SFT "
                              "are packed with `prolong-data pack --mode sft` and trained with run_sft)")
    domain.length = _positive_int(domain.length if domain.length is not None else default_length, f"{where}: length")
    if domain.mode == "short":
        for key in ("document_length", "min_length"):
            if getattr(domain, key) is not None:
                raise DataRecipeError(f"{where}: {key} applies to mode long only (short documents are concatenated "
                                      f"whatever their length); remove {key} or set mode: long")
    if domain.document_length is not None:
        _positive_int(domain.document_length, f"{where}: document_length")
        if domain.length % domain.document_length:
            raise DataRecipeError(f"{where}: document_length {domain.document_length} must divide length "
                                  f"{domain.length} (each row holds length / document_length documents)")
    if domain.min_length is not None:
        _positive_int(domain.min_length, f"{where}: min_length")
    for key in ("hub", "repos", "config", "split", "text_field", "concat_by", "path_field"):
        value = getattr(domain, key)
        if value is not None and not (isinstance(value, str) and value):
            raise DataRecipeError(f"{where}: {key} must be a non-empty string, got {value!r}")
    if domain.hub is not None and not (looks_like_hub_id(domain.hub) or domain.hub.startswith("hf://datasets/")):
        raise DataRecipeError(f"{where}: hub {domain.hub!r} is not a Hub dataset id (ORG/NAME); for local files "
                              "use files: [PATH, ...]")
    if domain.where is not None and not (isinstance(domain.where, dict) and domain.where):
        raise DataRecipeError(f"{where}: where must be a mapping of field: value, e.g. "
                              "{meta.redpajama_set_name: RedPajamaBook}")
    if domain.path_field is not None and domain.concat_by is None:
        raise DataRecipeError(f"{where}: path_field orders the rows of one document; it needs concat_by")
    if domain.repos is not None and (domain.concat_by or domain.where or domain.text_field != "text"):
        raise DataRecipeError(f"{where}: repos: DIR makes one document per repository folder already; "
                              "remove concat_by / where / text_field")
    if domain.files is not None:
        files = [domain.files] if isinstance(domain.files, str) else domain.files
        if not (isinstance(files, list) and files and all(isinstance(f, str) and f for f in files)):
            raise DataRecipeError(f"{where}: files must be a list of paths, got {domain.files!r}")
        domain.files = [_local(f, recipe_dir, f"{where}: files") for f in files]
    if domain.repos is not None:
        domain.repos = _local(domain.repos, recipe_dir, f"{where}: repos", folder=True)
    return domain


def _local(path: str, recipe_dir: Path, where: str, folder: bool = False) -> str:
    """A local source, relative paths taken from the recipe's folder; missing is an error now, not mid-build."""
    resolved = Path(os.path.expanduser(path))
    resolved = resolved if resolved.is_absolute() else recipe_dir / resolved
    if not resolved.exists():
        raise DataRecipeError(f"{where}: not found: {resolved} (relative paths are read from the recipe's folder, "
                              f"{recipe_dir})")
    if folder and not resolved.is_dir():
        raise DataRecipeError(f"{where}: {resolved} is a file; repos: names a folder whose sub-folders are repositories")
    return str(resolved)


def parse_data_recipe(path: str | os.PathLike) -> DataRecipe:
    """Read and check a data recipe (YAML; a key given twice is refused)."""
    path = Path(path)
    if not path.is_file():
        raise DataRecipeError(f"data recipe not found: {path}" + (" (a folder)" if path.is_dir() else ""))
    try:
        raw = load_yaml(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as error:
        raise DataRecipeError(f"{path} is not valid YAML: {error}".strip()) from None
    if not isinstance(raw, dict):
        raise DataRecipeError(f"{path} must be a mapping with length: and domains:")
    for key in raw:
        if key not in _TOP_KEYS:
            raise _unknown(key, _TOP_KEYS, str(path))
    if "length" not in raw:
        raise DataRecipeError(f"{path}: no 'length': give the stage's sequence length in tokens, e.g. length: 65536")
    length = _positive_int(raw["length"], f"{path}: length")
    domains = raw.get("domains")
    if not isinstance(domains, dict) or not domains:
        raise DataRecipeError(f"{path}: 'domains' must map each domain's name to its source, packing and share")
    recipe = DataRecipe(str(path), length, [_domain(name, spec, path.parent.absolute(), length)
                                           for name, spec in domains.items()])
    total = sum(d.share for d in recipe.domains)
    if not math.isclose(total, 1.0, abs_tol=1e-6):
        raise DataRecipeError(f"{path}: the shares sum to {total:.6g}, not 1 "
                              f"({', '.join(f'{d.name} {d.share:g}' for d in recipe.domains)}); rescale them")
    return recipe


def domain_record(domain: DomainRecipe) -> dict:
    """The domain as recorded in a build folder: what its data depends on (its share does not)."""
    record = asdict(domain)
    record.pop("share")
    return record
