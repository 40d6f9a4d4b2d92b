from lth.cli import entry

entry()
