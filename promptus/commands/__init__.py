"""The ``promptus`` command line: one module per command, the parser in :mod:`.main`.

Each command module exposes ``register(subparsers)`` (adds its sub-parser and
``set_defaults(func=run)``) and ``run(args) -> int``. Adding a command is one
module here plus one entry in :data:`promptus.commands.main.COMMANDS`. Commands
parse options, call the library and print; the library never imports this package.
"""
