"""`prolong-data push`: a tokenized or packed dataset directory (or several) to a Hub dataset repo,
with a dataset card written from the directories' `prolong_data.json`.

Layout on the Hub: one folder per config (one config per domain directory), each holding the
directory exactly as `prolong-data` wrote it (`data-*.arrow`, `state.json`, `dataset_info.json`,
`prolong_data.json`), plus the card `README.md` at the root. The card's YAML `configs` points
each config at its Arrow files, so `datasets.load_dataset("ORG/NAME", CONFIG)` reads them with
datasets' own Arrow builder, document spans (`indices`) included; a downloaded config folder is
also a `load_from_disk` directory. The first config is the default one, so a single-domain repo
loads with `load_dataset("ORG/NAME")`.

Everything goes up in ONE commit (huggingface_hub's create_commit): a failed push leaves the
repository as it was. The same card is written next to the data by `pack` / `import-mds`
(`write_local_card`), so it can be read before pushing.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import datasets
import pyarrow.compute as pc

from prolong.io.hub import hub_errors, parse_hf_dataset_address

from .storage import METADATA_FILENAME, read_metadata

logger = logging.getLogger("prolong.data")

CARD_FILENAME = "README.md"
PUSHED_FILENAME = "prolong_hub.json"  # written after a successful push: where this directory went
REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}")
FORMATS = ("prolong-packed", "prolong-tokenized")
_COMMAND_BLOCK = re.compile(r"## How it was made\n\n```bash\n(.*?)\n```", re.S)


class HubPushError(ValueError):
    """An expected failure of `prolong-data push` (bad input or the Hub refusing): one line, exit 2."""


class HubDatasetError(ValueError):
    """A Hub dataset named in a mixture or a `prolong-data` command cannot be used as given."""


@dataclass
class DatasetPart:
    config: str        # config name on the Hub (the directory's name)
    directory: Path
    metadata: dict
    num_rows: int
    num_documents: int  # packed: document spans; tokenized: rows
    info: datasets.DatasetInfo


def check_repo_id(repo_id: str | None) -> str:
    if not repo_id:
        raise HubPushError("--repo-id is required: the Hub dataset to push to, as ORG/NAME")
    if not REPO_ID.fullmatch(repo_id) or ".." in repo_id or repo_id.endswith((".git", ".")):
        raise HubPushError(f"--repo-id {repo_id!r} is not a Hub repository id: use ORG/NAME "
                           "(letters, digits, '-', '_', '.'; e.g. my-org/prolong-64K)")
    return repo_id


def _config_name(directory: Path) -> str:
    return re.sub(r"[^\w.-]", "_", directory.name) or "default"


def _read_part(directory: Path) -> DatasetPart:
    try:
        metadata = read_metadata(directory) or {}
    except ValueError as error:  # a damaged prolong_data.json: the message names it
        raise HubPushError(str(error)) from None
    if metadata.get("format") not in FORMATS or not (directory / "state.json").is_file():
        raise HubPushError(f"{directory} is not a prolong-data dataset (no {METADATA_FILENAME} with format "
                           f"{' or '.join(FORMATS)}, or no state.json): push the output of `prolong-data "
                           "tokenize`, `pack` or `import-mds`, or a folder holding such outputs")
    try:
        dataset = datasets.load_from_disk(str(directory))
    except Exception as error:  # a truncated or foreign Arrow file
        raise HubPushError(f"{directory}: cannot read the dataset ({type(error).__name__}: {error})") from error
    if "indices" in dataset.column_names:
        spans = dataset.with_format("arrow", columns=["indices"])[:]["indices"]
        num_documents = int(pc.sum(pc.list_value_length(spans)).as_py() or 0)
    else:
        num_documents = len(dataset)
    config = _config_name(directory)
    files = sorted(directory.glob("data-*.arrow"))
    info = datasets.DatasetInfo(
        features=dataset.features,
        config_name=config,
        splits=datasets.SplitDict.from_split_dict(
            [{"name": "train", "num_bytes": dataset.data.nbytes, "num_examples": len(dataset)}]),
        download_size=sum(f.stat().st_size for f in files),
        dataset_size=dataset.data.nbytes,
    )
    return DatasetPart(config, directory, metadata, len(dataset), num_documents, info)


def find_parts(directories: list[str | Path]) -> list[DatasetPart]:
    """Each directory is a prolong-data output, or a folder of them (a mixture: one config each)."""
    parts: list[DatasetPart] = []
    for given in directories:
        directory = Path(given)
        if not directory.is_dir():
            raise HubPushError(f"not found: {directory} (give a `prolong-data pack`/`tokenize` output directory)")
        if (directory / METADATA_FILENAME).exists():
            parts.append(_read_part(directory))
            continue
        children = sorted(p for p in directory.iterdir() if (p / METADATA_FILENAME).is_file())
        if not children:
            parts.append(_read_part(directory))  # raises the "not a prolong-data dataset" error
        parts += [_read_part(child) for child in children]
    names = [part.config for part in parts]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise HubPushError(f"two directories are named {duplicates[0]!r}: each becomes a config named after "
                           "its directory, so give them distinct names")
    return parts


def recorded_command(directory: Path) -> str | None:
    card = directory / CARD_FILENAME
    if card.is_file():
        match = _COMMAND_BLOCK.search(card.read_text(encoding="utf-8"))
        if match:
            return match.group(1)
    return None


def _part_table(parts: list[DatasetPart]) -> str:
    rows = ["| config | kind | mode | sequence length | rows | tokens | document spans | domains (tokens) | "
            "tokenizer | source |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for part in parts:
        meta = part.metadata
        domains = ", ".join(f"{name} ({tokens:,})" for name, tokens in (meta.get("domains") or {}).items())
        kind = "packed" if meta.get("format") == "prolong-packed" else "tokenized"
        length = f"{meta['length']:,}" if meta.get("length") else "-"
        rows.append(f"| `{part.config}` | {kind} | {meta.get('mode') or '-'} | {length} | {part.num_rows:,} | "
                    f"{int(meta.get('num_tokens') or 0):,} | {part.num_documents:,} | {domains or '-'} | "
                    f"{meta.get('tokenizer') or 'unknown'} | {meta.get('source') or 'see the command'} |")
    return "\n".join(rows)


def _folder(part: DatasetPart, local: bool, root: Path | None) -> str:
    """Where a config's Arrow files are, relative to the card."""
    if not local:
        return f"{part.config}/"
    if root is None:
        return ""
    return f"{part.directory.relative_to(root).as_posix()}/"


