"""Live progress in Redis: fast to read, allowed to be lost (``rebuild_from_durable`` restores it).

``cutout status`` answers from these keys alone, without reading the job's files, whatever its
size. Keys, all ``cutout:job:<job_id>:*`` and expiring after ``CUTOUT_PROGRESS_TTL_S`` (3 days)
of inactivity:
  total       hash  items, shards
  counts      hash  status -> inputs of finished shards
  tallies     hash  class:<E> / flag:<f> / time:<stage> -> inputs or seconds (cutout.jobs.rollup)
  done        bitmap, one bit per shard index: set when the shard's counts were added (a
              redelivered shard adds nothing; BITCOUNT over a range tells a group is complete)
  live:<shard> hash the fields of the items a running shard has finished so far (reset when
              the shard starts again; folded into counts/tallies when it finishes)
  started     hash  shard id -> "worker time" for shards being worked on
  completions list  "time items" of the latest finished items (for the rate)
  first, last       time of the first and the latest finished item (a finished job's own rate)
  workers     zset  worker -> last heartbeat time
  cancel      flag
  inflight    hash  shard id -> JSON {worker, uris}: the inputs on the model now (cleared after)
  crashes:<shard> hash  input -> times a worker died with it alone on the model (0: in a batch)

And for all jobs: ``cutout:held`` (hash): worker -> JSON of the shard task it holds (set when the
task starts, cleared when it ends), so a live worker can re-send the shard of a worker that
stopped beating (``claim_stale_holds``; see cutout.workers.liveness); ``cutout:workers`` (zset):
worker -> last sign of life, busy or idle.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Sequence

from cutout.jobs.rollup import Tally, add_fields, fields_of
from cutout.jobs.settings import settings

HELD_KEY = "cutout:held"
WORKERS_KEY = "cutout:workers"
RATE_WINDOW = 200  # completions kept for the rate
RATE_WINDOW_S = 600.0  # and only those younger than this


# Adds flat fields (cutout.jobs.rollup) from ARGV[first] on: statuses to counts, the rest to tallies.
_ADD_FIELDS_LUA = """
local function add_fields(first, counts, tallies)
  for i = first, #ARGV, 2 do
    local name = ARGV[i]
    if string.sub(name, 1, 7) == 'status:' then
      redis.call('HINCRBY', counts, string.sub(name, 8), ARGV[i + 1])
    else
      redis.call('HINCRBYFLOAT', tallies, name, ARGV[i + 1])
    end
  end
end
"""

# Fold a finished shard's fields in once: SETBIT tells whether it was new, and only then are its
# fields added. The inputs its live hash did not already report go to the rate list.
# KEYS: done, counts, tallies, completions, started, live, last
# ARGV: shard, index, now, ttl, window, n_items, field, value, ...
_FINISH_SCRIPT = _ADD_FIELDS_LUA + """
local old = redis.call('SETBIT', KEYS[1], ARGV[2], 1)
local live_items = 0
local live = redis.call('HGETALL', KEYS[6])
for i = 1, #live, 2 do
  if string.sub(live[i], 1, 7) == 'status:' then live_items = live_items + tonumber(live[i + 1]) end
end
if old == 0 then
  add_fields(7, KEYS[2], KEYS[3])
  local unreported = tonumber(ARGV[6]) - live_items
  if unreported > 0 then
    redis.call('LPUSH', KEYS[4], ARGV[3] .. ' ' .. unreported)
    redis.call('LTRIM', KEYS[4], 0, tonumber(ARGV[5]) - 1)
    redis.call('SET', KEYS[7], ARGV[3])
  end
end
redis.call('DEL', KEYS[6])
redis.call('HDEL', KEYS[5], ARGV[1])
for _, i in ipairs({1, 2, 3, 4, 5, 7}) do
  if redis.call('EXISTS', KEYS[i]) == 1 then redis.call('EXPIRE', KEYS[i], ARGV[4]) end
end
if old == 0 then return 1 end
return 0
"""

# Fold a whole group at once (rebuilding from roll-ups), only when none of its shards was
# counted yet. KEYS: done, counts, tallies  ARGV: ttl, n_indices, index..., field, value, ...
_FOLD_GROUP_SCRIPT = _ADD_FIELDS_LUA + """
local n = tonumber(ARGV[2])
for i = 3, 2 + n do
  if redis.call('GETBIT', KEYS[1], ARGV[i]) == 1 then return 0 end
end
for i = 3, 2 + n do redis.call('SETBIT', KEYS[1], ARGV[i], 1) end
add_fields(3 + n, KEYS[2], KEYS[3])
for i = 1, 3 do
  if redis.call('EXISTS', KEYS[i]) == 1 then redis.call('EXPIRE', KEYS[i], ARGV[1]) end
