"""The ``corefmt`` command line (qemu-img-style verbs, plus ``io``)."""
