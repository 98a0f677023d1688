"""One module per ``deftly`` subcommand (see :mod:`deftly.cli`)."""
