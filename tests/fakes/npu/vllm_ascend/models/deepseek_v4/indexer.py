"""Stand-in of the DeepSeek-V4 indexer cache and the indexer's cache-write/read calls."""

import torch

from vllm_ascend.core.kv_cache_interface import AscendMLAAttentionSpec
from vllm_ascend.utils import AscendDeviceType, get_ascend_device_type


class AscendDeepseekV4IndexerCache:
    def __init__(self, head_dim, dtype, prefix="", cache_config=None, compress_ratio=4):
        self.head_dim, self.dtype, self.prefix, self.compress_ratio = head_dim, dtype, prefix, compress_ratio

    def get_kv_cache_spec(self, vllm_config):
        a5 = get_ascend_device_type() == AscendDeviceType.A5
        if a5:
            self.dtype = torch.float8_e4m3fn
        return AscendMLAAttentionSpec(
            block_size=vllm_config.cache_config.block_size,
            num_kv_heads=1,
            head_size=self.head_dim,
            dtype=self.dtype,
            scale_dim=1 if self.head_dim == 128 else 0,
            scale_dtype=torch.float32 if a5 else torch.float16,
        )


class AscendIndexerOps:
    """The indexer's calls into DeviceOperator; `select_topk` records what the lightning indexer would read."""

    def __init__(self, index_topk=512):
        from vllm_ascend.device.device_op import DeviceOperator

        self.device_operator = DeviceOperator
        self.index_topk = index_topk
        self.reads = []

    def quantize_key_and_update_cache(self, key, key_cache, full_cache, slot_mapping):
        return self.device_operator.indexer_quant_scatter_part1(key, key_cache, full_cache, slot_mapping)

    def update_scale_cache(self, key_scale, scale_cache, slot_mapping):
        self.device_operator.dsa_indexer_scatter_scale_part3(key_scale, scale_cache, slot_mapping)

    def select_topk(self, query, query_scale, key_cache, scale_cache):
        self.reads.append({"key": key_cache,
                           "key_dequant_scale": self.device_operator.prepare_dsa_indexer_key_scale(scale_cache)})

    def quantize_update_cache_and_select_topk(self, query, key, key_cache, scale_cache, full_cache, slot_mapping):
        query, query_scale, _, _ = self.device_operator.indexer_quant_scatter(
            query, key, key_cache, scale_cache, full_cache, slot_mapping)
        self.select_topk(query, query_scale, key_cache, scale_cache)

    def split_stream_update(self, key, key_cache, scale_cache, full_cache, slot_mapping):
        """The multistream path: part 1, then part 3 only when part 1 returned a scale."""
        key, key_scale = self.quantize_key_and_update_cache(key, key_cache, full_cache, slot_mapping)
        if key is not None and key_scale is not None:
            self.update_scale_cache(key_scale, scale_cache, slot_mapping)
