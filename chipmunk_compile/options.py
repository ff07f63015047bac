"""Options of the ``chipmunk`` backend: one validated, documented dataclass.

``torch.compile(model, backend="chipmunk", options={...})`` hands the dict to ``ChipmunkOptions.from_dict``,
which rejects unknown keys (listing the valid ones) and out-of-range values with a message naming the key, the
value and what is allowed. The README's options table is generated from ``OPTION_DOCS``.
"""
from __future__ import annotations

import dataclasses
import difflib
import numbers
import os
from typing import Any

MODES = ("chipmunk", "dense")
INNER_BACKENDS = ("inductor", "aot_eager", "eager")
KERNEL_PROVIDERS = ("auto", "torch", "triton")
STATIC_COLUMNS = ("auto", "none")
CACHE_DTYPES = ("float32", "model")

OPTION_DOCS: dict[str, str] = {
    "mode": "'chipmunk': delta-cache sparsity per the schedules; 'dense': graph rewritten but every step dense "
            "(debugging, exactness checks).",
    "attn_sparsity": "Fraction of key columns NOT recomputed on sparse attention steps (0 = all kept).",
    "attn_random_fraction": "Extra fraction of key columns chosen uniformly at random per query group.",
    "attn_static_columns": "'auto': every query always attends to the short segment of a joint text+image "
                           "sequence (the text tokens) when the graph shows one; 'none': no static columns.",
    "attn_warmup_steps": "Attention is dense for steps 0..N-1 (>= 2: step 0 gives the LSE, step 1 the first "
                         "column selection).",
    "attn_dense_every": "Attention is also dense every k-th step (0 = never after warm-up).",
    "attn_dense_steps": "Explicit list of dense attention steps; replaces warm-up and dense_every when given.",
    "attn_recompute_mask": "Re-select key columns at every dense step (False: keep the first selection).",
    "attn_query_group": "Queries sharing one column selection (consecutive tokens).",
    "attn_kv_tile": "The number of kept key columns is rounded to a multiple of this (the kernel's KV tile).",
    "mlp_sparsity": "Fraction of hidden units NOT recomputed per token block on sparse MLP steps.",
    "mlp_random_fraction": "Extra fraction of hidden units chosen at random per token block.",
    "mlp_warmup_steps": "MLP is dense for steps 0..N-1.",
    "mlp_dense_every": "MLP is also dense every k-th step (0 = never after warm-up).",
    "mlp_dense_steps": "Explicit list of dense MLP steps; replaces warm-up and dense_every when given.",
    "mlp_refresh_until": "Before this step the MLP unit selection is refreshed on every sparse step.",
    "mlp_refresh_every": "From mlp_refresh_until on, the selection is refreshed every k-th step.",
    "mlp_token_block": "Tokens sharing one hidden-unit selection (consecutive tokens).",
    "mlp_unit_tile": "The number of kept hidden units is rounded to a multiple of this.",
    "mlp_output_cache_dtype": "Precision of the cached MLP output y that sparse steps correct in place: 'model': the "
                              "MLP input's dtype, as in the reference implementation (bf16/fp16 models: y rounded "
                              "once per sparse step; half the memory and cache traffic of float32; measured on the "
                              "H100 reference DiT within 0.07 dB PSNR of float32) or 'float32' (corrections "
                              "accumulate unrounded).",
    "token_grid": "(frames, height, width) of the image/video tokens in the model's sequence (latent tokens after "
                  "patchifying, e.g. (1, 64, 64) for a FLUX 1024x1024 image). When given, query groups and MLP token "
                  "blocks are formed from spatial tiles of token_tile instead of consecutive raster tokens (the "
                  "method's token reordering; exact on dense steps). None: no reordering.",
    "token_tile": "(frames, height, width) of one tile when token_grid is given: tokens are ordered tile by tile, "
                  "raster order inside a tile (8x8 patches: a 192-query group is 3 tiles, a 128-token MLP block 2).",
    "first_dense_layers": "The first N transformer blocks (in execution order, all block kinds counted) are "
                          "never rewritten.",
    "sparsify_attention": "Rewrite attention sites.",
    "sparsify_mlp": "Rewrite MLP sites.",
    "num_steps": "Denoising steps per generation; all state resets after num_steps * invocations_per_step calls.",
    "invocations_per_step": "Model calls per denoising step (2 when cond and uncond CFG passes are separate "
                            "calls); each invocation keeps its own caches. Not needed with follow_scheduler once "
                            "the scheduler's step() has been seen (invocations are then counted between steps).",
    "seed": "Seed of the random column/unit choice (deterministic per site, step and sample).",
    "kernels": "'auto': Triton on CUDA (attention on the warp-specialised Gluon kernels where they apply: Hopper, "
               "bf16/fp16, head dim 64/128), torch reference elsewhere; 'torch': always the reference; 'triton': "
               "always Triton (CPU only under TRITON_INTERPRET=1).",
    "cudagraphs": "Run the Inductor part under CUDA graphs, as torch.compile(mode='reduce-overhead') does (a "
                  "custom backend cannot receive mode and options together); the chipmunk ops run between graphs.",
    "inner_backend": "Compiler for the rewritten graph: 'inductor', or 'aot_eager' / 'eager' for debugging.",
    "dump_dir": "Write FX code before/after, the site report (JSON) and a picture of the rewritten region per "
                "compiled graph into this folder (also from env CHIPMUNK_DUMP_DIR).",
}


