from .backend import force_backend, keep_states_default, set_keep_states_default, use_triton
from .validate import check_cu_seqlens, check_same_device, grad_destination, prepare_cu_seqlens
