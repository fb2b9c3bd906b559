"""The descriptor pool of the generated `inference` modules (see `lstmserve.inference`).

scripts/gen_proto.sh makes the generated code import this module in place of
`google.protobuf.descriptor_pool`, so `Default()` there returns this pool.
"""

from google.protobuf import descriptor_pool

_POOL = descriptor_pool.DescriptorPool()


def Default() -> descriptor_pool.DescriptorPool:  # noqa: N802 - the name the generated code calls
    """The pool holding `inference.*` for lstmserve (never protobuf's default pool)."""
    return _POOL