def build_dataset_card(parts: list[DatasetPart], *, repo_id: str | None = None, license: str = "other",
                       commands: dict[str, str | None] | None = None, local: bool = False,
                       root: Path | None = None):
    """A huggingface_hub DatasetCard whose YAML has the `configs`, `dataset_info`, license and tags
    the Hub reads. `local`: data_files point at the directory itself (the card next to the data)."""
    from datasets.info import DatasetInfosDict
    from datasets.utils.metadata import MetadataConfigs
    from huggingface_hub import DatasetCard, DatasetCardData

    modes = sorted({p.metadata.get("mode") for p in parts if p.metadata.get("mode")})
    kinds = sorted({"packed" if p.metadata.get("format") == "prolong-packed" else "tokenized" for p in parts})
    card_data = DatasetCardData(
        license=license,
        tags=["prolong", "long-context", *kinds, *modes],
        task_categories=["text-generation"],
        pretty_name=repo_id.split("/")[-1] if repo_id else (root.name if root else parts[0].config),
    )
    MetadataConfigs({
        part.config: {"data_files": [{"split": "train", "path": f"{_folder(part, local, root)}data-*.arrow"}],
                      **({"default": True} if index == 0 else {})}
        for index, part in enumerate(parts)
    }).to_dataset_card_data(card_data)
    DatasetInfosDict({part.config: part.info for part in parts}).to_dataset_card_data(card_data)
    commands = commands or {}
    load = f'load_dataset("{repo_id}"{", " + repr(parts[0].config) if len(parts) > 1 else ""})' if repo_id \
        else f'load_from_disk("{parts[0].directory}")'
    how = "\n\n".join(
        (f"`{part.config}`:\n\n" if len(parts) > 1 else "")
        + f"```bash\n{commands.get(part.config) or '(not recorded)'}\n```"
        for part in parts)
    if len(parts) == 1:
        how_section = f"## How it was made\n\n```bash\n{commands.get(parts[0].config) or '(not recorded)'}\n```"
    else:
        how_section = f"## How it was made\n\n{how}"
    kind_text = ("Packed with ProLong recipes' `prolong-data`: each row is `input_ids` plus `indices`, the "
                 "`[start, end)` spans of the documents it holds; the trainer restarts positions and blocks "
                 "attention at every span, so keep `indices` when you use the data.") if "packed" in kinds else ""
    if "tokenized" in kinds:
        kind_text += (" " if kind_text else "") + ("Tokenized with ProLong recipes' `prolong-data`: in a tokenized "
                                                   "config each row is one document (`input_ids`, `domain`), "
                                                   "ready for `prolong-data pack`.")
    body = f"""# {card_data.pretty_name}

{kind_text}

{_part_table(parts)}

Load it with `datasets.{load}`, or train on it by naming `hf://datasets/{repo_id or 'ORG/NAME'}/{parts[0].config}`
(one entry per config) in a recipe's `dataset_mixture`; `prolong-data inspect` takes the same address.

{how_section}
"""
    return DatasetCard(f"---\n{card_data.to_yaml()}\n---\n\n{body}")


