"""The worker process of one pool: one llama.cpp model and context, many sequences at once.

The pool manager starts it as ``python -m poolmanager.worker`` and talks to it over its pipes.
Rooms, from the outside in:

- ``protocol``: the typed commands and events both sides import (the pool manager imports
  nothing else of this package);
- ``main``: the command line, spare mode, loading, and the loop that feeds the batcher;
- ``channel``: the pipes (commands read between steps, events written per step, tokens merged);
- ``batching``: the continuous-batching scheduler, one ``llama_decode`` per step;
- ``text``: tokens to UTF-8-safe text and stop sequences, per sequence (pure);
- ``engine``: every llama.cpp call, with the guards against the ones that abort the process;
- ``log``: JSON log lines on stderr.

Importing the package imports nothing heavy: llama.cpp is loaded only by ``engine``.
"""
