"""One module per `moepic` subcommand: each turns a typed request into a report dict. cli.py parses and prints."""
