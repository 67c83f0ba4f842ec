"""Client CPU per HTTP request: aiobatch vs a minimal aiohttp loop vs the openai SDK.

The fake HTTP server (``aiobatch fake-server``) runs in a separate process on loopback.
Each client runs the same workload: N batches at once, each uploading a 10-line file,
creating a batch, polling it every ``--poll`` seconds until it is completed, and
downloading its output file. We measure the client process's CPU time
(``time.process_time``) and count the HTTP requests it sent, and print CPU seconds per
request for each client and the ratios against the minimal aiohttp loop, which is the
baseline measured in the same run. Rounds are interleaved; the median round is shown.

Run: ``python benchmarks/bench_client_http.py [--batches 1000] [--rounds 3]``
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

import _common
import aiohttp
import openai

from aiobatch import BatchClient, RetryPolicy
from aiobatch.testing import chat_requests
from aiobatch.transport import AiohttpTransport

ENDPOINT = _common.ENDPOINT
KEY = _common.KEY
CountingTransport = _common.CountingTransport


def fake_server() -> contextlib.AbstractContextManager[str]:
    """``aiobatch fake-server`` in a subprocess, with this benchmark's timings."""
    return _common.fake_server(
        "--validation-seconds", "1", "--lines-per-second", "100", "--finalizing-seconds", "1"
    )


async def run_aiobatch(base: str, batches: int, poll: float) -> int:
    transport = CountingTransport(AiohttpTransport(limit=100))
    async with BatchClient(
        api_key=KEY, base_url=base, transport=transport, retry=RetryPolicy(max_attempts=5)
    ) as client:

        async def one(n: int) -> None:
            uploaded = await client.upload_file(
                chat_requests(10, prefix=f"b{n}"), filename=f"b{n}.jsonl"
            )
            batch = await client.create_batch(uploaded.id, ENDPOINT)
            batch = await client.wait(batch, poll_interval=poll, max_interval=poll)
            assert batch.output_file_id is not None, batch
            await client.file_content(batch.output_file_id)

        await asyncio.gather(*(one(n) for n in range(batches)))
    await transport.aclose()
    return transport.count


async def run_aiohttp(base: str, batches: int, poll: float) -> int:
    count = 0
    headers = {"Authorization": f"Bearer {KEY}"}
    async with aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=100), headers=headers
    ) as session:

        async def one(n: int) -> None:
            nonlocal count
            form = aiohttp.FormData()
            form.add_field("purpose", "batch")
            form.add_field("file", chat_requests(10, prefix=f"b{n}"), filename=f"b{n}.jsonl")
            async with session.post(f"{base}/files", data=form) as resp:
                file_id = json.loads(await resp.read())["id"]
            count += 1
            body = {"input_file_id": file_id, "endpoint": ENDPOINT, "completion_window": "24h"}
            async with session.post(f"{base}/batches", json=body) as resp:
                batch = json.loads(await resp.read())
            count += 1
            while batch["status"] not in ("completed", "failed", "expired", "cancelled"):
                await asyncio.sleep(poll)
                async with session.get(f"{base}/batches/{batch['id']}") as resp:
                    batch = json.loads(await resp.read())
                count += 1
            async with session.get(f"{base}/files/{batch['output_file_id']}/content") as resp:
                await resp.read()
            count += 1

        await asyncio.gather(*(one(n) for n in range(batches)))
    return count


async def run_openai(base: str, batches: int, poll: float) -> int:
    count = 0

    async def hook(_: Any) -> None:
        nonlocal count
        count += 1

    # The SDK's own default HTTP client (its pool, its timeouts), plus a counting hook.
    http_client = openai.DefaultAsyncHttpxClient(event_hooks={"request": [hook]})
    async with openai.AsyncOpenAI(
        api_key=KEY, base_url=base, http_client=http_client, max_retries=4
    ) as client:

        async def one(n: int) -> None:
            uploaded = await client.files.create(
                file=(f"b{n}.jsonl", chat_requests(10, prefix=f"b{n}")), purpose="batch"
            )
            batch = await client.batches.create(
                input_file_id=uploaded.id, endpoint=ENDPOINT, completion_window="24h"
            )
            while batch.status not in ("completed", "failed", "expired", "cancelled"):
                await asyncio.sleep(poll)
                batch = await client.batches.retrieve(batch.id)
            assert batch.output_file_id is not None
            content = await client.files.content(batch.output_file_id)
            content.read()

        await asyncio.gather(*(one(n) for n in range(batches)))
    return count


Runner = Callable[[str, int, float], Awaitable[int]]
CLIENTS: dict[str, Runner] = {
    "aiohttp loop (baseline)": run_aiohttp,
    "aiobatch": run_aiobatch,
    "openai SDK": run_openai,
}


def measure(runner: Runner, base: str, batches: int, poll: float) -> dict[str, Any]:
    cpu0, wall0 = time.process_time(), time.perf_counter()
    requests = asyncio.run(runner(base, batches, poll))
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    return {"cpu": cpu, "wall": wall, "requests": requests, "per_request": cpu / requests}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--poll", type=float, default=0.5, help="seconds between polls")
    args = parser.parse_args()

    results: dict[str, list[dict[str, Any]]] = {name: [] for name in CLIENTS}
    with fake_server() as base:
        for runner in CLIENTS.values():  # warm up imports, pools and the server
            measure(runner, base, 20, args.poll)
        for round_no in range(args.rounds):
            for name, runner in CLIENTS.items():
                row = measure(runner, base, args.batches, args.poll)
                results[name].append(row)
                print(
                    f"round {round_no + 1} {name:24s} cpu {row['cpu']:6.2f}s  "
                    f"wall {row['wall']:6.2f}s  requests {row['requests']:6d}  "
                    f"{row['per_request'] * 1e6:7.1f} us/request",
                    flush=True,
                )

    def median(name: str) -> dict[str, Any]:
        rows = sorted(results[name], key=lambda r: r["per_request"])
        return rows[len(rows) // 2]

    base_row = median("aiohttp loop (baseline)")
    print()
    print(f"{args.batches} batches x 10 lines, poll every {args.poll}s, median of {args.rounds}")
    versions = f"aiohttp {aiohttp.__version__}, openai {openai.__version__}"
    print(f"python {sys.version.split()[0]}, {versions}")
    print(f"{'client':24s} {'us CPU/request':>15s} {'requests':>9s} {'ratio':>7s}")
    for name in CLIENTS:
        row = median(name)
        ratio = row["per_request"] / base_row["per_request"]
        print(f"{name:24s} {row['per_request'] * 1e6:15.1f} {row['requests']:9d} {ratio:7.2f}x")
    spread = {
        name: statistics.pstdev(r["per_request"] for r in rows) * 1e6
        for name, rows in results.items()
    }
    print("spread (stdev us/request):", ", ".join(f"{k}: {v:.1f}" for k, v in spread.items()))


if __name__ == "__main__":
    main()
