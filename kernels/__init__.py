"""Delta-cache ops: torch references, Triton kernels and their torch.library registrations
(installed as chipmunk_compile.kernels)."""
