"""The ``farm`` command line: build models, run the embedded store, render clips.

Bad input ends with one line naming the value and what is allowed, exit status 2,
and nothing written.
"""

from __future__ import annotations

import argparse
import logging
import secrets
import sys
import tempfile
from pathlib import Path

from farm import __version__

log = logging.getLogger("farm")


class CliError(Exception):
    """A user error: printed as one line, exit status 2."""


# Commands --------------------------------------------------------------------
def cmd_model_init(args: argparse.Namespace) -> int:
    _quiet_libraries(args)
    from farm.render.tiny import build_tiny_wan, build_tiny_wan_i2v, build_tiny_wan_ti2v
    from farm.render.tiny_ltx2 import build_tiny_ltx2

    if args.kind not in ("tiny", "tiny-i2v", "tiny-ti2v", "tiny-ltx2"):
        raise CliError(f"model kind {args.kind!r} is not buildable here; allowed: tiny, tiny-i2v, tiny-ti2v, tiny-ltx2")
    if args.kind == "tiny-i2v" and args.experts != 1:
        raise CliError(f"--experts: {args.experts} is not buildable for tiny-i2v (Wan 2.1 I2V has one expert); allowed: 1")
    if args.kind == "tiny-ti2v" and args.experts != 1:
        raise CliError(f"--experts: {args.experts} is not buildable for tiny-ti2v (Wan 2.2 TI2V has one expert); "
                       "allowed: 1")
    if args.kind == "tiny-ltx2" and args.experts != 1:
        raise CliError(f"--experts: {args.experts} is not buildable for tiny-ltx2 (LTX-2 has one transformer); allowed: 1")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise CliError(f"--out: {out} exists and is not a folder")
    if args.kind == "tiny-i2v":
        path = build_tiny_wan_i2v(out, seed=args.seed)
    elif args.kind == "tiny-ti2v":
        path = build_tiny_wan_ti2v(out, seed=args.seed)
    elif args.kind == "tiny-ltx2":
        path = build_tiny_ltx2(out, seed=args.seed)
    else:
        path = build_tiny_wan(out, experts=args.experts, seed=args.seed)
    print(path)
    return 0


def cmd_model_list(args: argparse.Namespace) -> int:
    from farm.render.tiny import is_built

    settings = _settings(args)
    for spec in settings.models:
        local = Path(spec.path)
        where = ("built" if is_built(local) else "not built") if local.is_absolute() else "remote"
        print(f"{spec.id}\t{spec.path}\t{where}\tsizes={','.join(spec.sizes)}\tseconds={spec.seconds}")
    return 0


def cmd_storage(args: argparse.Namespace) -> int:
    from farm.storage.connect import embedded_server, running_embedded

    settings = _settings(args)
    if settings.storage.mode != "embedded":
        raise CliError("storage: the configured store is external; there is nothing to start or stop here")
    if args.action == "start":
        server = embedded_server(settings)
        server.start()
        print(server.settings().endpoint_url)
    elif args.action == "stop":
        running = running_embedded(settings)
        if running is None:
            print("not running")
        else:
            running.stop()
            print("stopped")
    else:
        running = running_embedded(settings)
        print(f"running at {running.settings().endpoint_url}" if running else "not running")
    return 0


def cmd_render(args: argparse.Namespace) -> int:
    _quiet_libraries(args)
    from farm.render.registry import validate_request

    settings = _settings(args)
    try:
        spec = settings.model(args.model)
        size = args.size or settings.render.default_size
        seconds = settings.render.default_seconds if args.seconds is None else args.seconds
        seed = secrets.randbelow(2**31) if args.seed is None else args.seed
        params = validate_request(
            spec, prompt=args.prompt, size=size, seconds=seconds, steps=args.steps, seed=seed, scheduler=args.scheduler
        )
    except ValueError as exc:
        raise CliError(str(exc)) from None
    if args.shard_steps is not None and not 1 <= args.shard_steps <= params.steps:
        raise CliError(f"--shard-steps: {args.shard_steps} is out of range; allowed: 1..{params.steps}")
    out = _checked_out_path(args.out) if args.out else None
    image = _reference_image(spec, args.image)

    # Everything the user typed is valid: only now start services or write files.
    from farm.jobs.local import render_clip
    from farm.storage.connect import open_store

    _ensure_model(settings, spec)
    store = open_store(settings)
    with _TqdmProgress(params.steps, enabled=not args.quiet) as progress:
        result = render_clip(settings, spec, params, store, shard_steps=args.shard_steps, out=out, progress=progress,
                             image=image)
    print(f"video_id: {result.video_id}")
    print(f"seed:     {params.seed}")
    print(f"s3:       {result.uris['video']}")
    print(f"local:    {result.local_video}")
    return 0


