"""Live progress in Redis: fast to read, allowed to be lost (``rebuild_from_durable`` restores it).

Keys, all ``cutout:job:<job_id>:*`` and expiring after ``CUTOUT_PROGRESS_TTL_S`` (3 days)
of inactivity:
  total       hash  items, shards
  counts      hash  status -> items
  counted     set   shard ids already added to counts (a redelivered shard adds nothing)
  started     hash  shard id -> "worker time" for shards being worked on
  completions list  "time items" of the latest finished shards (for the rate)
  workers     zset  worker -> last heartbeat time
  cancel      flag
  inflight    hash  shard id -> JSON {worker, uris}: the inputs on the model now (cleared after)
  crashes:<shard> hash  input -> times a worker died with it alone on the model (0: in a batch)

And one key for all jobs, ``cutout:held`` (hash): worker -> JSON of the shard task it holds
(set when the task starts, cleared when it ends), so a live worker can re-send the shard of a
worker that stopped beating (``claim_stale_holds``; see cutout.workers.liveness).
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field

from cutout.jobs.settings import settings

HELD_KEY = "cutout:held"
RATE_WINDOW = 200  # completions kept for the rate
RATE_WINDOW_S = 600.0  # and only those younger than this

# Count a finished shard once: SADD tells whether it was new, and only then are counts added.
# KEYS: counted, counts, completions, started  ARGV: shard, now, ttl, n_items, window, status, n, ...
_FINISH_SCRIPT = """
local added = redis.call('SADD', KEYS[1], ARGV[1])
if added == 1 then
  for i = 6, #ARGV, 2 do
    redis.call('HINCRBY', KEYS[2], ARGV[i], ARGV[i + 1])
  end
  if tonumber(ARGV[4]) > 0 then
    redis.call('LPUSH', KEYS[3], ARGV[2] .. ' ' .. ARGV[4])
    redis.call('LTRIM', KEYS[3], 0, tonumber(ARGV[5]) - 1)
  end
end
redis.call('HDEL', KEYS[4], ARGV[1])
for i = 1, 4 do
  redis.call('EXPIRE', KEYS[i], ARGV[3])