@dataclasses.dataclass(frozen=True)
class ChipmunkOptions:
    mode: str = "chipmunk"
    attn_sparsity: float = 0.835
    attn_random_fraction: float = 0.01
    attn_static_columns: str = "auto"
    attn_warmup_steps: int = 2
    attn_dense_every: int = 10
    attn_dense_steps: tuple[int, ...] | None = None
    attn_recompute_mask: bool = True
    attn_query_group: int = 192
    attn_kv_tile: int = 64
    mlp_sparsity: float = 0.7
    mlp_random_fraction: float = 0.05
    mlp_warmup_steps: int = 1
    mlp_dense_every: int = 10
    mlp_dense_steps: tuple[int, ...] | None = None
    mlp_refresh_until: int = 10
    mlp_refresh_every: int = 2
    mlp_token_block: int = 128
    mlp_unit_tile: int = 64
    mlp_output_cache_dtype: str = "model"
    token_grid: tuple[int, int, int] | None = None
    token_tile: tuple[int, int, int] = (1, 8, 8)
    first_dense_layers: int = 2
    sparsify_attention: bool = True
    sparsify_mlp: bool = True
    num_steps: int = 50
    invocations_per_step: int = 1
    seed: int = 0
    kernels: str = "auto"
    cudagraphs: bool = False
    inner_backend: str = "inductor"
    dump_dir: str | None = None

    @classmethod
    def from_dict(cls, options: dict[str, Any] | None) -> "ChipmunkOptions":
        if options is not None and not isinstance(options, dict):
            raise ValueError(f"chipmunk: options must be a dict of option name -> value (e.g. "
                             f"options={{'mode': 'dense'}}), got {type(options).__name__} {options!r}.")
        options = dict(options or {})
        valid = [f.name for f in dataclasses.fields(cls)]
        unknown = [k for k in options if k not in valid]
        if unknown:
            hints = {k: difflib.get_close_matches(k, valid, n=1) for k in unknown}
            hint = "; ".join(f"{k!r} (did you mean {h[0]!r}?)" if h else repr(k) for k, h in hints.items())
            raise ValueError(f"chipmunk: unknown option(s) {hint}. Valid options: {', '.join(valid)}.")
        # numpy / torch scalars become Python numbers for numeric options (np.float32 is no float subclass).
        defaults = {f.name: f.default for f in dataclasses.fields(cls)}
        for key, value in options.items():
            default, is_bool = defaults[key], isinstance(value, bool)
            if isinstance(default, float) and isinstance(value, numbers.Real) and not is_bool:
                options[key] = float(value)
            elif (isinstance(default, int) and not isinstance(default, bool) and isinstance(value, numbers.Integral)
                  and not is_bool):
                options[key] = int(value)
        if "dump_dir" not in options and os.environ.get("CHIPMUNK_DUMP_DIR"):
            options["dump_dir"] = os.environ["CHIPMUNK_DUMP_DIR"]
        for key in ("token_grid", "token_tile"):
            value = options.get(key)
            if value is not None and not isinstance(value, (str, bytes)) and hasattr(value, "__iter__"):
                options[key] = tuple(value)
        for key in ("attn_dense_steps", "mlp_dense_steps"):
            if options.get(key) is not None:
                steps = options[key]
                if isinstance(steps, (str, bytes)) or not hasattr(steps, "__iter__"):
                    raise ValueError(f"chipmunk: option {key!r} must be a list of step numbers, got {steps!r}.")
                steps = list(steps)
                if not all(isinstance(s, numbers.Integral) and not isinstance(s, bool) for s in steps):
                    raise ValueError(f"chipmunk: option {key!r} must be a list of integer step numbers, got "
                                     f"{steps!r}.")
                options[key] = tuple(sorted({int(s) for s in steps}))
        opts = cls(**options)
        opts.validate()
        return opts

    def validate(self) -> None:
        def fail(key, allowed):
            raise ValueError(f"chipmunk: option {key!r}={getattr(self, key)!r} is invalid; allowed: {allowed}.")

        def check_type(key, types):
            value = getattr(self, key)
            if isinstance(value, bool) and bool not in types:
                fail(key, " or ".join(t.__name__ for t in types))
            if not isinstance(value, types):
                fail(key, " or ".join(t.__name__ for t in types))

        for key, choices in (("mode", MODES), ("inner_backend", INNER_BACKENDS),
                             ("kernels", KERNEL_PROVIDERS), ("attn_static_columns", STATIC_COLUMNS),
                             ("mlp_output_cache_dtype", CACHE_DTYPES)):
            if getattr(self, key) not in choices:
                fail(key, " | ".join(repr(c) for c in choices))
        for key in ("attn_sparsity", "attn_random_fraction", "mlp_sparsity", "mlp_random_fraction"):
            check_type(key, (int, float))
            if not 0.0 <= getattr(self, key) <= 1.0:
                fail(key, "a number in [0, 1]")
        for key in ("attn_query_group", "attn_kv_tile", "mlp_token_block", "mlp_unit_tile", "num_steps",
                    "invocations_per_step"):
            check_type(key, (int,))
            if getattr(self, key) < 1:
                fail(key, "an integer >= 1")
        for key in ("attn_warmup_steps", "attn_dense_every", "mlp_warmup_steps", "mlp_dense_every",
                    "mlp_refresh_until", "first_dense_layers", "seed"):
            check_type(key, (int,))
            if getattr(self, key) < 0:
                fail(key, "an integer >= 0")
        check_type("mlp_refresh_every", (int,))
        if self.mlp_refresh_every < 1:
            fail("mlp_refresh_every", "an integer >= 1")
        if self.mlp_warmup_steps < 1 and self.mlp_dense_steps is None:
            fail("mlp_warmup_steps", "an integer >= 1 (step 0 must be dense to fill the caches)")
        if self.attn_warmup_steps < 2 and self.attn_dense_steps is None:
            fail("attn_warmup_steps", "an integer >= 2 (step 0 gives the LSE, step 1 the first selection)")
        for key in ("attn_dense_steps", "mlp_dense_steps"):
            steps = getattr(self, key)
            if steps is not None and (not steps or not all(isinstance(s, int) and not isinstance(s, bool)
                                                            and s >= 0 for s in steps) or steps[0] != 0):
                fail(key, "a non-empty list of integers >= 0 that contains step 0")
        for key in ("attn_recompute_mask", "sparsify_attention", "sparsify_mlp", "cudagraphs"):
            if not isinstance(getattr(self, key), bool):
                fail(key, "True or False")
        for key in ("token_grid", "token_tile"):
            value = getattr(self, key)
            if value is None and key == "token_grid":
                continue
            if not (isinstance(value, tuple) and len(value) == 3 and all(
                    isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in value)):
                fail(key, "(frames, height, width): three integers >= 1" + (" or None" if key == "token_grid" else ""))
        if self.dump_dir is not None and not isinstance(self.dump_dir, (str, os.PathLike)):
            fail("dump_dir", "a folder path (str) or None")

    # --- schedules -----------------------------------------------------------------------------------------
    def _dense_at(self, step: int, explicit, warmup: int, every: int) -> bool:
        if self.mode == "dense":
            return True
        if explicit is not None:
            return step in explicit
        return step < warmup or (every > 0 and step % every == 0)

    def attention_dense_at(self, step: int) -> bool:
        return self._dense_at(step, self.attn_dense_steps, self.attn_warmup_steps, self.attn_dense_every)

    def mlp_dense_at(self, step: int) -> bool:
        return self._dense_at(step, self.mlp_dense_steps, self.mlp_warmup_steps, self.mlp_dense_every)

    def mlp_refresh_at(self, step: int) -> bool:
        return step < self.mlp_refresh_until or step % self.mlp_refresh_every == 0