def write_local_card(directory: str | Path, command: list[str] | str | None = None) -> list[Path]:
    """Write the dataset card into a finished prolong-data output (called by `pack` / `import-mds`):
    one per dataset directory, plus one for the whole folder when it holds several (one per domain).
    A card that cannot be written is a warning, never a failed command: the data is complete."""
    directory = Path(directory)
    if isinstance(command, list):
        command = shlex.join(command)
    if command:
        from prolong.redaction import redact

        command = redact(command)
    try:
        parts = find_parts([directory])
    except HubPushError as error:
        logger.warning("no dataset card written: %s", error)
        return []
    written = []
    for part in parts:
        card = build_dataset_card([part], commands={part.config: command}, local=True)
        written.append(_write_text(part.directory / CARD_FILENAME, str(card)))
    if len(parts) > 1:  # the folder itself: a mixture, one config per domain directory
        card = build_dataset_card(parts, commands={p.config: command for p in parts}, local=True, root=directory)
        written.append(_write_text(directory / CARD_FILENAME, str(card)))
    return written


def _write_text(path: Path, text: str) -> Path:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)
    return path


def hub_error_message(error: Exception, repo_id: str) -> str:
    """One line for a failed Hub call (huggingface_hub's HfHubHTTPError or a transport error)."""
    from huggingface_hub.errors import HfHubHTTPError

    if isinstance(error, HfHubHTTPError) and error.response is not None:
        status = error.response.status_code
        if status == 401:
            return (f"the Hub rejected the token (401) for {repo_id}: set a valid write token in "
                    "HF_TOKEN (or --hub_token) or run `hf auth login`")
        if status == 403:
            return (f"the token has no write access to {repo_id} (403): use a token with write "
                    "permission for that namespace, or push to your own ORG/NAME")
        return (f"the Hub answered {status} while pushing {repo_id}: nothing was committed; "
                f"try again later ({str(error).splitlines()[0]})")
    return (f"cannot reach the Hub to push {repo_id} ({type(error).__name__}: {error}); "
            "nothing was committed. Check the network or HF_ENDPOINT")


def _hub_error(error: Exception, repo_id: str) -> HubPushError:
    return HubPushError(hub_error_message(error, repo_id))


def push_dataset(directories: list[str | Path], repo_id: str, *, private: bool = False, revision: str | None = None,
                 license: str = "other", token: str | None = None, commit_message: str | None = None) -> str:
    """Push the directories as one dataset repo in one commit; returns the commit URL."""
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi, get_token

    check_repo_id(repo_id)
    parts = find_parts(directories)
    token = token or get_token()
    if not token:
        raise HubPushError("no Hugging Face token: set HF_TOKEN to a write token or run `hf auth login`")
    card = build_dataset_card(parts, repo_id=repo_id, license=license,
                              commands={p.config: recorded_command(p.directory) for p in parts})
    operations = [CommitOperationAdd(path_in_repo=CARD_FILENAME, path_or_fileobj=str(card).encode())]
    for part in parts:
        for file in sorted(part.directory.iterdir()):
            if file.is_file() and not file.name.startswith(".") and file.name not in (CARD_FILENAME, PUSHED_FILENAME):
                operations.append(CommitOperationAdd(path_in_repo=f"{part.config}/{file.name}",
                                                     path_or_fileobj=str(file)))
    api = HfApi(token=token)
    try:
        api.create_repo(repo_id, repo_type="dataset", private=private, exist_ok=True)
        if revision and revision != "main":
            api.create_branch(repo_id, repo_type="dataset", branch=revision, exist_ok=True)
        # a config folder holds exactly this push's files: a stale shard of an earlier push would
        # match the card's `CONFIG/data-*.arrow` and be read as data
        uploaded, configs = {op.path_in_repo for op in operations}, {p.config for p in parts}
        existing = api.list_repo_files(repo_id, repo_type="dataset", revision=revision)
        # the new card lists this push's configs only: an earlier push's other configs would stay in
        # the repository but leave the card (load_dataset could no longer read them)
        others = sorted({path.split("/")[0] for path in existing if path.count("/") == 1
                         and path.endswith(f"/{METADATA_FILENAME}")} - configs)
        if others:
            raise HubPushError(
                f"{repo_id} already holds the config(s) {', '.join(others)} of an earlier push, which this push's "
                "dataset card would leave out (load_dataset could no longer read them): push every config in one "
                "command (prolong-data push DIR1 DIR2 ... or their parent folder), or push to another --repo-id")
        stale = [path for path in existing if path.split("/")[0] in configs and path not in uploaded]
        operations += [CommitOperationDelete(path_in_repo=path) for path in stale]
        commit = api.create_commit(
            repo_id, repo_type="dataset", revision=revision, operations=operations,
            commit_message=commit_message or f"prolong-data push: {', '.join(p.config for p in parts)}",
        )
    except (*hub_errors(), OSError) as error:
        logger.debug("push failed", exc_info=True)
        raise _hub_error(error, repo_id) from error
    for part in parts:  # so a model card can name the Hub id of a mixture domain trained from here
        record = {"repo_id": repo_id, "config": part.config, "revision": revision or "main",
                  "commit_url": commit.commit_url}
        (part.directory / PUSHED_FILENAME).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    return commit.commit_url


