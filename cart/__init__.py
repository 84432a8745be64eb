"""cart: turn a large text corpus into a cartridge (a small trained KV cache) with self-study,
and serve queries with it. See ``cart --help`` and ``man/``."""

__version__ = "0.1.0"
