"""`farm schedule add|list|pause|resume|delete`: cron schedules of batches on the running farm.

``add --file prompts.jsonl`` uploads the file with the ``openai`` SDK (``files.create``,
purpose ``batch``), then creates the schedule (``POST /v1/schedules``); every run is a batch of
that file. The key is ``--api-key``, ``VIDEOFARM_API_KEY`` or the one `farm redeem` saved.
"""

from __future__ import annotations

import argparse
import datetime as dt
from pathlib import Path
from typing import Any


def add_commands(sub: argparse._SubParsersAction) -> None:
    schedule = sub.add_parser("schedule", help="cron schedules whose every run is a batch of a prompts file")
    actions = schedule.add_subparsers(dest="action", required=True)
    add = actions.add_parser("add", help="upload a batch file and run it on a cron schedule")
    add.add_argument("--cron", required=True, help="five cron fields, e.g. '0 3 * * *' (03:00 every day)")
    add.add_argument("--tz", default="UTC", help="IANA time zone of the cron times, e.g. Asia/Tokyo (default UTC)")
    source = add.add_mutually_exclusive_group(required=True)
    source.add_argument("--file", help="a batch input file (JSONL: custom_id, method, url, body per line)")
    source.add_argument("--input-file-id", help="a file already uploaded with purpose 'batch'")
    add.add_argument("--missed", choices=("skip", "run_once"), default="skip",
                     help="a run missed while the farm was down: skip it (default), or run once on start")
    add.add_argument("--name", default="", help="a label")
    for name in ("list", "pause", "resume", "delete"):
        action = actions.add_parser(name, help=f"{name} schedules" if name == "list" else f"{name} a schedule")
        if name != "list":
            action.add_argument("id", help="the schedule id (sched_…)")
    for action in actions.choices.values():
        action.add_argument("--api-key", help="API key (default: VIDEOFARM_API_KEY, else the saved one)")
        action.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from farm.cli import CliError, _settings, _tenant_key
    from farm.cli_accounts import AccountCliError, _call
    from farm.runtime import running_farm

    settings = _settings(args)
    runtime = running_farm(settings)
    if runtime is None:
        raise CliError(f"no farm is up for {settings.state_dir}; start one with `farm up`")
    key = _tenant_key(args, settings.state_dir)
    base = runtime.http_url
    try:
        if args.action == "add":
            from farm.jobs.schedules import check_cron, check_timezone

            try:  # before the upload, so a typo leaves nothing behind
                check_cron(args.cron)
                check_timezone(args.tz)
            except ValueError as exc:
                raise CliError(str(exc)) from None
            file_id = args.input_file_id or _upload(base, key, args.file)
            try:
                made = _call(base, "POST", "/v1/schedules", key, {
                    "cron": args.cron, "timezone": args.tz, "input_file_id": file_id, "missed": args.missed,
                    "name": args.name})
            except AccountCliError:
                if not args.input_file_id:  # the file was only for this schedule
                    _call(base, "DELETE", f"/v1/files/{file_id}", key)
                raise
            print(f"schedule: {made['id']}  ({made['cron']} {made['timezone']}, missed runs: {made['missed']})")
            print(f"next run: {_when(made['next_run_at'], made['timezone'])}  (batches of {file_id})")
        elif args.action == "list":
            for s in _call(base, "GET", "/v1/schedules?limit=100", key)["data"]:
                state = "paused" if s["paused"] else "armed"
                print(f"{s['id']}  {state:<6}  {s['cron']:<15} {s['timezone']:<16} next {_when(s['next_run_at'], s['timezone'])}"
                      f"  runs {s['runs']}  skipped {s['skipped']}  last batch {s['last_batch_id'] or '-'}")
        elif args.action in ("pause", "resume"):
            s = _call(base, "POST", f"/v1/schedules/{args.id}/{args.action}", key)
            print(f"{s['id']}: {'paused' if s['paused'] else 'armed, next run ' + _when(s['next_run_at'], s['timezone'])}")
        else:
            _call(base, "DELETE", f"/v1/schedules/{args.id}", key)
            print(f"deleted: {args.id}")
    except AccountCliError as exc:
        raise CliError(str(exc)) from None
    return 0


def _upload(base_url: str, key: str, path: str) -> str:
    import openai

    from farm.cli import CliError, _api_error

    file = Path(path)
    if not file.is_file():
        raise CliError(f"--file: {path!r} is not a readable file")
    client = openai.OpenAI(base_url=f"{base_url}/v1", api_key=key, max_retries=2)
    try:
        with file.open("rb") as handle:
            return client.files.create(file=(file.name, handle), purpose="batch").id
    except openai.APIStatusError as exc:
        raise CliError(_api_error(exc)) from None


def _when(unix: Any, timezone: str) -> str:
    import zoneinfo

    if unix is None:
        return "-"
    return dt.datetime.fromtimestamp(unix, zoneinfo.ZoneInfo(timezone)).isoformat()
