"""The server's memory with 10^6 accounts in 100 ledgers: a measurement, not a test.

    .venv/bin/python bench/memory.py                    # about ten minutes on a loaded machine
    .venv/bin/python bench/memory.py --before /tmp/old  # also serve another checkout, same data

Builds 100 ledgers of 10,000 accounts each in process (through the writers, 1,000 accounts a
group: every account is an event in its ledger's log), then serves them with bench/run.py's
server (no projection process: its catching up on 10^6 events would be measured too) and loads
it with wrk: 1,000-transfer batches, each on a ledger chosen at random, between random accounts
of it, so that the writers' caches of all 100 ledgers fill. Prints the server's resident memory
(VmRSS) after start, after the load, and its peak (VmHWM). With ``--before DIR``, the same
load is run against a server from DIR first (e.g. ``git archive <commit> | tar -x -C DIR``),
for a before/after in the same run.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import run  # noqa: E402  (bench/run.py: the same Postgres and server as the benchmark)

from ledger import domain  # noqa: E402

LEDGERS = 100
ACCOUNTS = 10_000
"""Per ledger: 10^6 in all."""

WRK_SCRIPT = """
math.randomseed(os.time() + tonumber(tostring({}):sub(8), 16))
local counter = 0
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer " .. os.getenv("BENCH_TOKEN")
function request()
  counter = counter + 1
  local ledger = math.random(0, %(ledgers)d - 1)
  local items = {}
  for k = 1, 1000 do
    local a = math.random(0, %(accounts)d - 1)
    local b = math.random(0, %(accounts)d - 2)
    if b >= a then b = b + 1 end
    items[k] = string.format('{"id":"m%%d-%%d-%%d-%%d","postings":[{"debit":"a%%d","credit":"a%%d","amount":"1","asset":"USD/2"}]}',
      os.time(), math.random(1, 1e9), counter, k, a, b)
  end
  return wrk.format(nil, "/v1/ledgers/m" .. ledger .. "/transfers/batch", nil,
    '{"items":[' .. table.concat(items, ",") .. ']}')
end
done = function(summary, latency, requests)
  local errors = summary.errors.status + summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.timeout
  io.write(string.format('RESULT %%d %%f %%d\\n', summary.requests, summary.duration / 1e6, errors))
end
"""


async def build(url: str) -> float:
    """10^6 accounts in 100 ledgers; returns the seconds it took."""
    pool = run.postgres.async_pool(url, 8)
    await pool.open()
    svc = run.LedgerService(pool)
    started = time.perf_counter()

    async def one(n: int) -> None:
        name = f"m{n}"
        await svc.create_ledger(name, None, {})
        writer = svc.writers.get(await svc.ledger_ref(name))
        for start in range(0, ACCOUNTS, 1000):
            outcomes = await writer.submit(
                [
                    (domain.OpenAccount(f"a{i}", "liability"), {})
                    for i in range(start, start + 1000)
                ]
            )
            assert not any(isinstance(o, Exception) for o in outcomes), outcomes[:1]

    for first in range(0, LEDGERS, 4):
        await asyncio.gather(*[one(n) for n in range(first, min(first + 4, LEDGERS))])
        if first % 20 == 0:
            done = first + 4
            print(f"memory: {done * ACCOUNTS:,} accounts, {time.perf_counter() - started:.0f} s",
                  flush=True)
    took = time.perf_counter() - started
    await svc.close()
    await pool.close()
    return took


def rss_mb(pid: int, field: str = "VmRSS:") -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field):
            return int(line.split()[1]) / 1024
    return float("nan")


def load(url: str, seconds: int, root: str | None) -> dict[str, float]:
    if root:
        os.environ["BENCH_SERVER_ROOT"] = root
    else:
        os.environ.pop("BENCH_SERVER_ROOT", None)
    script = Path(tempfile.mkstemp(suffix=".lua")[1])
    script.write_text(WRK_SCRIPT % {"ledgers": LEDGERS, "accounts": ACCOUNTS})
    try:
        with run.server(url, projections=False) as (port, pid):
            time.sleep(2)
            started = rss_mb(pid)
            out = subprocess.run(
                ["wrk", "-t", "2", "-c", "4", "-d", f"{seconds}s", "--timeout", "30s",
                 "-s", str(script), f"http://127.0.0.1:{port}"],
                capture_output=True, text=True, timeout=seconds + 120, check=True,
                env={**os.environ, "BENCH_TOKEN": run.TOKEN[0]},
            ).stdout
            line = next(x for x in out.splitlines() if x.startswith("RESULT "))
            requests, took, errors = line.split()[1:]
            assert int(errors) == 0, out
            return {
                "rss_start_mb": started,
                "rss_end_mb": rss_mb(pid),
                "rss_peak_mb": rss_mb(pid, "VmHWM:"),
                "transfers": int(requests) * 1000,
                "transfers_per_s": int(requests) * 1000 / float(took),
            }
    finally:
        script.unlink()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=60, help="of load per server")
    parser.add_argument("--before", help="a checkout to serve first, for a before/after")
    args = parser.parse_args()
    with run.cluster() as (server_url, _), run.database(server_url, "ledger_memory") as url:
        run.migrate(url)
        took = asyncio.run(build(url))
        run.TOKEN[0] = asyncio.run(run.make_key(url))
        print(f"memory: built {LEDGERS * ACCOUNTS:,} accounts in {LEDGERS} ledgers in {took:.0f} s")
        phases = ([("before", args.before)] if args.before else []) + [("now", None)]
        for label, root in phases:
            found = load(url, args.seconds, root)
            print(
                f"memory: {label}: server RSS {found['rss_start_mb']:.0f} MiB after start,"
                f" {found['rss_end_mb']:.0f} MiB after {found['transfers']:,} transfers"
                f" ({found['transfers_per_s']:,.0f}/s) on random accounts of the {LEDGERS}"
                f" ledgers, peak {found['rss_peak_mb']:.0f} MiB; load average"
                f" {os.getloadavg()[0]:.1f}",
                flush=True,
            )


if __name__ == "__main__":
    main()