def _farm_settings_with_ray(args: argparse.Namespace):
    """Settings, with Ray's auth token and node address in place before anything imports ray.

    The farm's Ray is on loopback when `farm up` started it on a loopback node address
    (the default), so this driver must take the loopback address as its own too.
    """
    from farm import env
    from farm.runtime import FarmRuntime

    settings = _settings(args)
    if getattr(args, "node_address", None):
        settings = settings.model_copy(update={"cluster": settings.cluster.model_validate(
            {"node_address": args.node_address})})
    env.use_ray_token(settings.state_dir)
    runtime = FarmRuntime.load(settings.state_dir)
    if runtime is not None:
        ray_host = runtime.ray_address.rsplit(":", 1)[0]
    elif getattr(args, "address", None):
        ray_host = args.address.rsplit(":", 1)[0]
    else:
        ray_host = settings.cluster.node_address
    if ray_host in ("127.0.0.1", "localhost", "::1", "[::1]"):
        env.use_loopback_ray()
    return settings


def cmd_up(args: argparse.Namespace) -> int:
    _quiet_libraries(args)  # it builds the tiny models a fresh state folder lacks
    settings = _farm_settings_with_ray(args)
    from farm import cluster

    deployment = Path(args.deployment) if args.deployment else cluster.default_deployment_file()
    try:
        runtime = cluster.up(settings, deployment, address=args.address, port=args.port, metrics_port=args.metrics_port)
    except (cluster.FarmError, ValueError) as exc:
        raise CliError(_one_line(exc)) from None
    print(f"farm is up: {runtime.http_url}/v1  (OpenAI base_url)")
    if runtime.metrics_url:
        print(f"metrics:    {runtime.metrics_url}")
    print("stop it with: farm down")
    return 0


def cmd_deploy(args: argparse.Namespace) -> int:
    settings = _farm_settings_with_ray(args)
    from farm import cluster

    deployment = Path(args.deployment) if args.deployment else cluster.default_deployment_file()
    try:
        runtime = cluster.redeploy(settings, deployment)
    except (cluster.FarmError, ValueError) as exc:
        raise CliError(_one_line(exc)) from None
    runtime.save(settings.state_dir)
    print(f"deployed {deployment} to the farm at {runtime.http_url}")
    return 0


def cmd_down(args: argparse.Namespace) -> int:
    settings = _farm_settings_with_ray(args)
    from farm import cluster

    print("farm stopped" if cluster.down(settings) else "no farm was up")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    import json

    settings = _farm_settings_with_ray(args)
    from farm import cluster

    try:
        report = cluster.status(settings)
    except cluster.FarmError as exc:
        raise CliError(_one_line(exc)) from None
    if args.json:
        print(json.dumps(report, indent=2, default=str))
        return 0
    print(f"app {report['app']}: {report['app_status']}   http {report['http']}   metrics {report['metrics']}")
    for name, dep in sorted(report["deployments"].items()):
        replicas = ", ".join(f"{k.lower()}={v}" for k, v in dep["replicas"].items())
        print(f"  {name:<40} {dep['status']:<10} {replicas}")
    farm = report["dispatcher"]
    depths = ", ".join(f"{k}={v}" for k, v in farm["queue_depths"].items())
    print(f"queue: {depths}   in flight: {len(farm['active'])}/{farm['max_in_flight']}   jobs: {farm['counts']}")
    for pool, waiting in sorted(farm["waiting"].items()):
        replicas = len(farm["pools"].get(pool, []))
        print(f"  pool {pool:<36} {replicas} replica(s), waiting: interactive={waiting['interactive']} "
              f"bulk={waiting['bulk']}, busy {farm['busy_s'].get(pool, 0):.1f}s")
    for job in farm["recent"]:
        print(f"  {job['id']}  {job['model']:<12} {job['status']:<12} {job['progress']:>3}%")
    return 0


