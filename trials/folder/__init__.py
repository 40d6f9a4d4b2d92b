"""The folder wing: a trial's folder (layout), its records, the store that reads and writes
them, and the environment and code version each record carries."""
