"""gr-dynemb: dynamic (hash-table) embedding tables for TorchRec.

The table implementation (native CPU/CUDA hash table, eviction, admission, tiers, sharder) is tracked by the
gr-dynemb issue; this package currently provides only its distribution metadata so that the monorepo layout,
dependency graph and install tests are in place.
"""

__version__ = "0.1.0"