def cmd_submit(args: argparse.Namespace) -> int:
    """Send one prompt to the running farm through its OpenAI-style API, as any client would."""
    import httpx
    import openai

    from farm.runtime import running_farm

    settings = _settings(args)
    runtime = running_farm(settings)
    if runtime is None:
        raise CliError(f"no farm is up for {settings.state_dir}; start one with `farm up`")
    out = _checked_out_path(args.out) if args.out else None
    client = openai.OpenAI(base_url=f"{runtime.http_url}/v1", api_key=_tenant_key(args, settings.state_dir),
                           max_retries=2)
    body = {k: v for k, v in (("seed", args.seed), ("steps", args.steps), ("priority", args.priority)) if v is not None}
    request = {"prompt": args.prompt, "extra_body": body}
    for field in ("model", "size"):
        if getattr(args, field):
            request[field] = getattr(args, field)
    if args.seconds is not None:
        request["seconds"] = str(args.seconds)
    try:
        video = client.videos.create(**request)
    except openai.APIStatusError as exc:
        raise CliError(_api_error(exc)) from None
    print(f"video_id: {video.id}")
    if not args.wait:
        return 0
    from farm.follow import follow

    with _TqdmProgress(100, enabled=not args.quiet, unit="%") as bar:
        def show(update: dict) -> None:
            ahead = update.get("queue_position")
            bar.stage(f"queued, {ahead} ahead" if update["status"] == "queued" or ahead is not None
                      else update["status"])
            bar.advance_to(update.get("progress") or 0)

        try:
            final, how = follow(f"{runtime.http_url}", client.api_key, video.id, show)
        except httpx.HTTPStatusError as exc:
            raise CliError(_api_error(exc)) from None
        bar.advance_to(100 if final["status"] == "completed" else final.get("progress") or 0)
    log.info("followed %s by %s", video.id, how)
    if final["status"] != "completed":
        error = (final.get("error") or {}).get("message") or "no error message"
        raise CliError(f"video {video.id} ended {final['status']}: {error}")
    print(f"s3:       s3://{settings.storage.bucket}/videos/{video.id}/video.mp4")
    if out is not None:
        out.write_bytes(client.videos.download_content(video.id, variant="video").read())
        print(f"local:    {out}")
    return 0


def _tenant_key(args: argparse.Namespace, state_dir: Path) -> str:
    from farm.cli_accounts import AccountCliError, tenant_key

    try:
        return tenant_key(args, state_dir)
    except AccountCliError as exc:
        raise CliError(str(exc)) from None


def _on_running_farm(args: argparse.Namespace, run) -> int:
    """``run(args, gateway_url, state_dir)`` against the farm that is up; its errors as CliError."""
    from farm.cli_accounts import AccountCliError
    from farm.runtime import running_farm

    settings = _settings(args)
    runtime = running_farm(settings)
    if runtime is None:
        raise CliError(f"no farm is up for {settings.state_dir}; start one with `farm up`")
    try:
        return run(args, runtime.http_url, settings.state_dir)
    except AccountCliError as exc:
        raise CliError(str(exc)) from None


def cmd_accounts(args: argparse.Namespace) -> int:
    """invite / redeem / whoami / keys: talk to the running farm's account routes."""
    from farm.cli_accounts import run

    return _on_running_farm(args, run)


def cmd_optout(args: argparse.Namespace) -> int:
    """optout add / list / remove / grant / revoke: the running farm's protected-name registry."""
    from farm.cli_policy import run

    return _on_running_farm(args, run)


def _api_error(exc) -> str:
    """The gateway's OpenAI-shaped error already names the field and what is allowed."""
    try:
        return exc.response.json()["error"]["message"]
    except (ValueError, KeyError, TypeError):
        return f"the farm answered HTTP {exc.status_code}"


def cmd_verify(args: argparse.Namespace) -> int:
    """Check a clip as a viewer would: it decodes, and its C2PA manifest validates."""
    from farm.finish.media import probe_mp4
    from farm.finish.lineage import verify_chain
    from farm.finish.provenance import ensure_dev_credentials, verify

    path = Path(args.file)
    if not path.is_file():
        raise CliError(f"file: {path} does not exist")
    settings = _settings(args)
    try:
        info = probe_mp4(path)
    except Exception as exc:  # PyAV raises several types for unreadable media
        raise CliError(f"file: {path} is not a playable MP4 ({_one_line(exc)})") from None
    anchors = Path(args.trust_anchors).read_text() if args.trust_anchors else None
    if anchors is None and not settings.signer.has_credentials:
        anchors = ensure_dev_credentials(settings.state_dir / "c2pa").ca_cert.read_text()
    result = verify(path, anchors)
    print(f"video: {info.frames} frames {info.width}x{info.height} @ {float(info.fps):g} fps, {info.codec}/{info.pix_fmt}")
    print(f"c2pa:  {result.state}")
    for failure in result.failures:
        print(f"       {failure}")
    # The ingredient chain of a remix, edit or extension, link by link down to the original.
    chain = verify_chain(path, anchors)
    if len(chain.links) > 1:
        print(f"chain: {chain.state}, {len(chain.links)} links")
        for line in chain.lines():
            print(f"       {line}")
        for link in chain.broken:
            print(f"broken: {link.where}")
    return 0 if result.state == "Trusted" and chain.state == "Trusted" else 1