def pushed_repo_id(directory: str | Path) -> str | None:
    """The Hub dataset a directory was pushed to with `prolong-data push`, if it was."""
    path = Path(directory) / PUSHED_FILENAME
    try:
        return json.loads(path.read_text(encoding="utf-8"))["repo_id"]
    except (OSError, ValueError, KeyError):
        return None


def resolve_dataset_dir(path: str | Path) -> str:
    """A local path as it is; a Hub dataset pushed by `prolong-data push` as the local folder of one
    of its configs, downloaded with huggingface_hub's snapshot_download (cached, so a second run and
    every rank after the first read the cache): `hf://datasets/ORG/NAME[@REVISION][/CONFIG]` (the
    config may be left out when the repository has one). A bare ORG/NAME stays a local path: a
    missing `demo_data/books` must say "not found", not try the network."""
    from huggingface_hub import snapshot_download

    text = str(path)
    address = parse_hf_dataset_address(text)
    if address is None:
        if text.startswith("hf://"):
            raise HubDatasetError(f"{text} is not a Hub dataset address: use hf://datasets/ORG/NAME/CONFIG "
                                  "(the config is a folder `prolong-data push` made)")
        return text
    repo_id, revision, config = address.repo_id, address.revision, address.config
    try:
        local = Path(snapshot_download(repo_id, repo_type="dataset", revision=revision,
                                       allow_patterns=[f"{config}/*", CARD_FILENAME] if config else None))
    except (*hub_errors(), OSError) as error:
        raise HubDatasetError(f"{text}: cannot download the Hub dataset {repo_id} ({type(error).__name__}: "
                              f"{str(error).splitlines()[0] if str(error) else ''}); check the id, the revision "
                              "and HF_TOKEN, or give a local directory") from error
    configs = sorted(p.name for p in local.iterdir() if (p / METADATA_FILENAME).is_file())
    if config is None and len(configs) == 1:
        config = configs[0]
    if config is None or config not in configs:
        raise HubDatasetError(f"{text}: the Hub dataset {repo_id} holds the configs {configs or 'none'} pushed by "
                              f"`prolong-data push`; name one: hf://datasets/{repo_id}/CONFIG")
    return str(local / config)


def add_push_parser(commands) -> argparse.ArgumentParser:
    push = commands.add_parser("push", help="upload tokenized/packed directories to a Hub dataset repo, with a card")
    push.add_argument("directories", nargs="+", metavar="DIR",
                      help="a prolong-data output, or a folder of them (each becomes one config)")
    push.add_argument("--repo-id", "--repo_id", dest="repo_id", help="Hub dataset id, ORG/NAME")
    push.add_argument("--private", action="store_true", help="create the repository as private")
    push.add_argument("--revision", help="branch to push to (created if missing; default: main)")
    push.add_argument("--license", default="other", help="license field of the card (default: other)")
    return push


def run_push(args: argparse.Namespace) -> int:
    """The `push` subcommand (its errors are prolong-data's: one line, exit 2)."""
    url = push_dataset(args.directories, args.repo_id, private=args.private, revision=args.revision,
                       license=args.license)
    print(json.dumps({"repo_id": args.repo_id, "revision": args.revision or "main", "commit_url": url}, indent=2))
    return 0
