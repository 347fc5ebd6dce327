"""`farm invite|redeem|keys|whoami`: invite-only onboarding from the command line.

The operator's commands use the admin key (``FARM_ADMIN_KEY``, else the key `farm up`
generated under the state folder); tenant commands use ``--api-key``, ``VIDEOFARM_API_KEY``,
or the key `farm redeem` saved (``<state>/api_key``, 0600).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from farm import env

API_KEY_FILE = "api_key"


class AccountCliError(Exception):
    pass


def saved_api_key(state_dir: Path) -> str | None:
    path = state_dir / API_KEY_FILE
    return path.read_text().strip() if path.is_file() else None


def tenant_key(args: argparse.Namespace, state_dir: Path) -> str:
    key = getattr(args, "api_key", None) or env.api_key() or saved_api_key(state_dir)
    if not key:
        raise AccountCliError("no API key: pass --api-key, set VIDEOFARM_API_KEY, or redeem an invite with "
                              "`farm redeem CODE` (it saves the key)")
    return key


def _admin_key(state_dir: Path) -> str:
    from farm.accounts.admin import read_admin_key

    key = env.admin_key()
    if key:
        return key
    try:
        return read_admin_key(state_dir)
    except FileNotFoundError as exc:
        raise AccountCliError(str(exc)) from None


def _call(base_url: str, method: str, path: str, key: str | None, body: dict | None = None) -> dict[str, Any]:
    import httpx

    headers = {"Authorization": f"Bearer {key}"} if key else {}
    try:
        reply = httpx.request(method, f"{base_url}{path}", json=body, headers=headers, timeout=30)
    except httpx.HTTPError as exc:
        raise AccountCliError(f"the farm at {base_url} did not answer: {exc}") from None
    if reply.status_code >= 400:
        try:
            message = reply.json()["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = f"HTTP {reply.status_code}"
        raise AccountCliError(message)
    return reply.json()


def _save_key(state_dir: Path, key: str) -> Path:
    path = state_dir / API_KEY_FILE
    state_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)  # an existing file keeps its mode through O_CREAT: tighten it
    with os.fdopen(fd, "w") as handle:
        handle.write(key)
    return path


def run(args: argparse.Namespace, base_url: str, state_dir: Path) -> int:
    """Dispatch one account command against the farm at ``base_url``."""
    if args.command == "invite":
        if args.action == "create":
            body: dict[str, Any] = {"note": args.note or ""}
            if args.expires_in is not None:
                body["expires_in"] = args.expires_in
            invite = _call(base_url, "POST", "/v1/admin/invites", _admin_key(state_dir), body)
            print(invite["code"] if args.quiet else f"invite: {invite['code']}  (single use, expires at unix "
                                                    f"{invite['expires_at']}; redeem with `farm redeem CODE`)")
        else:
            for invite in _call(base_url, "GET", "/v1/admin/invites", _admin_key(state_dir))["data"]:
                print(f"{invite['id']}  {invite['status']:<9} {invite['note']}")
        return 0
    if args.command == "redeem":
        reply = _call(base_url, "POST", "/v1/invites/redeem", None,
                      {"code": args.code, "account_name": args.name})
        key = reply["api_key"]["key"]
        print(f"account: {reply['account']['id']} ({reply['account']['name']})")
        print(f"api key: {key}  (shown once)")
        if not args.no_save:
            print(f"saved:   {_save_key(state_dir, key)}  (used by `farm submit`)")
        return 0
    key = tenant_key(args, state_dir)
    if args.command == "whoami":
        me = _call(base_url, "GET", "/v1/account", key)
        print(f"account: {me['id']} ({me['name']}), key {me['api_key_id']}")
        return 0
    if args.action == "list":
        for k in _call(base_url, "GET", "/v1/api_keys", key)["data"]:
            print(f"{k['id']}  {k['status']:<8} {k['hint']:<14} {k['name']}")
    elif args.action == "create":
        made = _call(base_url, "POST", "/v1/api_keys", key, {"name": args.name or "default"})
        print(f"api key: {made['key']}  (id {made['id']}; shown once)")
    else:
        if not args.id:
            raise AccountCliError("keys revoke: give the key id (see `farm keys list`)")
        gone = _call(base_url, "DELETE", f"/v1/api_keys/{args.id}", key)
        print(f"revoked: {gone['id']}")
    return 0


def add_commands(sub: argparse._SubParsersAction, func) -> None:
    """Register the account commands; ``func`` is the CLI's dispatcher for them."""
    invite = sub.add_parser("invite", help="operator: create or list invite codes (admin key)")
    invite.add_argument("action", choices=("create", "list"))
    invite.add_argument("--note", help="who the invite is for")
    invite.add_argument("--expires-in", type=int, help="seconds until it expires (default: settings)")
    invite.add_argument("-q", "--quiet", action="store_true", help="print only the code")
    invite.set_defaults(func=func, command="invite")
    redeem = sub.add_parser("redeem", help="redeem an invite: a new account and its first API key")
    redeem.add_argument("code", help="the invite code (vf_inv_…)")
    redeem.add_argument("--name", default="account", help="the account's name")
    redeem.add_argument("--no-save", action="store_true", help="do not save the key under the state folder")
    redeem.set_defaults(func=func, command="redeem")
    who = sub.add_parser("whoami", help="the account of the current API key")
    who.add_argument("--api-key", help="API key (default: VIDEOFARM_API_KEY, else the saved one)")
    who.set_defaults(func=func, command="whoami")
    keys = sub.add_parser("keys", help="list, create or revoke this account's API keys")
    keys.add_argument("action", choices=("list", "create", "revoke"))
    keys.add_argument("id", nargs="?", help="revoke: the key id")
    keys.add_argument("--name", help="create: a name for the key")
    keys.add_argument("--api-key", help="API key (default: VIDEOFARM_API_KEY, else the saved one)")
    keys.set_defaults(func=func, command="keys")
