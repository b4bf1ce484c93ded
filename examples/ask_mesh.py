"""Ask a meshllm mesh many prompts at once, or chat with it, through one MQTT connection.

Start a mesh first: ``meshllm demo`` (several emulated nodes on this machine),
or ``meshllm node --mesh home --model DIR`` on each device. Then::

    python examples/ask_mesh.py --mesh home "Once upon a time" "The little robot" -c 2
    python examples/ask_mesh.py --mesh home --file prompts.txt -c 8 --max-tokens 64
    python examples/ask_mesh.py --mesh home --chat

The mesh's broker is found over mDNS like ``meshllm status`` does; pass
``--broker mqtt://host:port`` where mDNS does not reach (another subnet, a
container). Batch mode prints each answer as it completes, then the
throughput; chat mode streams the answers and keeps the conversation.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections import Counter
from typing import Any

from meshllm.errors import MeshError
from meshllm.serve.client import Client, RequestFailed, Result


async def batch(client: Client, prompts: list[str], concurrency: int, params: dict[str, Any]) -> int:
    """Runs the prompts with at most ``concurrency`` in flight; returns how many failed."""
    limit = asyncio.Semaphore(concurrency)  # the mesh answers 'busy' beyond its queue: do not flood it
    failures: Counter[str] = Counter()
    results: list[Result] = []

    async def one(i: int, prompt: str) -> None:
        async with limit:
            try:
                r = await client.complete(prompt, **params)
            except RequestFailed as e:
                failures[e.code] += 1
                print(f"[{i}] failed: {e}", file=sys.stderr)
                return
        results.append(r)
        print(f"[{i}] {prompt!r} ->{r.text!r}  ({r.usage.completion_tokens} tokens, "
              f"first after {r.ttft_s:.2f} s, {r.finish_reason})")

    t0 = time.monotonic()
    async with asyncio.TaskGroup() as tg:
        for i, p in enumerate(prompts):
            tg.create_task(one(i, p))
    wall = time.monotonic() - t0
    tokens = sum(r.usage.completion_tokens for r in results)
    print(f"\n{len(results)}/{len(prompts)} answered in {wall:.1f} s: {tokens} tokens, {tokens / wall:.1f} tokens/s "
          f"over the mesh" + (f"; failures: {dict(failures)}" if failures else ""))
    return sum(failures.values())


async def chat(client: Client, params: dict[str, Any]) -> None:
    """A conversation: each answer is streamed, and the whole chat is sent with every turn."""
    messages: list[dict[str, str]] = []
    print("Chat with the mesh; an empty line or Ctrl-D ends it.")
    while True:
        try:
            line = await asyncio.to_thread(input, "you> ")
        except EOFError:
            break
        if not line.strip():
            break
        messages.append({"role": "user", "content": line})
        print("mesh> ", end="", flush=True)
        answer = []
        try:
            async for chunk in client.stream(messages=messages, **params):
                print(chunk.text, end="", flush=True)
                answer.append(chunk.text)
        except RequestFailed as e:
            print(f"\n(failed: {e})")
            messages.pop()
            continue
        print()
        messages.append({"role": "assistant", "content": "".join(answer)})


async def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("prompts", nargs="*", help="prompts to complete (batch mode)")
    ap.add_argument("--file", help="read prompts from this file, one a line")
    ap.add_argument("--chat", action="store_true", help="chat instead of completing prompts")
    ap.add_argument("--mesh", default="meshllm")
    ap.add_argument("--broker", help="mqtt://host:port (default: find it over mDNS)")
    ap.add_argument("--interface", help="IPv4 address for mDNS")
    ap.add_argument("-c", "--concurrency", type=int, default=4, help="requests in flight at once (batch mode)")
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--temperature", type=float, default=0.7)
    args = ap.parse_args()
    prompts = list(args.prompts)
    if args.file:
        with open(args.file, encoding="utf-8") as f:
            prompts += [line.strip() for line in f if line.strip()]
    if not args.chat and not prompts:
        ap.error("give prompts, --file or --chat")
    params = {"max_tokens": args.max_tokens, "temperature": args.temperature}
    try:
        async with Client(args.mesh, args.broker, args.interface) as client:
            if args.chat:
                await chat(client, params)
                return 0
            return 1 if await batch(client, prompts, max(1, args.concurrency), params) else 0
    except MeshError as e:
        print(f"ask_mesh: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
