"""The private AOTAutograd contract the cache buffers rely on: a buffer added to a Dynamo GraphModule after
tracing needs an entry in gm._param_name_to_source. Same in torch 2.11 and 2.13; this test catches a change."""
import torch
import torch.fx as fx

from chipmunk_compile.passes.state_buffers import add_state_buffer


@torch.library.custom_op("chipmunk_test::accumulate", mutates_args=("state",))
def accumulate(x: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
    state.add_(x)
    return state.clone()


@accumulate.register_fake
def _(x, state):
    return torch.empty_like(state)


def _backend_with_buffer(gm: fx.GraphModule, example_inputs):
    out_node = next(n for n in gm.graph.nodes if n.op == "output")
    x = next(n for n in gm.graph.nodes if n.op == "placeholder")
    state = add_state_buffer(gm, "chipmunk_test_state", torch.zeros(3), out_node)
    with gm.graph.inserting_before(out_node):
        acc = gm.graph.call_function(torch.ops.chipmunk_test.accumulate.default, (x, state))
    out_node.args = ((acc,),)
    gm.recompile()
    return torch._dynamo.lookup_backend("aot_eager")(gm, example_inputs)


def test_buffer_state_persists_across_calls_under_aot_autograd():
    fn = torch.compile(lambda x: x * 1, backend=_backend_with_buffer)
    assert torch.equal(fn(torch.ones(3)), torch.ones(3))
    assert torch.equal(fn(torch.ones(3)), 2 * torch.ones(3))  # the buffer kept the first call's update
