"""The command-line programs behind scripts/*.py (each: build_parser() and main(argv))."""
