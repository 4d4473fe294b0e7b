"""Stand-in of AscendSFAImpl's LI-C8 indexer-key write: quantize inline, then two scatters in forward."""

from types import SimpleNamespace

import torch
import torch_npu

from vllm_ascend.utils import AscendDeviceType, get_ascend_device_type

ASCEND_CONFIG = SimpleNamespace(c8_enable_reshape_optim=False)


def get_ascend_config():
    """The releases (0.23.0, 0.24.0rc1) read the reshape optimisation from here inline."""
    return ASCEND_CONFIG


class AscendSFAImpl:
    k_hadamard = None

    def __init__(self, vllm_config, enable_sparse_li_c8=True, reshape_optim=False, head_dim=128):
        self.vllm_config = vllm_config
        self.head_dim = head_dim
        self.enable_sparse_li_c8 = enable_sparse_li_c8
        self.reshape_optim = reshape_optim
        if get_ascend_device_type() == AscendDeviceType.A5:
            self.c8_k_cache_dtype, self.c8_k_scale_cache_dtype = torch.float8_e4m3fn, torch.float32
        else:
            self.c8_k_cache_dtype, self.c8_k_scale_cache_dtype = torch.int8, torch.float16

    def _use_li_c8_reshape_optim(self):
        return self.enable_sparse_li_c8 and self.reshape_optim

    def indexer_select_pre_process(self, x, cos, sin):
        k_li = x.view(-1, 1, self.head_dim).view(-1, self.head_dim)
        if AscendSFAImpl.k_hadamard is not None:
            k_li = k_li @ AscendSFAImpl.k_hadamard
        if self.enable_sparse_li_c8:
            k_li, k_li_scale = torch_npu.npu_dynamic_quant(k_li.view(-1, self.head_dim), dst_type=self.c8_k_cache_dtype)
            k_li_scale = k_li_scale.to(self.c8_k_scale_cache_dtype)
            k_li_scale = k_li_scale.unsqueeze(-1)
        else:
            k_li_scale = None
        return k_li, k_li_scale

    def _prepare_kv_for_parallel(self, k_li, k_li_scale):
        return k_li, k_li_scale

    def forward(self, layer_name, hidden_states, kv_cache, slot_mapping, skip_scale_scatter=False):
        """kv_cache = (k_nope, k_pe, indexer_k, indexer_scale), as without sparse SFA C8."""
        k_li, k_li_scale = self.indexer_select_pre_process(x=hidden_states, cos=None, sin=None)
        k_li, k_li_scale = self._prepare_kv_for_parallel(k_li, k_li_scale)
        torch_npu.npu_scatter_nd_update_(kv_cache[2].view(-1, k_li.shape[-1]), slot_mapping.view(-1, 1),
                                         k_li.view(-1, k_li.shape[-1]))
        if self.enable_sparse_li_c8 and not skip_scale_scatter:
            torch_npu.npu_scatter_nd_update_(kv_cache[3].view(-1, k_li_scale.shape[-1]), slot_mapping.view(-1, 1),
                                             k_li_scale.view(-1, k_li_scale.shape[-1]))
        # An unrelated torch_npu call after the write, as the real forward makes many.
        torch_npu.npu_dynamic_quant(hidden_states.view(-1, self.head_dim)[:1], dst_type=torch.int8)


class AscendSFAContextParallelImpl(AscendSFAImpl):
    def _prepare_kv_for_parallel(self, k_li, k_li_scale):
        return k_li, k_li_scale  # the real one all-gathers across ranks
