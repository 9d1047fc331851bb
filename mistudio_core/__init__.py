"""miStudio's library: models, activations, sparse autoencoders, training and evaluation.

Plain Python with no sockets and no UI, so every piece is usable alone from a notebook, from the
`mistudio --local` command line, and from the daemon's worker processes through the same calls.
"""

__version__ = "0.1.0"
