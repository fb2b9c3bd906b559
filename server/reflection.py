"""The descriptor pool that server reflection answers from.

gRPC's reflection service looks services up in one descriptor pool, by default protobuf's default
pool. `inference.*` cannot live there (tritonclient registers the same names in it; see
`lstmserve.inference`), so reflection gets a pool of its own holding a copy of every file it
describes, with their imports: `lstmserve.v1`, health, reflection itself and `inference.*`. A copy
shares nothing with either pool, so nothing collides, and tools such as grpcurl list and call
every service without being given the .proto files.
"""

from __future__ import annotations

from collections.abc import Iterable

from google.protobuf import descriptor_pb2, descriptor_pool
from google.protobuf.descriptor import FileDescriptor


def reflection_pool(files: Iterable[FileDescriptor]) -> descriptor_pool.DescriptorPool:
    """A new pool holding `files` and everything they import (each file after its imports)."""
    pool = descriptor_pool.DescriptorPool()
    added: set[str] = set()

    def add(file: FileDescriptor) -> None:
        if file.name in added:
            return
        for dependency in file.dependencies:
            add(dependency)
        proto = descriptor_pb2.FileDescriptorProto()
        file.CopyToProto(proto)
        pool.Add(proto)
        added.add(file.name)

    for file in files:
        add(file)
    return pool
