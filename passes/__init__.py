"""Graph analyses and rewrites on the torch-level Dynamo graph (installed as chipmunk_compile.passes)."""
