"""The ``tokenmill`` command: thin wiring of the packages below it."""
