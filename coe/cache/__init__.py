"""The three-tier weight cache: experts' weights in HBM (a slot), host RAM, or only on disk.

- ``checkpoint``: a checkpoint's safetensors files, sizes and headers (no torch).
- ``signature``: which checkpoints can share a slot (same architecture, shapes and dtype).
- ``tiers``: the tiers and the per-expert residency record.
- ``residency``: the host budget, the eviction policy (expected cost of losing an expert), and
  the only writer of the residency records.
- ``slot``: one live engine and the factory that builds it.
- ``rpc``: the slot worker's RPCs as typed calls (``WorkerClient``).
- ``scheduler``: per-expert queues in front of a group of slots; decides when to switch.
- ``host_tier``: a group's host copies: reads from disk, captures, evictions.
- ``group``: serves each expert of a group through its slots, switching weights on demand.
- ``plan``: from experts.yaml to slot groups and sleepers.
- ``sleep``: the CUDA path for experts with an architecture of their own (vLLM sleep mode).
- ``pool``: the EnginePool, one engine per backend, and the cache's groups behind it.
- ``worker``, ``checkpoint_read``, ``host_memory``: the code that runs inside the engine's
  worker process.
"""
