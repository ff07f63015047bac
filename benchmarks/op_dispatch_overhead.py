"""Host cost per call of an op with the chipmunk MLP op's schema, registered two ways (CPU, no GPU needed).

- ``torch.library.custom_op`` (what DESIGN.md suggests): autograd + ADInplaceOrView wrappers around the body;
- ``torch.library.define`` + ``impl`` + ``register_fake`` (kernels/op_registration.py, what the ops use).

The body does nothing, so the difference is pure dispatch overhead. Prints microseconds per call (median of 5
repeats of 2000 calls) under ``torch.no_grad()``. Usage: python benchmarks/op_dispatch_overhead.py
"""
from __future__ import annotations

import statistics
import time

import torch

SCHEMA = ("(Tensor x, Tensor w_gate, Tensor? b_gate, Tensor? w_up, Tensor? b_up, Tensor w2, Tensor? b2, "
          "Tensor(a!) y_cache, Tensor(b!) a_cache, Tensor(c!) hbar_cache, Tensor(d!) indices, Tensor? token_perm, "
          "Tensor? token_unperm, str activation, int runtime_id, int site_index) -> Tensor")


def body(x, w_gate, b_gate, w_up, b_up, w2, b2, y_cache, a_cache, hbar_cache, indices, token_perm, token_unperm,
         activation, runtime_id, site_index):
    return x.new_empty(x.shape)


@torch.library.custom_op("overhead_demo::via_custom_op", mutates_args=("y_cache", "a_cache", "hbar_cache", "indices"))
def via_custom_op(x: torch.Tensor, w_gate: torch.Tensor, b_gate: torch.Tensor | None, w_up: torch.Tensor | None,
                  b_up: torch.Tensor | None, w2: torch.Tensor, b2: torch.Tensor | None, y_cache: torch.Tensor,
                  a_cache: torch.Tensor, hbar_cache: torch.Tensor, indices: torch.Tensor,
                  token_perm: torch.Tensor | None, token_unperm: torch.Tensor | None, activation: str,
                  runtime_id: int, site_index: int) -> torch.Tensor:
    return x.new_empty(x.shape)


torch.library.define("overhead_demo::via_define", SCHEMA)
torch.library.impl("overhead_demo::via_define", ("cpu", "cuda"), body)


def per_call_us(op, args, calls=2000, repeats=5):
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(calls):
            op(*args)
        times.append((time.perf_counter() - t0) / calls * 1e6)
    return statistics.median(times)


def main():
    t = torch.zeros(4, 4)
    args = (t, t, None, None, None, t, None, t, t, t, t.long(), None, None, "gelu_tanh", 1, 0)
    with torch.no_grad():
        custom = per_call_us(torch.ops.overhead_demo.via_custom_op.default, args)
        direct = per_call_us(torch.ops.overhead_demo.via_define.default, args)
        plain = per_call_us(body, args)
    print(f"torch {torch.__version__}, CPU, 16-argument schema, empty body, us per call (median)")
    print(f"  plain Python call              {plain:7.1f}")
    print(f"  torch.library.custom_op        {custom:7.1f}")
    print(f"  torch.library.define + impl    {direct:7.1f}")


if __name__ == "__main__":
    main()
