"""The Celery app and the one message the API sends: `invdpo.train_job(job_id)` on the `gpu` queue.

The broker is only a doorbell; the database is the source of truth (a message may be lost or delivered twice).

Acknowledgement choice (the Redis visibility-timeout trap): with `task_acks_late=True`, Redis redelivers any
task still unacknowledged after `visibility_timeout` (1 h), so every hour-long training would start a second
copy. We acknowledge early (`task_acks_late=False`): a message is gone once a worker starts it. If that worker
dies, nothing is redelivered by Redis; instead the job's heartbeat goes stale in the database and the API's
reconciler re-sends it (`services.jobs.reconciler`), and the worker's atomic `jobstore.claim_job` takes it over.
A duplicate message is harmless for the same reason: the second claim fails and the task returns at once.
`worker_disable_prefetch` keeps a busy GPU worker from holding the next job's message while it trains.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import redis
from celery import Celery
from kombu import Queue

TRAIN_TASK = "invdpo.train_job"
RECONCILE_TASK = "invdpo.reconcile"
GPU_QUEUE = "gpu"
DEFAULT_QUEUE = "default"


def _transport_options(broker_url: str) -> dict[str, Any]:
    if broker_url.startswith("filesystem://"):
        # The embedded single-machine broker (`make demo`): kombu's filesystem transport keeps each message as a
        # file in the directory the URL names, filesystem:///abs/dir. The API and the worker share that folder.
        folder = Path(urlsplit(broker_url).path or "broker")
        for sub in ("queue", "control"):
            (folder / sub).mkdir(parents=True, exist_ok=True)
        queue = str(folder / "queue")
        return {"data_folder_in": queue, "data_folder_out": queue, "control_folder": str(folder / "control")}
    return {"visibility_timeout": 3600, "socket_timeout": 5, "socket_connect_timeout": 3}


def make_celery(broker_url: str) -> Celery:
    """The Celery app of the API (which only sends) and of the worker (which consumes): one configuration."""
    app = Celery("invdpo", broker=broker_url, set_as_current=False)
    app.conf.update(
        task_acks_late=False,
        task_reject_on_worker_lost=False,  # documented to cause message loops; the reconciler covers worker loss
        worker_prefetch_multiplier=1,
        worker_disable_prefetch=True,
        task_ignore_result=True,  # no result backend: job state lives in the database
        task_default_queue=DEFAULT_QUEUE,
        task_queues=(Queue(GPU_QUEUE), Queue(DEFAULT_QUEUE)),
        task_routes={TRAIN_TASK: {"queue": GPU_QUEUE}, RECONCILE_TASK: {"queue": DEFAULT_QUEUE}},
        task_serializer="json",
        accept_content=["json"],
        broker_connection_retry_on_startup=True,
        broker_transport_options=_transport_options(broker_url),
        # An API request must not hang on a dead broker: the reconciler re-sends what could not be sent.
        task_publish_retry_policy={"max_retries": 2, "interval_start": 0, "interval_step": 0.2, "interval_max": 0.5},
    )
    return app


def enqueue_training(job_id: str, app: Celery) -> None:
    """Send `invdpo.train_job(job_id)` to the gpu queue by name (the API never imports the worker's torch code).

    Call only after the job is committed as `queued`.
    """
    app.send_task(TRAIN_TASK, args=[job_id], queue=GPU_QUEUE)


def job_id_of_message(raw: bytes | str) -> str | None:
    """The job id inside one raw kombu/Redis message, or None if it is not a train_job message."""
    try:
        message = json.loads(raw)
        if isinstance(message, list):  # entries of the `unacked` hash: [message, exchange, routing_key]
            message = message[0]
        if message.get("headers", {}).get("task") != TRAIN_TASK:
            return None
        body: Any = message["body"]
        if message.get("properties", {}).get("body_encoding") == "base64":
            body = base64.b64decode(body)
        args = json.loads(body)[0]  # protocol 2 body: [args, kwargs, embed]
        return str(args[0])
    except (ValueError, KeyError, IndexError, TypeError, AttributeError):
        return None


def pending_job_ids(broker_url: str) -> set[str] | None:
    """Job ids with a train_job message waiting in (or reserved from) the Redis gpu queue.

    None when the broker is not Redis: the caller then cannot tell a lost message from a waiting one.
    """
    if not broker_url.startswith(("redis://", "rediss://")):
        return None
    client = redis.Redis.from_url(broker_url, socket_timeout=5, socket_connect_timeout=3)
    try:
        raws = [*client.lrange(GPU_QUEUE, 0, -1), *client.hvals("unacked")]
    finally:
        client.close()
    return {job_id for raw in raws if (job_id := job_id_of_message(raw)) is not None}


def ping_broker(broker_url: str, app: Celery) -> bool:
    """True if the broker answers (used by /readyz)."""
    try:
        if broker_url.startswith(("redis://", "rediss://")):
            client = redis.Redis.from_url(broker_url, socket_timeout=2, socket_connect_timeout=2)
            try:
                return bool(client.ping())
            finally:
                client.close()
        with app.connection_for_write() as conn:
            conn.ensure_connection(max_retries=1, timeout=2)
        return True
    except Exception:
        return False