# Helpers ---------------------------------------------------------------------
def _settings(args: argparse.Namespace):
    from farm.config import load_settings

    try:
        return load_settings(Path(args.config) if args.config else None)
    except (OSError, ValueError) as exc:
        raise CliError(f"config: {_one_line(exc)}") from None


def _ensure_model(settings, spec) -> None:
    """Build an embedded tiny model on first use; real weights are never built here."""
    from farm.render.tiny import build_tiny_by_id, is_built, is_tiny_id

    path = Path(spec.path)
    if is_built(path) or not path.is_absolute():
        return
    if not is_tiny_id(spec.id) or path.parent != settings.models_dir:
        raise CliError(f"model {spec.id!r}: no saved pipeline at {path}")
    print(f"building tiny model {spec.id} at {path} …", file=sys.stderr)
    build_tiny_by_id(spec.id, path)


def _reference_image(spec, value: str | None):
    """The ``--image`` file as a Pillow image, checked against what the model takes."""
    if value is None:
        if spec.takes_image:
            raise CliError(f"--image: model {spec.id!r} renders from an image; give one (PNG, JPEG or WebP)")
        return None
    if not spec.takes_image:
        raise CliError(f"--image: model {spec.id!r} renders from text only and takes no image")
    from farm.render.reference import open_reference

    try:
        return open_reference(Path(value).expanduser().read_bytes())
    except OSError as exc:
        raise CliError(f"--image: cannot read {value!r} ({exc.strerror})") from None
    except ValueError as exc:
        raise CliError(f"--image: {value!r}: {_one_line(exc)}") from None


def _checked_out_path(value: str) -> Path:
    out = Path(value).expanduser()
    if out.suffix.lower() != ".mp4":
        raise CliError(f"--out: {value!r} must end in .mp4")
    if out.is_dir():
        raise CliError(f"--out: {value!r} is a folder; give a file path ending in .mp4")
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        raise CliError(f"--out: folder {str(parent)!r} does not exist")
    try:  # the only reliable writability check (root ignores mode bits, read-only mounts do not)
        with tempfile.NamedTemporaryFile(dir=parent, prefix=".farm-probe-"):
            pass
    except OSError as exc:
        raise CliError(f"--out: cannot write to folder {str(parent)!r} ({exc.strerror})") from None
    return out.resolve()


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())


class _TqdmProgress:
    """Progress bar over denoising steps, its label naming the current stage."""

    def __init__(self, steps: int, enabled: bool, unit: str = "step") -> None:
        self.steps = steps
        self.unit = unit
        self.enabled = enabled
        self.bar = None

    def __enter__(self):
        from tqdm import tqdm

        self.bar = tqdm(total=self.steps, unit=self.unit, disable=not self.enabled, file=sys.stderr, leave=True)
        return self

    def __exit__(self, *exc) -> None:
        self.bar.close()

    def stage(self, name: str) -> None:
        self.bar.set_description(f"{name:>8}")

    def step(self, index: int, total: int) -> None:
        self.bar.update(1)

    def advance_to(self, value: int) -> None:
        if value > self.bar.n:
            self.bar.update(value - self.bar.n)


