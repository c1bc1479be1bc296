"""A tiny format written only for the tests: it proves an outside plugin
gets probing, chains, copy-on-read, conversion and the CLI from the core."""
