"""The only package that imports Ray (and, later, DeepSpeed): thin adapters that build trainers, call the
core library inside Ray workers, and report."""
