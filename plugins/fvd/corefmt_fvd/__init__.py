"""The FVD (Fast Virtual Disk) format driver for corefmt."""
