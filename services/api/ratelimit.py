"""A per-API-key request rate limit kept in Redis, so it holds across API replicas: a fixed window of
INVDPO_RATE_LIMIT_WINDOW_SECONDS in which a key may make INVDPO_RATE_LIMIT_REQUESTS authenticated requests; more get
a 429 with Retry-After (the seconds until the window ends).

One INCR (and EXPIRE) per request on a key named by the API key's public prefix and the window's number. If Redis
cannot be reached the request is let through and a warning logged: the limit protects the service, and an outage of
the limiter must not become an outage of the API.
"""

from __future__ import annotations

import logging
import math
import time

import redis

log = logging.getLogger(__name__)


class RateLimiter:
    def __init__(self, url: str, requests: int, window_seconds: int):
        self.requests = requests
        self.window_seconds = window_seconds
        # Short timeouts: a slow Redis delays each request by at most this much before failing open.
        self.redis = redis.Redis.from_url(url, socket_timeout=0.5, socket_connect_timeout=0.5)

    def retry_after(self, key_prefix: str) -> int | None:
        """Count one request of `key_prefix`; None if it is within the limit, else the seconds to wait."""
        now = time.time()
        window = int(now // self.window_seconds)
        name = f"invdpo:ratelimit:{key_prefix}:{window}"
        try:
            pipe = self.redis.pipeline()
            pipe.incr(name)
            pipe.expire(name, self.window_seconds + 1)
            count = int(pipe.execute()[0])
        except redis.RedisError as exc:
            log.warning("rate limit not checked: Redis failed", extra={"error": type(exc).__name__})
            return None
        if count <= self.requests:
            return None
        return max(1, math.ceil((window + 1) * self.window_seconds - now))

    def close(self) -> None:
        self.redis.close()
