from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class AscendMLAAttentionSpec:
    """The fields the indexer cache spec carries; the page holds every row's values and scales."""

    block_size: int
    num_kv_heads: int
    head_size: int
    dtype: torch.dtype
    scale_dim: int = 0
    scale_dtype: torch.dtype = torch.int8

    @property
    def page_size_bytes(self) -> int:
        size = lambda dt: torch.empty((), dtype=dt).element_size()  # noqa: E731
        return self.block_size * self.num_kv_heads * (
            self.head_size * size(self.dtype) + self.scale_dim * size(self.scale_dtype)
        )
