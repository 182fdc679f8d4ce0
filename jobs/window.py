"""A bounded window of shard messages per job: the broker never holds the whole job.

Submit writes every shard file first (durable, in the destination), then sends only the first
``CUTOUT_QUEUE_WINDOW`` shards (10,000 by default). The rest are sent as the queue drains: a
worker that finishes (or skips) a shard tops the window up, and so does the reaper every live
worker runs (``cutout.workers.liveness``), so a job progresses even when its workers are idle.
Redis memory for a job stays bounded (about 1.3 KB per waiting message plus a small set of
shard numbers) whatever the size of the job.

Keys, all ``cutout:job:<job_id>:window*``, expiring with the job's live progress:
  window          hash  next (the next shard number to send), end (shards whose file is
                        durable), limit, prefix, queue
  window:pending  set   shard numbers sent and not finished yet (at most ``limit``)
  window:sending  zset  shard numbers taken by a sender, with the time: a sender that died
                        between taking and sending leaves them here, and the reaper sends them
                        again after ``CUTOUT_WORKER_STALE_S``
And ``cutout:windows`` (set): jobs whose window the reapers keep topping up.

Claiming is one Lua script, so two workers topping up at once never take the same shard and
never skip one. A message sent twice (a reaper's rescue, a resume) costs a skip: a shard with a
done-marker is never run again. After Redis lost its data, ``resume`` rebuilds the window from
the done-markers (``rebuild``): one bit per shard in memory, never a list of shard ids.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from cutout.jobs import storage
from cutout.jobs.layout import SHARD_ID, JobLayout
from cutout.jobs.queue import send_process_shard
from cutout.jobs.settings import settings
from cutout.jobs.sharding import shard_id_for, shard_index

log = logging.getLogger(__name__)

WINDOWS_KEY = "cutout:windows"

# Take up to ``limit - in flight`` shard numbers from the cursor, unless the job is cancelled.
# KEYS: window, pending, sending, cancel  ARGV: now, ttl
_CLAIM_SCRIPT = """
if redis.call('EXISTS', KEYS[4]) == 1 then return {} end
local state = redis.call('HMGET', KEYS[1], 'next', 'end', 'limit')
if not state[1] then return {} end
local nxt, last, limit = tonumber(state[1]), tonumber(state[2]), tonumber(state[3])
local room = limit - redis.call('SCARD', KEYS[2]) - redis.call('ZCARD', KEYS[3])
local taken = {}
while room > 0 and nxt < last do
  redis.call('ZADD', KEYS[3], ARGV[1], nxt)
  taken[#taken + 1] = nxt
  nxt = nxt + 1
  room = room - 1
end
redis.call('HSET', KEYS[1], 'next', nxt)
for i = 1, 3 do redis.call('EXPIRE', KEYS[i], ARGV[2]) end
return taken
"""

# Sent: move from ``sending`` to ``pending``, unless the shard already finished meanwhile.
# KEYS: sending, pending  ARGV: numbers...
_CONFIRM_SCRIPT = """
for i = 1, #ARGV do
  if redis.call('ZREM', KEYS[1], ARGV[i]) == 1 then redis.call('SADD', KEYS[2], ARGV[i]) end
end
return 0
"""

# Numbers a sender took longer than ARGV[2] seconds ago; re-stamped so one reaper takes each.
# KEYS: sending  ARGV: now, stale_s
_RESCUE_SCRIPT = """
local stale = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', tonumber(ARGV[1]) - tonumber(ARGV[2]))
for _, number in ipairs(stale) do redis.call('ZADD', KEYS[1], ARGV[1], number) end
return stale
"""

# The cursor only moves forward: shards become durable in order while submit streams.
# KEYS: window  ARGV: end
_EXTEND_SCRIPT = """
local current = tonumber(redis.call('HGET', KEYS[1], 'end') or '-1')
if tonumber(ARGV[1]) > current then redis.call('HSET', KEYS[1], 'end', ARGV[1]) end
return 0
"""


def window_limit() -> int:
    return max(1, settings().queue_window)


@dataclass
class WindowState:
    next: int
    end: int
    limit: int
    pending: int
    sending: int


class ShardWindow:
    """The window of one job in Redis; ``top_up`` sends what fits."""

    def __init__(self, client, job_id: str, *, ttl_s: int | None = None):
        self.redis = client
        self.job_id = job_id
        self.ttl_s = ttl_s or settings().progress_ttl_s
        self._claim = client.register_script(_CLAIM_SCRIPT)
        self._confirm = client.register_script(_CONFIRM_SCRIPT)
        self._rescue = client.register_script(_RESCUE_SCRIPT)
        self._extend = client.register_script(_EXTEND_SCRIPT)

    def key(self, name: str = "") -> str:
        return f"cutout:job:{self.job_id}:window{':' + name if name else ''}"

    # --- state ---------------------------------------------------------------------------------
    def exists(self) -> bool:
        return bool(self.redis.exists(self.key()))

    def reset(self, *, prefix: str, queue: str, next_index: int, end: int, limit: int | None = None) -> None:
        """A fresh window (first submit, or rebuilt by resume): nothing pending, cursor at
        ``next_index``. Messages already in the broker stay valid (a duplicate is skipped)."""
        pipe = self.redis.pipeline()
        pipe.delete(self.key(), self.key("pending"), self.key("sending"))
        pipe.hset(self.key(), mapping={"next": next_index, "end": end, "limit": limit or window_limit(),
                                       "prefix": prefix, "queue": queue})
        pipe.expire(self.key(), self.ttl_s)
        pipe.sadd(WINDOWS_KEY, self.job_id)
        pipe.execute()

    def extend(self, end: int) -> None:
        """``end`` shard files are durable: the cursor may go up to them."""
        self._extend(keys=[self.key()], args=[end])
        self.redis.sadd(WINDOWS_KEY, self.job_id)

    def state(self) -> WindowState | None:
        pipe = self.redis.pipeline()
        pipe.hmget(self.key(), "next", "end", "limit")
        pipe.scard(self.key("pending"))
        pipe.zcard(self.key("sending"))
        (nxt, end, limit), pending, sending = pipe.execute()
        if nxt is None:
            return None
        return WindowState(int(nxt), int(end), int(limit), int(pending), int(sending))

    def target(self) -> tuple[str, str] | None:
        """``(job prefix, queue)`` the window sends to; None once Redis lost it."""
        prefix, queue = self.redis.hmget(self.key(), "prefix", "queue")
        if prefix is None:
            return None
        return prefix.decode(), (queue or b"cutout").decode()

    # --- moving shards ---------------------------------------------------------------------------
    def claim(self) -> list[int]:
        numbers = self._claim(keys=[self.key(), self.key("pending"), self.key("sending"),
                                    f"cutout:job:{self.job_id}:cancel"],
                              args=[f"{time.time():.3f}", self.ttl_s])
        return [int(n) for n in numbers]

    def take(self, numbers: list[int]) -> None:
        """Put shard numbers chosen by the caller (resume, retry) in ``sending`` first."""
        if numbers:
            now = time.time()
            self.redis.zadd(self.key("sending"), {str(n): now for n in numbers})

    def confirm(self, numbers: list[int]) -> None:
        for start in range(0, len(numbers), 1000):
            self._confirm(keys=[self.key("sending"), self.key("pending")], args=numbers[start:start + 1000])

    def add_pending(self, numbers: list[int]) -> None:
        """Messages sent outside the cursor (retries) that take places in the window."""
        if numbers and self.exists():
            self.redis.sadd(self.key("pending"), *numbers)

    def finished(self, shard_id: str) -> None:
        """The shard left the queue (done, skipped, or given up): its place is free."""
        number = shard_index(shard_id)
        pipe = self.redis.pipeline()
        pipe.srem(self.key("pending"), number)
        pipe.zrem(self.key("sending"), number)
        pipe.execute()

    def rescue(self, stale_s: float) -> list[int]:
        return [int(n) for n in self._rescue(keys=[self.key("sending")], args=[f"{time.time():.3f}", stale_s])]


def send_numbers(window: ShardWindow, app, numbers: list[int], *, prefix: str, queue: str,
                 producer=None) -> int:
    """Send the shards ``numbers`` (already in ``sending``), then confirm them as pending."""
    if not numbers:
        return 0
    if producer is None:
        with app.producer_or_acquire() as producer:
            return send_numbers(window, app, numbers, prefix=prefix, queue=queue, producer=producer)
    for number in numbers:
        send_process_shard(app, prefix, shard_id_for(number), queue=queue, producer=producer)
    window.confirm(numbers)
    return len(numbers)


def top_up(window: ShardWindow, app, *, producer=None) -> int:
    """Send as many shards as the window has room for; how many were sent."""
    target = window.target()
    if target is None:
        return 0
    numbers = window.claim()
    return send_numbers(window, app, numbers, prefix=target[0], queue=target[1], producer=producer)


def shard_left_queue(client, app, job_id: str, shard_id: str) -> int:
    """A worker is done with a shard message (finished, skipped or given up): free its place
    and send the next shards that fit. Best effort: the reaper tops up too."""
    window = ShardWindow(client, job_id)
    window.finished(shard_id)
    return top_up(window, app)


def reap_windows(client, app, *, stale_s: float) -> int:
    """For every job with a window: send again what a dead sender took, then top up."""
    sent = 0
    for raw in client.smembers(WINDOWS_KEY):
        job_id = raw.decode()
        window = ShardWindow(client, job_id)
        target = window.target()
        if target is None:  # expired or flushed: resume rebuilds it
            client.srem(WINDOWS_KEY, job_id)
            continue
        stale = window.rescue(stale_s)
        if stale:
            log.warning("job %s: %d shard(s) taken by a sender that stopped; sending them again",
                        job_id, len(stale))
            sent += send_numbers(window, app, stale, prefix=target[0], queue=target[1])
        sent += top_up(window, app)
    return sent


# --- rebuilding from the durable done-markers -----------------------------------------------------
def done_bitmap(job_prefix: str, shards_total: int) -> bytearray:
    """One byte per shard (1 = has a done-marker), from one streamed listing of ``stats/``."""
    layout = JobLayout.from_prefix(job_prefix)
    done = bytearray(shards_total)
    for uri in storage.list_uris(layout.folder("stats") + "/"):  # each page has its own retries
        name = uri.rsplit("/", 1)[-1]
        if name.endswith(".json") and SHARD_ID.fullmatch(name[: -len(".json")]):
            number = shard_index(name[: -len(".json")])
            if number < shards_total:
                done[number] = 1
    return done


def rebuild(client, app, *, job_id: str, prefix: str, queue: str, shards_total: int,
            producer=None) -> tuple[int, int]:
    """Start the window afresh from the done-markers: send the first ``limit`` shards that
    have none, and leave the cursor after the last one sent. Shards further on that are done
    already cost a skipped message each when the cursor reaches them.

    Returns ``(shards sent now, shards done)``."""
    done = done_bitmap(prefix, shards_total)
    limit = window_limit()
    window = ShardWindow(client, job_id)
    first: list[int] = []
    cursor = 0
    while cursor < shards_total and len(first) < limit:
        if not done[cursor]:
            first.append(cursor)
        cursor += 1
    window.reset(prefix=prefix, queue=queue, next_index=cursor, end=shards_total, limit=limit)
    window.take(first)
    sent = send_numbers(window, app, first, prefix=prefix, queue=queue, producer=producer)
    return sent, sum(done)
