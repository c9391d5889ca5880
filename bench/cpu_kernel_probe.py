"""Which shapes aten's CPU packed int8 kernel survives on this machine, one forked child
per shape (a crash kills only the child).

    python bench/cpu_kernel_probe.py

Session 7 found ``aten._weight_int8pack_mm`` segfaulting on the GPU machine's CPU (Intel
Xeon with AMX, torch 2.11) at M=1, K=1, N=5 while N=1 passed. Prints one line per shape:
``m k n dtype ok|SIGNAL``, then the shapes that failed.
"""

from __future__ import annotations

import itertools
import os
import signal
import sys

import torch


def run(m, k, n, dtype):
    x = torch.randn(m, k, dtype=dtype)
    q = torch.randint(-127, 128, (n, k), dtype=torch.int8)
    s = torch.rand(n, dtype=dtype) + 0.5
    y = torch.ops.aten._weight_int8pack_mm(x, q, s)
    want = x.float() @ (q.float() * s.float()[:, None]).T
    assert torch.allclose(y.float(), want, rtol=2e-2, atol=2e-2 * k**0.5), (m, k, n)


def main():
    print(torch.__version__, torch.backends.cpu.get_cpu_capability(), flush=True)
    bad = []
    shapes = itertools.product([1, 4, 33], [1, 16, 64, 100, 512], [1, 5, 8, 15, 16, 17, 32, 48, 123, 512])
    for (m, k, n), dtype in itertools.product(shapes, [torch.bfloat16, torch.float32]):
        pid = os.fork()
        if pid == 0:
            try:
                run(m, k, n, dtype)
                os._exit(0)
            except AssertionError:
                os._exit(3)
        _, status = os.waitpid(pid, 0)
        res = "ok"
        if os.WIFSIGNALED(status):
            res = signal.Signals(os.WTERMSIG(status)).name
        elif os.WEXITSTATUS(status):
            res = "WRONG" if os.WEXITSTATUS(status) == 3 else f"exit {os.WEXITSTATUS(status)}"
        print(m, k, n, str(dtype).split(".")[1], res, flush=True)
        if res != "ok":
            bad.append((m, k, n, str(dtype)))
    print("failed:", bad)
    sys.exit(0)


if __name__ == "__main__":
    main()
