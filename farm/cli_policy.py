"""`farm optout add|list|remove|grant|revoke`: the protected-name registry from the command line.

By default the commands are the operator's (the admin key: ``FARM_ADMIN_KEY``, else the key
`farm up` wrote under the state folder) and reach every entry through ``/v1/admin/…``. With
``--api-key`` (or ``--as-holder``, which takes ``VIDEOFARM_API_KEY`` or the saved key) ``add``,
``list`` and ``remove`` act as that rights holder on its own works and characters
(``/v1/protected_names``). ``grant``/``revoke`` give an account the rights-holder role or take it.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

from farm.cli_accounts import AccountCliError, _admin_key, _call, tenant_key

KINDS = ("work", "character", "public_figure")


def add_commands(sub: argparse._SubParsersAction, func) -> None:
    """Register ``farm optout``; ``func`` runs it against the running farm (``cli.cmd_optout``)."""
    optout = sub.add_parser("optout", help="protected works, characters and public figures (content policy)")
    actions = optout.add_subparsers(dest="action", required=True)
    add = actions.add_parser("add", help="register a protected name")
    add.add_argument("--kind", choices=KINDS, required=True, help="what the name is")
    add.add_argument("--name", required=True, help="the name (matched like an alias)")
    add.add_argument("--alias", action="append", default=[], help="another spelling (repeatable)")
    add.add_argument("--holder", default="", help="operator: the rights holder's name")
    listing = actions.add_parser("list", help="list protected names")
    listing.add_argument("--kind", choices=KINDS, help="operator: only this kind")
    remove = actions.add_parser("remove", help="delete a protected name")
    remove.add_argument("id", help="the entry id (pn_…)")
    grant = actions.add_parser("grant", help="operator: make an account a rights holder")
    grant.add_argument("account_id", help="the account (acct_…)")
    grant.add_argument("--holder", required=True, help="the rights holder it speaks for")
    revoke = actions.add_parser("revoke", help="operator: take the rights-holder role away (entries stay)")
    revoke.add_argument("account_id", help="the account (acct_…)")
    for name in ("add", "list", "remove"):
        actions.choices[name].add_argument("--api-key", help="act as this rights holder's key, not the operator")
        actions.choices[name].add_argument("--as-holder", action="store_true",
                                           help="act as the rights holder of VIDEOFARM_API_KEY or the saved key")
    for action in actions.choices.values():
        action.set_defaults(func=func, command="optout")


def _line(entry: dict[str, Any]) -> str:
    aliases = ", ".join(entry["aliases"]) or "-"
    holder = f"  [{entry['holder']}]" if entry["holder"] else ""
    return f"{entry['id']}  {entry['kind']:<13} {entry['name']}{holder}  aliases: {aliases}"


def run(args: argparse.Namespace, base_url: str, state_dir: Path) -> int:
    """One ``farm optout`` command against the farm at ``base_url``."""
    holder = getattr(args, "api_key", None) or getattr(args, "as_holder", False)
    key = tenant_key(args, state_dir) if holder else _admin_key(state_dir)
    base = "/v1/protected_names" if holder else "/v1/admin/protected_names"
    if args.action == "add":
        body: dict[str, Any] = {"kind": args.kind, "name": args.name, "aliases": args.alias}
        if holder and (args.holder or args.kind == "public_figure"):
            raise AccountCliError("a rights holder registers works and characters under the holder name the "
                                  "operator granted; --holder and --kind public_figure are the operator's")
        if not holder:
            body["holder"] = args.holder
        made = _call(base_url, "POST", base, key, body)
        print(f"added:   {_line(made)}")
    elif args.action == "list":
        query: dict[str, str] = {"kind": args.kind} if args.kind and not holder else {}
        while True:  # every page
            page = _call(base_url, "GET", f"{base}?{urlencode(query | {'limit': '1000'})}", key)
            for entry in page["data"]:
                print(_line(entry))
            if not page["has_more"]:
                break
            query["after"] = page["last_id"]
    elif args.action == "remove":
        print(f"removed: {_call(base_url, 'DELETE', f'{base}/{args.id}', key)['id']}")
    elif args.action == "grant":
        granted = _call(base_url, "POST", "/v1/admin/rights_holders", key,
                        {"account_id": args.account_id, "holder": args.holder})
        print(f"granted: {granted['account_id']} is rights holder {granted['holder']!r}")
    else:
        _call(base_url, "DELETE", f"/v1/admin/rights_holders/{args.account_id}", key)
        print(f"revoked: {args.account_id} (its entries stay in force, managed by the operator)")
    return 0
