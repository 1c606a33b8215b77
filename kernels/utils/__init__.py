from .backend import force_backend, use_triton
from .validate import check_cu_seqlens, check_same_device, prepare_cu_seqlens
