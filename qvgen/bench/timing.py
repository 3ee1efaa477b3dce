"""How the benchmarks time a call: device time, host overhead, wall time.

- `device_ms` (CUDA): the GPU time of one call, without the Python that launches it. The calls
  are captured in a CUDA graph, each after an L2 flush (a 256 MB `zero_`), and the graph is
  replayed; the same graph of flushes alone is subtracted. Where capture fails (an op that
  synchronizes), `triton.testing.do_bench` (which also flushes L2) is the fallback.
- `host_ms` (CUDA): the CPU time to issue one call (launch overhead: Python, checks, allocation),
  measured without synchronizing between calls.
- `time_ms` in `kernels.py` is the wall clock on CPU (and host + device per call on CUDA).

Only ratios between functions timed in the same process are meaningful.

Why `graph_device_ms` is not `triton.testing.do_bench_cudagraph`: that replays the calls back to
back with a warm L2, so a layer whose weights fit in L2 (50 MB on H100) would be timed as if they
were always cached; in a real model every layer's weights come from HBM. `do_bench` flushes L2 but
times launch overhead too, so it is the fallback, not the default. The CPU path (`kernels.time_ms`)
is the wall clock, interleaving the functions so that a shared machine's drift hits all of them.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch

L2_FLUSH_BYTES = 256 * 2**20  # larger than any current GPU's L2 (H100/H200: 50 MB)


def _replay_ms(graph: torch.cuda.CUDAGraph, replays: int) -> float:
    """Median time of one replay of `graph`, in ms, by CUDA events."""
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def graph_device_ms(fn: Callable[[], object], device: torch.device, calls: int = 10, replays: int = 5) -> float:
    """Device time of one `fn()` in ms: CUDA-graph replay, L2 flushed before each call."""
    flush = torch.empty(L2_FLUSH_BYTES // 4, dtype=torch.int32, device=device)
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):  # warm-up on the capture stream (allocator, lazy init)
        fn()
    torch.cuda.current_stream(device).wait_stream(stream)
    torch.cuda.synchronize(device)
    with_fn, flush_only = torch.cuda.CUDAGraph(), torch.cuda.CUDAGraph()
    with torch.cuda.graph(with_fn):
        for _ in range(calls):
            flush.zero_()
            fn()
    with torch.cuda.graph(flush_only):
        for _ in range(calls):
            flush.zero_()
    with_fn.replay()  # first replay uploads the graph
    torch.cuda.synchronize(device)
    ms = (_replay_ms(with_fn, replays) - _replay_ms(flush_only, replays)) / calls
    del with_fn, flush_only, flush
    return max(ms, 0.0)


def device_ms(fn: Callable[[], object], device: torch.device) -> tuple[float, str]:
    """(device time of one call in ms, the method: "cuda-graph" or "do_bench"). `fn` must be warm
    (autotuned, compiled) — tuning inside a capture would be timed or would fail."""
    try:
        return graph_device_ms(fn, device), "cuda-graph"
    except Exception:  # capture refused (a synchronizing op): time with L2 flushes, launches included
        torch.cuda.synchronize(device)
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median")), "do_bench"


def host_ms(fn: Callable[[], object], device: torch.device, calls: int = 20) -> float:
    """CPU time to issue one call in ms (no synchronization between the calls)."""
    torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    elapsed = time.perf_counter() - t0
    torch.cuda.synchronize(device)
    return elapsed / calls * 1e3
