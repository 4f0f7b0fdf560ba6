"""`python -m llava_ultra ...` runs the CLI (also what `torchrun -m llava_ultra eval ...` launches)."""

from llava_ultra.cli import app

app(prog_name="llava-ultra")
