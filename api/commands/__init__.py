"""The ``locod`` command's subcommands, a module for each group as ``locod --help`` lists them; ``locod.cli``
parses the command line and calls them."""
