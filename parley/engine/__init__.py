"""The engine: requests, scheduler, paged KV blocks, runner, and the asyncio facade."""
