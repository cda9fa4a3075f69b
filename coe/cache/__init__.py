"""The three-tier weight cache: experts' weights in HBM (a slot), host RAM, or only on disk.

- ``signature``: which checkpoints can share a slot (same architecture, shapes and dtype).
- ``tiers``: the tiers and the per-expert residency record.
- ``residency``: the host budget and the eviction policy (expected cost of losing an expert).
- ``slot``: one live engine and the RPCs that move weights in and out of it.
- ``scheduler``: per-expert queues in front of a group of slots; decides when to switch.
- ``group``: builds slot groups from experts.yaml and serves each expert through them.
- ``sleep``: the CUDA path for experts with an architecture of their own (vLLM sleep mode).
- ``worker``: the code that runs inside the engine's worker process.
"""