end
return 1
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
    counts: dict[str, int] = field(default_factory=dict)  # finished inputs by status
    shards_done: int = 0
    shards_total: int = 0
    in_flight: int = 0
    workers_alive: int = 0
    rate_per_s: float = 0.0  # inputs per second: recent while running, the job's own once ended
    eta_s: float | None = None
    cancelled: bool = False
    tally: Tally = field(default_factory=Tally)  # error classes, flags, stage seconds

    @property
    def processed(self) -> int:
        return sum(self.counts.values())

    @property
    def finished(self) -> bool:
        return bool(self.shards_total) and self.shards_done >= self.shards_total


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _pairs(fields: dict[str, float]) -> list:
    """Fields as the scripts take them: name, value, ... (statuses as integers)."""
    pairs: list = []
    for name, value in fields.items():
        pairs += [name, int(value) if name.startswith("status:") else repr(float(value))]
    return pairs


def _fields_of_outcome(outcome) -> dict[str, float]:
    """A shard's fields from its records, or from a plain ``{status: count}``."""
    if isinstance(outcome, dict):
        return {f"status:{status}": int(number) for status, number in outcome.items()}
    return fields_of(outcome)


class LiveProgress:
    def __init__(self, redis_client, job_id: str, *, ttl_s: int | None = None):
        self.redis = redis_client
        self.job_id = job_id
        self.ttl_s = settings().progress_ttl_s if ttl_s is None else ttl_s
        self._finish = redis_client.register_script(_FINISH_SCRIPT)
        self._fold_group = redis_client.register_script(_FOLD_GROUP_SCRIPT)
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
        """A (re)started shard reports its items afresh: an earlier attempt's live counts go."""
        pipe = self.redis.pipeline()
        pipe.hset(self.key("started"), shard_id, f"{worker or '?'} {time.time():.3f}")
        pipe.expire(self.key("started"), self.ttl_s)
        pipe.delete(self.key(f"live:{shard_id}"))
        pipe.execute()
        if worker:
            self.heartbeat(worker)

    def items_finished(self, shard_id: str, records: Sequence) -> None:
        """Some items of a running shard finished: one round trip per batch, so `status` moves
        per item. Counted again if the shard restarts (its live hash is reset then) and folded
        once when it finishes."""
        if not records:
            return
        fields = fields_of(records)
        now = f"{time.time():.3f}"
        live = self.key(f"live:{shard_id}")
        pipe = self.redis.pipeline(transaction=False)
        for name, value in fields.items():
            pipe.hincrbyfloat(live, name, value)
        pipe.expire(live, self.ttl_s)
        pipe.lpush(self.key("completions"), f"{now} {len(records)}")
        pipe.ltrim(self.key("completions"), 0, RATE_WINDOW - 1)
        pipe.expire(self.key("completions"), self.ttl_s)
        pipe.set(self.key("first"), now, nx=True, ex=self.ttl_s)
        pipe.set(self.key("last"), now, ex=self.ttl_s)
        pipe.execute()

    def shard_finished(self, shard_id: str, outcome) -> bool:
        """Fold the shard's records (or ``{status: count}``) in unless it was already counted;
        True when it was new."""
        from cutout.jobs.sharding import shard_index

        fields = _fields_of_outcome(outcome)
        items = sum(v for k, v in fields.items() if k.startswith("status:"))
        keys = [self.key("done"), self.key("counts"), self.key("tallies"), self.key("completions"),
                self.key("started"), self.key(f"live:{shard_id}"), self.key("last")]
        now = f"{time.time():.3f}"
        args = [shard_id, shard_index(shard_id), now, self.ttl_s, RATE_WINDOW, int(items), *_pairs(fields)]
        self.redis.set(self.key("first"), now, nx=True, ex=self.ttl_s)
        return bool(self._finish(keys=keys, args=args))

    def fold_group(self, shard_ids: Sequence[str], fields: dict[str, float]) -> bool:
        """Count a whole group from its roll-up, unless one of its shards is counted already."""
        from cutout.jobs.sharding import shard_index

        indices = [shard_index(shard_id) for shard_id in shard_ids]
        keys = [self.key("done"), self.key("counts"), self.key("tallies")]
        return bool(self._fold_group(keys=keys, args=[self.ttl_s, len(indices), *indices, *_pairs(fields)]))

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
        names = ("total", "counts", "tallies", "done", "started", "completions", "first", "last",
                 "workers", "cancel", "queued")
        live = [key for key in self.redis.scan_iter(match=self.key("live:*"), count=1000)]
        self.redis.delete(*(self.key(n) for n in names), *live)

    def shards_total(self) -> int:
        """Shards in the job as submit last set it (0 while submit is still writing them)."""
        return int(self.redis.hget(self.key("total"), "shards") or 0)

    def done_in_range(self, first_index: int, last_index: int) -> int:
        """How many shards with an index in ``[first_index, last_index]`` are counted done."""
        return int(self.redis.execute_command("BITCOUNT", self.key("done"), first_index, last_index, "BIT"))

    # --- reader -----------------------------------------------------------------------------------
    def snapshot(self) -> ProgressSnapshot:
        """Everything `status` shows, in two round trips and no storage request."""
        now = time.time()
        alive_since = now - settings().worker_alive_s
        pipe = self.redis.pipeline()
        pipe.hgetall(self.key("total"))
        pipe.hgetall(self.key("counts"))
        pipe.hgetall(self.key("tallies"))
        pipe.bitcount(self.key("done"))
        pipe.hkeys(self.key("started"))
        pipe.zcount(self.key("workers"), alive_since, "+inf")
        pipe.zcount(WORKERS_KEY, alive_since, "+inf")
        pipe.lrange(self.key("completions"), 0, -1)
        pipe.exists(self.key("cancel"))
        pipe.mget(self.key("first"), self.key("last"))
        total, counts, tallies, done, started, busy, alive, completions, cancelled, span = pipe.execute()
        fields = {f"status:{_text(k)}": float(v) for k, v in counts.items()}
        add_fields(fields, {_text(k): float(v) for k, v in tallies.items()})
        for live in self._live_fields([_text(s) for s in started]):
            add_fields(fields, live)
        tally = Tally.from_fields(fields)
        total = {_text(k): int(v) for k, v in total.items()}
        snap = ProgressSnapshot(
            total=total.get("items", 0), counts=tally.counts, shards_done=int(done),
            shards_total=total.get("shards", 0), in_flight=len(started),
            workers_alive=max(int(busy), int(alive)), cancelled=bool(cancelled), tally=tally,
        )
        first, last = (float(_text(v)) if v is not None else None for v in span)
        ended = snap.finished or snap.cancelled
        snap.rate_per_s = (_own_rate(snap.processed, first, last) if ended
                           else _rate([_text(c) for c in completions], now))
        remaining = snap.total - snap.processed
        if snap.cancelled:
            snap.eta_s = None  # nothing is coming
        elif snap.total and (remaining <= 0 or snap.finished):
            snap.eta_s = 0.0
        elif snap.rate_per_s > 0:
            snap.eta_s = remaining / snap.rate_per_s
        return snap

    def _live_fields(self, shard_ids: list[str]) -> list[dict[str, float]]:
        if not shard_ids:
            return []
        pipe = self.redis.pipeline(transaction=False)
        for shard_id in shard_ids:
            pipe.hgetall(self.key(f"live:{shard_id}"))
        return [{_text(k): float(v) for k, v in live.items()} for live in pipe.execute()]

    # --- recovery ---------------------------------------------------------------------------------
    def rebuild_from_durable(self, job_prefix: str) -> int:
        """After Redis lost its data: count every done shard again from the job's files.

        Groups with a roll-up are counted from it (one read per group); the other done shards
        from their records. Uses the same count-once bits as workers, so it is safe while
        workers are running and when run twice. Returns the number of shards newly counted.
        """
        from cutout.jobs import manifest, manifest_parts

        totals = manifest.load_totals(job_prefix)
        if totals is not None:
            self.set_total(*totals)
        done = manifest.done_shard_ids(job_prefix)
        added = 0
        for rollup in manifest_parts.load_rollups(job_prefix):
            covered = [shard["id"] for shard in rollup["shards"]]
            if set(covered) <= done and self.fold_group(covered, rollup["fields"]):
                added += len(covered)
                done -= set(covered)
        for shard_id in sorted(done):
            records = manifest.read_shard_records(job_prefix, shard_id)
            if self._rebuild_shard(shard_id, records):
                added += 1
        return added

    def _rebuild_shard(self, shard_id: str, records) -> bool:
        """Like ``shard_finished`` but without adding to the rate (old finishes would distort it)."""
        fields = fields_of(records)
        return self.fold_group([shard_id], fields)


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


def held_deliveries(redis_client) -> set[str]:
    """The broker's delivery tags of the messages workers note they hold."""
    tags = set()
    for raw in redis_client.hvals(HELD_KEY):
        try:
            tag = json.loads(raw)["task"].get("tag")
        except (ValueError, KeyError, TypeError, AttributeError):
            continue
        if tag:
            tags.add(str(tag))
    return tags


def release_shard(redis_client, worker: str) -> None:
    redis_client.hdel(HELD_KEY, worker)


def worker_seen(redis_client, worker: str) -> None:
    """A worker is alive, busy or idle (its liveness loop calls this): `status` counts it."""
    now = time.time()
    pipe = redis_client.pipeline()
    pipe.zadd(WORKERS_KEY, {worker: now})
    pipe.zremrangebyscore(WORKERS_KEY, "-inf", now - 10 * settings().worker_alive_s)
    pipe.execute()


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


def _own_rate(processed: int, first: float | None, last: float | None) -> float:
    """An ended job's rate: its inputs over the time from its first to its last finished item."""
    if first is None or last is None or last <= first:
        return 0.0
    return processed / (last - first)


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
