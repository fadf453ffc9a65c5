"""`invdpo jobs ...` and `invdpo models promote`: the job API from the command line.

    invdpo jobs create --model M --training-file F [--method inversion_dpo] [--set beta=2000 ...] [--follow]
    invdpo jobs list [--status S] [--limit N] [--after ID]
    invdpo jobs get ID | cancel ID | pause ID | resume ID | checkpoints ID
    invdpo jobs events ID [--follow]
    invdpo models promote NAME VERSION [--force --reason TEXT]

The API is INVDPO_API_URL (default http://127.0.0.1:8000) and the key INVDPO_API_KEY. Every command takes
`--json` to print the API's JSON instead of text (`--follow` then prints JSON lines: events, then the final job).
An API error is one line, `error: <status> <detail>`, exit code 2. `--follow` exits with the job's outcome:
0 succeeded, 1 failed, 3 cancelled, 4 paused.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Iterator
from datetime import datetime
from typing import TYPE_CHECKING, Any, get_args

from invdpo_core.cli import CLIError
from invdpo_core.config import STATUSES, TERMINAL_STATUSES, ConfigError, Method, apply_overrides
from services.jobs.logs import mask_secrets

if TYPE_CHECKING:
    import httpx

DEFAULT_URL = "http://127.0.0.1:8000"
JOBS = "/v1/fine_tuning/jobs"
FOLLOW_EXIT = {"succeeded": 0, "failed": 1, "cancelled": 3, "paused": 4}
# httpx comes with the `service` extra; `pip install invdpo` alone still runs the core's commands.
MISSING_EXTRA = "the job commands need the service extra: pip install 'invdpo[service]' (httpx is not installed)"


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _field_error(error: dict[str, Any]) -> str:
    """A 422 entry as `field.path: message` (FastAPI's loc starts with where: body, query, path or header)."""
    loc = [str(p) for p in error.get("loc", [])]
    if loc and loc[0] in ("body", "query", "path", "header"):
        loc = loc[1:]
    path, message = ".".join(loc), str(error.get("msg", ""))
    # The API's own checks already start their message with the path.
    return message if not path or message.startswith(f"{path}:") else f"{path}: {message}"


def _error_line(response: httpx.Response) -> str:
    try:
        detail = response.json().get("detail")
    except (ValueError, AttributeError):
        detail = None
    if isinstance(detail, list):
        text = "; ".join(_field_error(e) for e in detail if isinstance(e, dict))
    else:
        text = str(detail) if detail else response.reason_phrase
    if "Retry-After" in response.headers:
        text += f" (retry after {response.headers['Retry-After']} s)"
    return f"{response.status_code} {_one_line(text)}"


class Api:
    """The job API over HTTP. Every failure is a CLIError of one line, which never contains the key."""

    def __init__(self, url: str | None = None, key: str | None = None):
        url = (url or os.environ.get("INVDPO_API_URL") or DEFAULT_URL).rstrip("/")
        key = key if key is not None else os.environ.get("INVDPO_API_KEY")
        self.url = mask_secrets(url)
        self.has_key = bool(key)
        try:
            import httpx  # imported here, not for `invdpo --help`: it is most of the CLI's start-up time
        except ModuleNotFoundError:
            raise CLIError(MISSING_EXTRA) from None
        try:
            self.http = httpx.Client(
                base_url=url,
                headers={"Authorization": f"Bearer {key}"} if key else {},
                timeout=httpx.Timeout(30.0, connect=10.0),
            )
        except httpx.InvalidURL as exc:
            raise CLIError(f"INVDPO_API_URL {self.url} is not a valid URL: {exc}") from None

    def __enter__(self) -> Api:
        return self

    def __exit__(self, *exc: object) -> None:
        self.http.close()

    def _error(self, response: httpx.Response) -> str:
        line = _error_line(response)
        if response.status_code == 401 and not self.has_key:
            line += " (no API key: set INVDPO_API_KEY, e.g. from `invdpo-admin create-key`)"
        return line

    def _unreachable(self, exc: Exception) -> CLIError:
        return CLIError(
            mask_secrets(f"cannot reach the API at {self.url}: {_one_line(str(exc)) or type(exc).__name__}")
        )

    def call(self, method: str, path: str, **kwargs: Any) -> Any:
        """The decoded JSON answer of one request."""
        return self.call_with_headers(method, path, None, **kwargs)[0]

    def call_with_headers(self, method: str, path: str, header: str | None, **kwargs: Any) -> tuple[Any, str | None]:
        """The decoded JSON answer of one request and the value of one response header (None if absent)."""
        import httpx  # loaded by __init__

        try:
            response = self.http.request(method, path, **kwargs)
        except (httpx.TransportError, httpx.InvalidURL) as exc:
            raise self._unreachable(exc) from None
        if response.is_error:
            raise CLIError(self._error(response))
        try:
            return response.json(), (response.headers.get(header) if header else None)
        except ValueError:
            raise CLIError(
                f"{self.url} answered {path} with something other than JSON: is it the invdpo API?"
            ) from None

    def stream_events(self, job_id: str, last_event_id: str | None) -> Iterator[tuple[str, str, str | None]]:
        """(event, data, id) of the job's server-sent-events stream until the server closes it."""
        import httpx  # loaded by __init__

        headers = {"Last-Event-ID": last_event_id} if last_event_id else {}
        # The server pings every 15 s while idle, so a minute without a byte means the connection is gone.
        timeout = httpx.Timeout(60.0, connect=10.0)
        try:
            with self.http.stream("GET", f"{JOBS}/{job_id}/events/stream", headers=headers, timeout=timeout) as r:
                if r.is_error:
                    r.read()
                    raise CLIError(self._error(r))
                event, event_id = "message", None
                data: list[str] = []
                for line in r.iter_lines():  # the SSE wire format: field lines, a blank line ends an event
                    if not line:
                        if data:
                            yield event, "\n".join(data), event_id
                        event, event_id, data = "message", None, []
                        continue
                    field, _, value = line.partition(":")
                    value = value.removeprefix(" ")
                    if field == "event":
                        event = value
                    elif field == "data":
                        data.append(value)
                    elif field == "id":
                        event_id = value
        except httpx.TransportError as exc:
            raise self._unreachable(exc) from None


# ---------------------------------------------------------------- output


def _print_json(value: Any, *, lines: bool = False) -> None:
    print(json.dumps(value) if lines else json.dumps(value, indent=2), flush=True)


def _when(ts: int | None) -> str:
    return "-" if ts is None else datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S")


def _progress(job: dict[str, Any]) -> str:
    return f"{job.get('step') or 0}/{job.get('total_steps') or '?'}"


def _print_job(job: dict[str, Any]) -> None:
    rows = [
        ("id", job["id"]),
        ("status", job["status"]),
        ("model", job["model"]),
        ("method", job["method"]["type"]),
        ("training_file", job["training_file"]),
        ("validation_file", job.get("validation_file")),
        ("progress", _progress(job)),
        ("created", _when(job.get("created_at"))),
        ("started", _when(job.get("started_at"))),
        ("finished", _when(job.get("finished_at"))),
        ("estimated_finish", _when(job.get("estimated_finish"))),
        ("mlflow_run_id", job.get("mlflow_run_id")),
        ("fine_tuned_model", job.get("fine_tuned_model")),
    ]
    if job.get("evaluation"):
        rows.append(("evaluation", evaluation_line(job["evaluation"])))
    if job.get("error"):
        error = job["error"]
        param = f" ({error['param']})" if error.get("param") else ""
        rows.append(("error", f"{error['code']}{param}: {error['message']}"))
    for name, value in rows:
        if value is not None:
            print(f"{name + ':':18}{value}")


def evaluation_line(evaluation: dict[str, Any]) -> str:
    """`implicit_acc 0.62 [0.25, 0.88] n=16, win_rate/toy 1 [1, 1] n=2, ...`: each metric with its interval and sample
    size when it has them."""
    if evaluation.get("error"):
        return f"failed: {evaluation['error']}"
    metrics: dict[str, float] = evaluation.get("metrics") or {}

    def bound(name: str, which: str) -> str:  # eval/win_rate/toy -> eval/win_rate_lower/toy
        head, _, rest = name.partition("/")
        metric, sep, scorer = rest.partition("/")
        return f"{head}/{metric}_{which}{sep}{scorer}"

    parts = []
    for name, value in metrics.items():
        if any(part in name for part in ("_lower", "_upper", "_n/")) or name.endswith("_n"):
            continue
        lower, upper, n = (metrics.get(bound(name, which)) for which in ("lower", "upper", "n"))
        interval = f" [{lower:.3g}, {upper:.3g}]" if lower is not None and upper is not None else ""
        if interval and n is not None:
            interval += f" n={n:g}"  # two prompts give [1, 1] too: the size says how much the interval means
        parts.append(f"{name.removeprefix('eval/')} {value:.3g}{interval}")
    return ", ".join(parts) or "no metrics"


def _event_line(event: dict[str, Any]) -> str:
    level = "" if event["level"] == "info" else f"{event['level']}: "
    return f"{_when(event['created_at'])}  {level}{event['message']}"


def _more(has_more: bool, items: list[dict[str, Any]], command: str) -> None:
    if has_more and items:
        print(f"(more: {command} --after {items[-1]['id']})", file=sys.stderr)


# ---------------------------------------------------------------- follow


def follow(api: Api, job_id: str, *, as_json: bool = False) -> dict[str, Any]:
    """Show the job's events live until it finishes (messages as lines, the inversion cache's pairs and then the
    steps as progress bars, the steps' with loss, implicit_acc and status; or JSON lines) and return the final job."""
    from tqdm import tqdm

    bar: tqdm | None = None
    cache_bar: tqdm | None = None
    shown: dict[str, str] = {}  # loss and implicit_acc, then status: the bar's postfix
    status = api.call("GET", f"{JOBS}/{job_id}")["status"]
    # A finished job's events are history: its messages are shown, but a bar over replayed steps would show a
    # rate of thousands of steps per second for a job that is not running.
    history = status in TERMINAL_STATUSES or status == "paused"
    last_id, done = None, False
    try:
        while not done:
            # The server closes the stream after a while; reconnect with the last id seen to continue from there.
            for kind, data, event_id in api.stream_events(job_id, last_id):
                payload = json.loads(data)
                if kind == "done":
                    done = True
                    break
                last_id = event_id or last_id
                if as_json:
                    _print_json(payload, lines=True)
                elif history:
                    if payload["type"] != "metrics":
                        print(_event_line(payload), flush=True)
                elif (payload.get("data") or {}).get("pairs_total"):  # inversion cache progress
                    pairs = payload["data"]
                    if cache_bar is None:
                        cache_bar = tqdm(total=pairs["pairs_total"], unit="pair", desc="inversion cache")
                    cache_bar.total = pairs["pairs_total"]
                    cache_bar.update(pairs["pairs_done"] - cache_bar.n)
                elif payload["type"] == "metrics" and payload.get("data"):
                    if cache_bar is not None:
                        cache_bar.close()
                        cache_bar = None
                    metrics = payload["data"]
                    step = int(metrics.get("step", 0))
                    if bar is None:  # made at the first step: its rate and ETA count training, not queue or loading
                        total = metrics.get("total_steps")
                        bar = tqdm(total=total, initial=max(step - 1, 0), unit="step", dynamic_ncols=True)
                    for name in ("loss", "implicit_acc"):
                        if isinstance(metrics.get(name), int | float):
                            shown[name] = f"{metrics[name]:.4g}"
                    bar.set_postfix({**shown, "status": status}, refresh=False)
                    bar.update(step - bar.n)
                elif bar is None:
                    print(_event_line(payload), flush=True)
                else:
                    bar.write(_event_line(payload))
                    # Messages mark the status changes (cancel requested, finished): show the new one.
                    status = api.call("GET", f"{JOBS}/{job_id}")["status"]
                    bar.set_postfix({**shown, "status": status})
    finally:
        for shown_bar in (cache_bar, bar):
            if shown_bar is not None:
                shown_bar.close()
    return api.call("GET", f"{JOBS}/{job_id}")


def _finish(job: dict[str, Any], as_json: bool) -> int:
    if as_json:
        _print_json(job, lines=True)
    elif job["status"] == "succeeded":
        print(f"{job['id']} succeeded: {job.get('fine_tuned_model') or '(no model registered)'}")
    else:
        error = job.get("error") or {}
        reason = f": {error.get('code')}: {error.get('message')}" if error else ""
        print(f"{job['id']} {job['status']}{reason}")
    return FOLLOW_EXIT.get(job["status"], 1)


# ---------------------------------------------------------------- commands


def _pairs(items: list[str], option: str) -> dict[str, str]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise CLIError(f"{option} {item!r}: expected key=value")
        out[key] = value
    return out


def cmd_create(args: argparse.Namespace) -> int:
    try:
        hyperparameters = apply_overrides({}, args.set)
    except ConfigError as exc:
        raise CLIError(f"--set {exc}") from None
    body: dict[str, Any] = {
        "model": args.model,
        "training_file": args.training_file,
        "method": {"type": args.method, "hyperparameters": hyperparameters},
    }
    for name in ("validation_file", "seed", "suffix", "registered_model_name", "max_runtime_seconds"):
        if getattr(args, name) is not None:
            body[name] = getattr(args, name)
    if args.metadata:
        body["metadata"] = _pairs(args.metadata, "--metadata")
    headers = {"Idempotency-Key": args.idempotency_key} if args.idempotency_key else {}
    with Api() as api:
        job, replayed = api.call_with_headers("POST", JOBS, "Idempotent-Replayed", json=body, headers=headers)
        if args.json:
            _print_json(job, lines=args.follow)
        else:
            # A retry with the same Idempotency-Key gets the job the first request made, not a new one.
            print(f"{'replayed' if replayed == 'true' else 'created'} {job['id']} ({job['status']})")
        if not args.follow:
            return 0
        return _finish(follow(api, job["id"], as_json=args.json), args.json)


def cmd_list(args: argparse.Namespace) -> int:
    params = {k: v for k, v in {"limit": args.limit, "after": args.after, "status": args.status}.items() if v}
    with Api() as api:
        page = api.call("GET", JOBS, params=params)
    if args.json:
        _print_json(page)
        return 0
    print(f"{'ID':30}  {'STATUS':16}  {'STEP':>11}  {'CREATED':19}  MODEL")
    for job in page["data"]:
        print(
            f"{job['id']:30}  {job['status']:16}  {_progress(job):>11}  {_when(job['created_at']):19}  {job['model']}"
        )
    command = "invdpo jobs list" + (f" --status {args.status}" if args.status else "")
    command += f" --limit {args.limit}" if args.limit else ""
    _more(page["has_more"], page["data"], command)
    return 0


def cmd_get(args: argparse.Namespace) -> int:
    with Api() as api:
        job = api.call("GET", f"{JOBS}/{args.job_id}")
    if args.json:
        _print_json(job)
    else:
        _print_job(job)
    return 0


def cmd_cancel(args: argparse.Namespace) -> int:
    """cancel, pause or resume (args.action): the job's new status."""
    with Api() as api:
        job = api.call("POST", f"{JOBS}/{args.job_id}/{args.action}")
    if args.json:
        _print_json(job)
    else:
        print(f"{job['id']} {job['status']}")
    return 0


def cmd_events(args: argparse.Namespace) -> int:
    with Api() as api:
        if args.follow:
            return _finish(follow(api, args.job_id, as_json=args.json), args.json)
        params = {k: v for k, v in {"limit": args.limit, "after": args.after}.items() if v}
        page = api.call("GET", f"{JOBS}/{args.job_id}/events", params=params)
    if args.json:
        _print_json(page)
        return 0
    for event in page["data"]:
        print(_event_line(event))
    _more(page["has_more"], page["data"], f"invdpo jobs events {args.job_id}")
    return 0


def cmd_checkpoints(args: argparse.Namespace) -> int:
    params = {k: v for k, v in {"limit": args.limit, "after": args.after}.items() if v}
    with Api() as api:
        page = api.call("GET", f"{JOBS}/{args.job_id}/checkpoints", params=params)
    if args.json:
        _print_json(page)
        return 0
    for checkpoint in page["data"]:
        metrics = " ".join(
            f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in checkpoint["metrics"].items()
        )
        print(f"step {checkpoint['step_number']:>7}  {checkpoint['uri']}  {metrics}".rstrip())
    _more(page["has_more"], page["data"], f"invdpo jobs checkpoints {args.job_id}")
    return 0


def cmd_promote(args: argparse.Namespace) -> int:
    body = {"version": args.version, **({"force": True, "reason": args.reason} if args.force else {})}
    with Api() as api:
        answer = api.call("POST", f"/v1/models/{args.name}/promote", json=body)
    if args.json:
        _print_json(answer)
    else:
        print(f"{answer['model_uri']} -> version {answer['version']} (job {answer['job_id']})")
    return 0


def add_client_commands(sub: argparse._SubParsersAction) -> None:
    """Register `jobs` and `models` on the `invdpo` parser (services/cli.py)."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", action="store_true", help="print the API's JSON instead of text")
    paging = argparse.ArgumentParser(add_help=False)
    paging.add_argument("--limit", type=int, default=None, help="page size (1-100)")
    paging.add_argument("--after", default=None, help="continue after this id")
    env = "API: INVDPO_API_URL (default http://127.0.0.1:8000), key: INVDPO_API_KEY"

    jobs = sub.add_parser("jobs", help="fine-tuning jobs on the API", description=env).add_subparsers(
        dest="jobs_command", required=True
    )
    p = jobs.add_parser("create", parents=[common], help="submit a fine-tuning job")
    p.add_argument("--model", required=True, help="base diffusers pipeline: a hub id, a directory or an s3:// prefix")
    p.add_argument("--training-file", required=True, help="preference pairs: parquet file/prefix or JSONL manifest")
    p.add_argument("--validation-file", default=None, help="held-out preference pairs")
    p.add_argument("--method", choices=get_args(Method), default="inversion_dpo")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a hyperparameter (value parsed as YAML; dotted for nested: adapter.type=lora); repeatable",
    )
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--suffix", default=None, help="added to the model name")
    p.add_argument("--registered-model-name", default=None, help="MLflow registered model to register the result as")
    p.add_argument("--metadata", action="append", default=[], metavar="KEY=VALUE", help="repeatable, up to 16")
    p.add_argument(
        "--max-runtime-seconds",
        type=int,
        default=None,
        help="how long the job may run, all attempts together (default: the deployment's, 7 days)",
    )
    p.add_argument("--idempotency-key", default=None, help="a retry with the same key returns the same job")
    p.add_argument("--follow", action="store_true", help="then show progress until the job finishes")
    p.set_defaults(func=cmd_create)

    p = jobs.add_parser("list", parents=[common, paging], help="the project's jobs, newest first")
    p.add_argument(
        "--status",
        default=None,
        choices=STATUSES,
    )
    p.set_defaults(func=cmd_list)
    p = jobs.add_parser("get", parents=[common], help="one job with its progress and result")
    p.add_argument("job_id")
    p.set_defaults(func=cmd_get)
    p = jobs.add_parser("cancel", parents=[common], help="cancel a job (a running one stops after its step)")
    p.add_argument("job_id")
    p.set_defaults(func=cmd_cancel, action="cancel")
    p = jobs.add_parser("pause", parents=[common], help="pause a job (a running one checkpoints and frees its GPU)")
    p.add_argument("job_id")
    p.set_defaults(func=cmd_cancel, action="pause")
    p = jobs.add_parser("resume", parents=[common], help="resume a paused job from its last checkpoint")
    p.add_argument("job_id")
    p.set_defaults(func=cmd_cancel, action="resume")
    p = jobs.add_parser("events", parents=[common, paging], help="a job's events, oldest first")
    p.add_argument("job_id")
    p.add_argument(
        "--follow",
        action="store_true",
        help="stream events with a progress bar until the job finishes or pauses (exit 0 succeeded, 1 failed, 3 "
        "cancelled, 4 paused)",
    )
    p.set_defaults(func=cmd_events)
    p = jobs.add_parser("checkpoints", parents=[common, paging], help="a job's saved checkpoints")
    p.add_argument("job_id")
    p.set_defaults(func=cmd_checkpoints)

    models = sub.add_parser("models", help="registered models", description=env).add_subparsers(
        dest="models_command", required=True
    )
    p = models.add_parser("promote", parents=[common], help="move the `champion` alias to a registered version")
    p.add_argument("name")
    p.add_argument("version", type=int)
    p.add_argument(
        "--force", action="store_true", help="promote even if the promotion gate says no (key scope models:force)"
    )
    p.add_argument("--reason", help="why the gate is overridden; required with --force, recorded with the key")
    p.set_defaults(func=cmd_promote)