end
return added
"""


# A marker left in ``inflight`` means the attempt that set it died with that batch on the model:
# take it (so it is counted once) and charge each of its inputs; return the shard's history.
# KEYS: inflight, crashes  ARGV: shard, ttl
_CRASH_HISTORY_SCRIPT = """
local raw = redis.call('HGET', KEYS[1], ARGV[1])
if raw then
  redis.call('HDEL', KEYS[1], ARGV[1])
  local uris = cjson.decode(raw)['uris']
  local alone = (#uris == 1) and 1 or 0
  for _, uri in ipairs(uris) do
    redis.call('HINCRBY', KEYS[2], uri, alone)
  end
  redis.call('EXPIRE', KEYS[2], ARGV[2])
end
return redis.call('HGETALL', KEYS[2])
"""


@dataclass
class ProgressSnapshot:
    total: int  # inputs in the job (0 until submit has set it)
    counts: dict[str, int] = field(default_factory=dict)
    shards_done: int = 0
    shards_total: int = 0
    in_flight: int = 0
    workers_alive: int = 0
    rate_per_s: float = 0.0  # inputs per second over the recent window
    eta_s: float | None = None
    cancelled: bool = False

    @property
    def processed(self) -> int:
        return sum(self.counts.values())


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class LiveProgress:
    def __init__(self, redis_client, job_id: str, *, ttl_s: int | None = None):
        self.redis = redis_client
        self.job_id = job_id
        self.ttl_s = settings().progress_ttl_s if ttl_s is None else ttl_s
        self._finish = redis_client.register_script(_FINISH_SCRIPT)
        self._crash_history = redis_client.register_script(_CRASH_HISTORY_SCRIPT)

    def key(self, name: str) -> str:
        return f"cutout:job:{self.job_id}:{name}"

    # --- writers ----------------------------------------------------------------------------------
    def set_total(self, n_items: int, n_shards: int) -> None:
        pipe = self.redis.pipeline()
        pipe.hset(self.key("total"), mapping={"items": n_items, "shards": n_shards})
        pipe.expire(self.key("total"), self.ttl_s)
        pipe.execute()

    def shard_started(self, shard_id: str, worker: str | None = None) -> None:
        pipe = self.redis.pipeline()
        pipe.hset(self.key("started"), shard_id, f"{worker or '?'} {time.time():.3f}")
        pipe.expire(self.key("started"), self.ttl_s)
        pipe.execute()
        if worker:
            self.heartbeat(worker)

    def shard_finished(self, shard_id: str, counts: dict[str, int]) -> bool:
        """Add this shard's counts unless it was already counted; True when it was new."""
        pairs: list = []
        for status, number in counts.items():
            pairs += [status, int(number)]
        keys = [self.key("counted"), self.key("counts"), self.key("completions"), self.key("started")]
        args = [shard_id, f"{time.time():.3f}", self.ttl_s, sum(counts.values()), RATE_WINDOW, *pairs]
        return bool(self._finish(keys=keys, args=args))

    def heartbeat(self, worker: str) -> None:
        pipe = self.redis.pipeline()
        pipe.zadd(self.key("workers"), {worker: time.time()})
        pipe.zremrangebyscore(self.key("workers"), "-inf", time.time() - self.ttl_s)
        pipe.expire(self.key("workers"), self.ttl_s)
        pipe.execute()

    def cancel(self) -> None:
        self.redis.set(self.key("cancel"), "1", ex=self.ttl_s)

    # --- inputs that kill workers (see cutout.workers.shard.CrashGuard) ------------------------------------
    def batch_on_model(self, shard_id: str, uris: list[str], worker: str = "?") -> None:
        pipe = self.redis.pipeline()
        pipe.hset(self.key("inflight"), shard_id, json.dumps({"worker": worker, "uris": uris}))
        pipe.expire(self.key("inflight"), self.ttl_s)
        pipe.execute()

    def batch_off_model(self, shard_id: str) -> None:
        self.redis.hdel(self.key("inflight"), shard_id)

    def crash_history(self, shard_id: str) -> dict[str, int]:
        """Inputs of this shard that were on the model when an attempt died, each with how
        often it was there alone. Consumes the marker a dead attempt left (counted once)."""
        flat = self._crash_history(keys=[self.key("inflight"), self.key(f"crashes:{shard_id}")],
                                   args=[shard_id, self.ttl_s])
        return {_text(flat[i]): int(flat[i + 1]) for i in range(0, len(flat), 2)}

    def forget_crashes(self, shard_id: str) -> None:
        """A user retry starts the shard's crash history afresh."""
        pipe = self.redis.pipeline()
        pipe.delete(self.key(f"crashes:{shard_id}"))
        pipe.hdel(self.key("inflight"), shard_id)
        pipe.execute()

    def is_cancelled(self) -> bool:
        return bool(self.redis.exists(self.key("cancel")))

    def mark_queued(self) -> None:
        """Every shard without a done-marker has a message in the broker (set after enqueueing)."""
        self.redis.set(self.key("queued"), str(time.time()), ex=self.ttl_s)

    def is_queued(self) -> bool:
        return bool(self.redis.exists(self.key("queued")))

    def clear(self) -> None:
        """Forget everything live about this job (a resubmit starts the live view afresh)."""
        names = ("total", "counts", "counted", "started", "completions", "workers", "cancel",
                 "queued")
        self.redis.delete(*(self.key(n) for n in names))

    # --- reader -----------------------------------------------------------------------------------
    def snapshot(self) -> ProgressSnapshot:
        now = time.time()
        pipe = self.redis.pipeline()
        pipe.hgetall(self.key("total"))
        pipe.hgetall(self.key("counts"))
        pipe.scard(self.key("counted"))
        pipe.hlen(self.key("started"))
        pipe.zcount(self.key("workers"), now - settings().worker_alive_s, "+inf")
        pipe.lrange(self.key("completions"), 0, -1)
        pipe.exists(self.key("cancel"))
        total, counts, done, in_flight, alive, completions, cancelled = pipe.execute()
        total = {_text(k): int(v) for k, v in total.items()}
        counts = {_text(k): int(v) for k, v in counts.items()}
        snap = ProgressSnapshot(
            total=total.get("items", 0), counts=counts, shards_done=int(done),
            shards_total=total.get("shards", 0), in_flight=int(in_flight),
            workers_alive=int(alive), cancelled=bool(cancelled),
        )
        snap.rate_per_s = _rate([_text(c) for c in completions], now)
        remaining = snap.total - snap.processed
        if snap.rate_per_s > 0 and remaining > 0:
            snap.eta_s = remaining / snap.rate_per_s
        elif snap.total and remaining <= 0:
            snap.eta_s = 0.0
        return snap

    # --- recovery ---------------------------------------------------------------------------------
    def rebuild_from_durable(self, job_prefix: str) -> int:
        """After Redis lost its data: count every shard that has a durable stats file.

        Uses the same count-once script as workers, so it is safe while workers are running
        and when run twice. Returns the number of shards newly counted.
        """
        from cutout.jobs import manifest

        totals = manifest.load_totals(job_prefix)
        if totals is not None:
            self.set_total(*totals)
        added = 0
        for stats in manifest.iter_shard_stats(job_prefix):
            pairs: list = []
            for status, number in stats.counts.items():
                pairs += [status, int(number)]
            keys = [self.key("counted"), self.key("counts"), self.key("completions"), self.key("started")]
            # completions are not replayed: old finish times would distort the live rate
            args = [stats.shard_id, f"{stats.finished_at:.3f}", self.ttl_s, 0, RATE_WINDOW, *pairs]
            if self._finish(keys=keys, args=args):
                added += 1
        return added


# --- shards held by workers (liveness) ------------------------------------------------------------
# Take one hold, only if it is still the one read (a worker that took a new shard meanwhile,
# or another reaper that got there first, leaves nothing to take). KEYS: held ARGV: worker, raw
_CLAIM_SCRIPT = """
if redis.call('HGET', KEYS[1], ARGV[1]) == ARGV[2] then
  return redis.call('HDEL', KEYS[1], ARGV[1])
end
return 0
"""


def hold_shard(redis_client, worker: str, job_id: str, task: dict) -> None:
    """``worker`` now holds the shard that ``task`` (the message's kwargs and queue) names.

    Older holds of the same shard by other workers are dropped: this run supersedes them (a
    pool process killed by the OOM killer has its message requeued at once by Celery, and its
    hold must not make a reaper send the shard a third time)."""
    entry = {"job_id": job_id, "since": time.time(), "task": task}
    shard_id = task.get("kwargs", {}).get("shard_id")
    claim = redis_client.register_script(_CLAIM_SCRIPT)
    for other, raw in redis_client.hgetall(HELD_KEY).items():
        try:
            held = json.loads(raw)
            same = held["job_id"] == job_id and held["task"]["kwargs"].get("shard_id") == shard_id
        except (ValueError, KeyError, TypeError):
            continue
        if same and _text(other) != worker:
            claim(keys=[HELD_KEY], args=[other, raw])
    redis_client.hset(HELD_KEY, worker, json.dumps(entry))


def release_shard(redis_client, worker: str) -> None:
    redis_client.hdel(HELD_KEY, worker)


def claim_stale_holds(redis_client, *, stale_s: float | None = None,
                      now: float | None = None) -> list[dict]:
    """Take the holds of workers silent for over ``stale_s`` (no job heartbeat and no hold
    younger than that); each returned entry's ``task`` is to be sent again, once.

    A worker holding a shard with no heartbeat for ``CUTOUT_WORKER_STALE_S`` is taken for dead
    (beats come every ``CUTOUT_HEARTBEAT_INTERVAL`` s): its shard is re-sent; a false alarm
    costs only work."""
    stale_s = settings().worker_stale_s if stale_s is None else stale_s
    now = time.time() if now is None else now
    claimed = []
    claim = redis_client.register_script(_CLAIM_SCRIPT)
    for worker, raw in redis_client.hgetall(HELD_KEY).items():
        try:
            entry = json.loads(raw)
            beat = redis_client.zscore(f"cutout:job:{entry['job_id']}:workers", worker)
            last_sign = max(float(entry["since"]), float(beat or 0.0))
        except (ValueError, KeyError, TypeError):
            last_sign, entry = 0.0, None  # unreadable: drop it below, nothing to re-send
        if now - last_sign <= stale_s:
            continue
        if claim(keys=[HELD_KEY], args=[worker, raw]) and entry is not None:
            claimed.append({**entry, "worker": _text(worker)})
    return claimed


def _rate(completions: list[str], now: float) -> float:
    """Inputs per second over the recent completions (newest first in the list)."""
    recent = []
    for entry in completions:
        stamp, _, items = entry.partition(" ")
        if now - float(stamp) <= RATE_WINDOW_S and int(items) > 0:
            recent.append((float(stamp), int(items)))
    if len(recent) < 2:
        return 0.0
    oldest = min(stamp for stamp, _ in recent)
    if now <= oldest:
        return 0.0
    # items finished after the oldest completion, over the time since it (so a stall decays it)
    return sum(items for stamp, items in recent if stamp > oldest) / (now - oldest)
