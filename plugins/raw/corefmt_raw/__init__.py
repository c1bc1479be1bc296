"""The raw format for corefmt: the guest's bytes, as they are, in a file."""
