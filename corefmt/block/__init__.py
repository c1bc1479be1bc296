"""The generic block layer: nodes, chains, alignment, tracked requests."""
