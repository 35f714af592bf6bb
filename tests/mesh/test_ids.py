"""Random ids: 32 hex digits, never repeated, and a forked child does not repeat its parent's."""

from __future__ import annotations

import os

from mesh.ids import random_id


def test_random_ids_are_128_bit_hex_and_unique() -> None:
    ids = [random_id() for _ in range(5000)]  # many refills of the pool of ids
    assert len(set(ids)) == len(ids)
    assert all(len(i) == 32 and int(i, 16) >= 0 for i in ids)


def test_a_forked_child_draws_ids_of_its_own() -> None:
    random_id()  # the pool now holds ids the child would inherit
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report its next id, then leave at once
        os.write(write_end, random_id().encode())
        os._exit(0)
    os.close(write_end)
    child_id = os.read(read_end, 64).decode()
    os.close(read_end)
    os.waitpid(pid, 0)
    assert len(child_id) == 32
    assert child_id != random_id()
