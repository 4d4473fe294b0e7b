"""Stand-in vllm_ascend (see tests/fakes/npu/README.md)."""
