"""`python -m app.cli`, the same as the `tunehouse` command."""

from app.cli import main

main()
