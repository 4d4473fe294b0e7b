"""Stand-in of the DeepSeek-V4 indexer write calls of vllm_ascend/device/device_op.py."""

import torch
import torch_npu

from vllm_ascend.utils import AscendDeviceType, get_ascend_device_type


class BaseDeviceAdaptor:
    """A2/A3: int8 keys, float16 scales, two scatters."""

    @staticmethod
    def indexer_quantize_query(q):
        q, s = torch_npu.npu_dynamic_quant(q, dst_type=torch.int8)
        return q, s.to(torch.float16)

    @staticmethod
    def indexer_quant_scatter(q, kv, indexer_k_cache, indexer_scale_cache, indexer_full_cache, slot_mapping):
        q, q_scale = BaseDeviceAdaptor.indexer_quantize_query(q)
        kv_out, kv_scale = torch_npu.npu_dynamic_quant(kv, dst_type=torch.int8)
        torch_npu.npu_scatter_nd_update_(indexer_k_cache.view(-1, kv.shape[-1]), slot_mapping.view(-1, 1), kv_out)
        torch_npu.npu_scatter_nd_update_(indexer_scale_cache.view(-1, 1), slot_mapping.view(-1, 1),
                                         kv_scale.to(torch.float16).unsqueeze(-1))
        return q, q_scale, kv_out, kv_scale

    @staticmethod
    def indexer_quant_scatter_part1(kv, indexer_k_cache, indexer_full_cache, slot_mapping):
        if kv is None:
            return None, None
        kv_out, kv_scale = torch_npu.npu_dynamic_quant(kv, dst_type=torch.int8)
        torch_npu.npu_scatter_nd_update_(indexer_k_cache.view(-1, kv.shape[-1]), slot_mapping.view(-1, 1), kv_out)
        return kv_out, kv_scale.unsqueeze(-1)

    @staticmethod
    def dsa_indexer_scatter_scale_part3(kv_scale, indexer_scale_cache, slot_mapping):
        torch_npu.npu_scatter_nd_update_(indexer_scale_cache.view(-1, 1), slot_mapping.view(-1, 1),
                                         kv_scale.to(torch.float16))

    @staticmethod
    def prepare_dsa_indexer_key_scale(indexer_scale_cache):
        return indexer_scale_cache.squeeze(-2).to(torch.float16)


class A5DeviceAdaptor(BaseDeviceAdaptor):
    """A5: FP8 query; keys and scales written by one fused call on the whole-block view."""

    @staticmethod
    def indexer_quantize_query(q):
        return torch_npu.npu_dynamic_quant(q, dst_type=torch.float8_e4m3fn)

    @staticmethod
    def indexer_quant_scatter(q, kv, indexer_k_cache, indexer_scale_cache, indexer_full_cache, slot_mapping):
        q, q_scale = torch_npu.npu_dynamic_quant(q, dst_type=torch.float8_e4m3fn)
        if kv is not None:
            torch.ops._C_ascend.indexer_compress_epilog_v2(indexer_full_cache.view(torch.uint8), kv, slot_mapping, 2)
        return q, q_scale, kv, None

    @staticmethod
    def indexer_quant_scatter_part1(kv, indexer_k_cache, indexer_full_cache, slot_mapping):
        if kv is None:
            return None, None
        torch.ops._C_ascend.indexer_compress_epilog_v2(indexer_full_cache.view(torch.uint8), kv, slot_mapping, 2)
        return kv, None

    @staticmethod
    def dsa_indexer_scatter_scale_part3(kv_scale, indexer_scale_cache, slot_mapping):
        pass

    @staticmethod
    def prepare_dsa_indexer_key_scale(indexer_scale_cache):
        return indexer_scale_cache.squeeze(-2).float()


DeviceOperator = A5DeviceAdaptor if get_ascend_device_type() == AscendDeviceType.A5 else BaseDeviceAdaptor
