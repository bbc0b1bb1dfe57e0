"""The ``pflat`` command line."""
