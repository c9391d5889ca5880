"""Which shapes aten's CPU packed int8 kernel survives on this machine, one forked child
per shape (a crash kills only the child).

    python bench/cpu_kernel_probe.py

Also ``torch._int_mm`` (int8 x int8 -> int32, exact comparison). Session 7 found
``aten._weight_int8pack_mm`` segfaulting on the GPU machine's CPU (Intel
Xeon with AMX, torch 2.11) at M=1, K=1, N=5 while N=1 passed, and on the CI machine
(AVX2, torch 2.13) for bf16 with K % 8 != 0. Prints one line per shape: ``m k n dtype
ok|WRONG|SIGNAL``, then the shapes and the K values that failed per dtype. A kernel that
reads past a row may pass by luck, so "ok" is evidence, not proof.
"""

from __future__ import annotations

import itertools
import os
import signal
import sys

import torch


def run(m, k, n, dtype):
    """``_weight_int8pack_mm`` with ``dtype`` activations, or ``torch._int_mm`` for dtype None."""
    q = torch.randint(-127, 128, (n, k), dtype=torch.int8)
    if dtype is None:
        a = torch.randint(-127, 128, (m, k), dtype=torch.int8)
        assert torch.equal(torch._int_mm(a, q.t()).long(), a.long() @ q.long().t()), (m, k, n)
        return
    x = torch.randn(m, k, dtype=dtype)
    s = torch.rand(n, dtype=dtype) + 0.5
    y = torch.ops.aten._weight_int8pack_mm(x, q, s)
    want = x.float() @ (q.float() * s.float()[:, None]).T
    assert torch.allclose(y.float(), want, rtol=2e-2, atol=2e-2 * k**0.5), (m, k, n)


def main():
    print(torch.__version__, torch.backends.cpu.get_cpu_capability(), flush=True)
    bad = []
    ks = [1, 8, 16, 24, 32, 40, 48, 56, 64, 96, 100, 136, 512]
    shapes = itertools.product([1, 4, 33], ks, [1, 5, 15, 16, 17, 123])
    for (m, k, n), dtype in itertools.product(shapes, [torch.bfloat16, torch.float16, torch.float32, None]):
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
        name = "int_mm" if dtype is None else "int8pack_" + str(dtype).split(".")[1]
        print(m, k, n, name, res, flush=True)
        if res != "ok":
            bad.append((m, k, n, name))
    print("failed:", bad)
    for name in ("int8pack_bfloat16", "int8pack_float16", "int8pack_float32", "int_mm"):
        print(name, "K that failed:", sorted({b[1] for b in bad if b[3] == name}))
    sys.exit(0)


if __name__ == "__main__":
    main()
