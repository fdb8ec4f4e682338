"""One module per `geometryd` subcommand: its argparse parser and one call into the library
(daemon/cli.py)."""
