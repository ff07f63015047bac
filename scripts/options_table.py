"""Prints the README's options table from chipmunk_compile.options (the single source of the docs)."""
import dataclasses

from chipmunk_compile.options import OPTION_DOCS, ChipmunkOptions

print("| option | default | meaning |")
print("|---|---|---|")
for field in dataclasses.fields(ChipmunkOptions):
    print(f"| `{field.name}` | `{field.default!r}` | {OPTION_DOCS[field.name]} |")