def _whole_number(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="farm", description="videofarm: a text-to-video render farm on Ray.")
    parser.add_argument("--version", action="version", version=f"videofarm {__version__}")
    parser.add_argument("--config", help="YAML settings file (default: $FARM_CONFIG, else built-in defaults)")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", required=True)

    model = sub.add_parser("model", help="build or list models").add_subparsers(dest="action", required=True)
    init = model.add_parser(
        "init", help="build a tiny model with save_pretrained (random weights; a Wan VAE set to reconstruct images)")
    init.add_argument("kind", help="what to build: tiny (Wan text-to-video), tiny-i2v (Wan 2.1 image-to-video), "
                      "tiny-ti2v (Wan 2.2 TI2V image-to-video) or tiny-ltx2 (LTX-2 text-to-video with audio)")
    init.add_argument("--out", required=True, help="folder to save the pipeline into")
    init.add_argument("--experts", type=int, choices=(1, 2), default=1, help="2: the Wan 2.2 two-expert layout")
    init.add_argument("--seed", type=_whole_number, default=0,
                      help="seed for the random weights (the VAE fit has its own fixed seed)")
    init.set_defaults(func=cmd_model_init)
    listing = model.add_parser("list", help="the model registry")
    listing.set_defaults(func=cmd_model_list)

    storage = sub.add_parser("storage", help="the embedded SeaweedFS S3 server")
    storage.add_argument("action", choices=("start", "stop", "status"))
    storage.set_defaults(func=cmd_storage)

    render = sub.add_parser("render", help="render one clip in this process and upload it")
    render.add_argument("prompt", help="what to render (any language; Japanese works)")
    render.add_argument("--model", help="model id (default: the registry's first)")
    render.add_argument("--size", help="WIDTHxHEIGHT, one the model supports")
    render.add_argument("--seconds", type=_whole_number, help="clip length in seconds")
    render.add_argument("--steps", type=_whole_number, help="denoising steps")
    render.add_argument("--seed", type=_whole_number, help="random seed (default: random, printed)")
    render.add_argument("--shard-steps", type=_whole_number, help="steps per shard (default from settings)")
    render.add_argument("--scheduler", default="unipc", help="unipc (default) or flow-euler")
    render.add_argument("--out", help="also copy the MP4 here")
    render.add_argument("--image", help="reference image (PNG, JPEG, WebP) for an image-to-video model")
    render.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    render.set_defaults(func=cmd_render)

    up = sub.add_parser("up", help="start Ray (or join one), S3 and the job store, and deploy the farm")
    up.add_argument("--address", help="join this Ray cluster (host:port) instead of starting one")
    up.add_argument("--deployment", help="Serve config file (default: deployments/local.yaml)")
    up.add_argument("--port", type=_whole_number, help="HTTP port (default: the deployment file's)")
    up.add_argument("--node-address", help="address the Ray head binds and advertises (default: cluster.node_address, "
                    "127.0.0.1: everything on loopback)")
    up.add_argument("--metrics-port", type=_whole_number, help="Prometheus port of Ray's metrics export")
    up.set_defaults(func=cmd_up)
    redeploy = sub.add_parser("deploy", help="apply a Serve config file to the running farm (a rolling update)")
    redeploy.add_argument("--deployment", help="Serve config file (default: deployments/local.yaml)")
    redeploy.set_defaults(func=cmd_deploy)
    down = sub.add_parser("down", help="stop what `farm up` started")
    down.set_defaults(func=cmd_down)
    stat = sub.add_parser("status", help="pools, replicas, queue depths and recent jobs")
    stat.add_argument("--json", action="store_true", help="machine-readable output")
    stat.set_defaults(func=cmd_status)

    submit = sub.add_parser("submit", help="send a prompt to the running farm (POST /v1/videos)")
    submit.add_argument("prompt", help="what to render")
    submit.add_argument("--model", help="model id or alias, e.g. sora-2 (default: the farm's first)")
    submit.add_argument("--size", help="WIDTHxHEIGHT")
    submit.add_argument("--seconds", type=_whole_number, help="clip length in seconds")
    submit.add_argument("--steps", type=_whole_number, help="denoising steps")
    submit.add_argument("--seed", type=_whole_number, help="random seed")
    submit.add_argument("--priority", choices=("interactive", "bulk"), help="queue priority")
    submit.add_argument("--wait", action="store_true",
                        help="follow it to the end (its event stream, else polling), with a progress bar")
    submit.add_argument("--out", help="with --wait: download the MP4 here")
    submit.add_argument("--api-key", help="API key (default: VIDEOFARM_API_KEY, else the one `farm redeem` saved)")
    submit.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    submit.set_defaults(func=cmd_submit)

    from farm.cli_accounts import add_commands

    add_commands(sub, cmd_accounts)

    from farm.cli_schedule import add_commands as add_schedule_commands

    add_schedule_commands(sub)

    from farm.cli_policy import add_commands as add_policy_commands

    add_policy_commands(sub, cmd_optout)

    check = sub.add_parser(
        "verify", help="check that an MP4 decodes and its C2PA manifest, with its ingredient chain, is trusted")
    check.add_argument("file", help="the MP4 to check")
    check.add_argument("--trust-anchors", help="PEM file of trusted root CAs (default: the dev CA)")
    check.set_defaults(func=cmd_verify)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except CliError as exc:
        print(f"farm: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("farm: interrupted", file=sys.stderr)
        return 130


def _quiet_libraries(args: argparse.Namespace) -> None:
    """diffusers/transformers draw their own loading bars; the CLI has one bar of its own. Called
    by the commands that load models only: importing both costs seconds every other command
    (`farm status`, `farm whoami`, ...) need not pay."""
    if args.verbose:
        return
    try:
        from diffusers.utils import logging as dlog

        dlog.disable_progress_bar()
        dlog.set_verbosity_error()
        from transformers.utils import logging as tlog

        tlog.disable_progress_bar()
        tlog.set_verbosity_error()
    except ImportError:
        pass


if __name__ == "__main__":
    sys.exit(main())
