"""`loradock adapters sign` and the `--sign-key` option of the commands that make versions."""

from __future__ import annotations

import argparse
from pathlib import Path

from loradock.commands.common import registry_from
from loradock.registry.signing import KEY_HELP, SIGNATURE_FILE, short_id

SIGN_KEY_HELP = (f"sign the new version with this private key file ({KEY_HELP}); the signature is "
                 f"{SIGNATURE_FILE} in the version directory and the manifest records the signer")


def add_sign_key_argument(parser: argparse.ArgumentParser) -> None:
    """`--sign-key KEY` for a command that publishes a version (publish, pull, merge)."""
    parser.add_argument("--sign-key", type=Path, metavar="KEY", help=SIGN_KEY_HELP)


def add_sign_parser(actions: argparse._SubParsersAction) -> None:
    sign = actions.add_parser(
        "sign", help="sign an existing version",
        description="Sign the version REF means with an EC private key, in the OpenSSF model-signing "
        f"format ({SIGNATURE_FILE} beside its files; its digest does not change). The files are "
        "rehashed against the manifest first. Running servers with a trust policy re-check it. "
        "Prints REF and the signer's key id.",
    )
    sign.add_argument("ref", help="adapter reference: NAME, NAME@N or NAME@ALIAS")
    sign.add_argument("--key", type=Path, required=True, metavar="KEY", help=f"private key file ({KEY_HELP})")
    sign.add_argument("--replace", action="store_true",
                      help="replace a signature by another key (default: refuse)")
    sign.set_defaults(func=cmd_sign)


def cmd_sign(args: argparse.Namespace) -> int:
    version, key_id = registry_from(args).sign(args.ref, args.key, replace=args.replace)
    print(f"{version.ref} signed by {short_id(key_id)} ({key_id})")
    return 0
