"""chipmunk_compile: a torch.compile backend that runs diffusion transformers with Chipmunk delta caches.

    model = torch.compile(transformer, backend="chipmunk", options={"attn_sparsity": 0.9})
    chipmunk_compile.explain(transformer, **inputs)   # which sites are rewritten, and why not
    chipmunk_compile.reset(model)                     # start a new generation (after an aborted one)
    chipmunk_compile.stats(model)                     # per compiled graph: step, plans run, cache memory
    chipmunk_compile.follow_scheduler(pipe)           # generations follow the pipeline's scheduler steps

``backend="chipmunk"`` is registered through the ``torch_dynamo_backends`` entry point, so no import is
needed for it; ``chipmunk_backend`` is exported for passing the callable directly.
"""
from chipmunk_compile.backend import ChipmunkFallbackWarning, chipmunk_backend
from chipmunk_compile.explain import ExplainReport, explain
from chipmunk_compile.options import OPTION_DOCS, ChipmunkOptions
from chipmunk_compile.runtime import reset, stats
from chipmunk_compile.scheduler_sync import begin_generation, follow_scheduler

__all__ = ["chipmunk_backend", "explain", "reset", "stats", "follow_scheduler", "begin_generation", "ExplainReport",
           "ChipmunkOptions", "OPTION_DOCS", "ChipmunkFallbackWarning"]
__version__ = "0.1.0"
