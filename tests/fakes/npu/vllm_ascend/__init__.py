"""Stand-in vllm_ascend (see tests/fake_npu/README.md)."""
